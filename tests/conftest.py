"""Fixtures for end-to-end tests: the real lab (namespaces, Docker engines, CRIU, agents)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from migctl.agent import certs
from migctl.lab.workloads import CACHE  # noqa: F401 - the tests import it from here

ROOT = Path(__file__).resolve().parent.parent


class LabHandle:
    def __init__(self, state: dict) -> None:
        self.nodes = state["nodes"]
        self.docker = {name: docker.DockerClient(base_url=n["docker_host"], timeout=120)
                       for name, n in self.nodes.items()}

    def address(self, node: str) -> str:
        return self.nodes[node]["address"]


MEMORY_TRANSFERS = ("delta", "page-server", "post-copy")
DELTA = ["--memory-transfer", "delta"]


def names_its_transfer(args: tuple[str, ...] | list[str]) -> None:
    """A lab migration names how its memory travels: left to the measured link, the transfer
    differs between machines, and between runs on one (tests of the automatic choice pass
    `--memory-transfer auto` and set the link and the threshold themselves)."""
    if args and args[0] in ("migrate", "evacuate") and "--memory-transfer" not in args \
            and "--dry-run" not in args:
        raise AssertionError(f"`migctl {' '.join(args)}`: name the memory transfer the test "
                             f"needs (--memory-transfer {' | '.join(MEMORY_TRANSFERS)})")


def migctl(*args: str, check: bool = True, inventory: Path | None = None
           ) -> subprocess.CompletedProcess[str]:
    """Run the real `migctl` command, as a user would."""
    names_its_transfer(args)
    cmd = [sys.executable, "-m", "migctl.client.cli"]
    if inventory:
        cmd += ["--inventory", str(inventory)]
    res = subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"migctl {' '.join(args)} failed ({res.returncode}):\n"
                             f"{res.stdout}\n{res.stderr}")
    return res


def migrate_json(*args: str) -> dict:
    return json.loads(migctl("migrate", "--json", *args).stdout)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with certificates for nodeA and nodeB (tls/nodes/NODE/) and the operator (client),
    for in-process agents."""
    d = tmp_path_factory.mktemp("pki")
    certs.init(d, ["nodeA", "nodeB"], ["client"])
    return d


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--lab-link-rate", default="", metavar="RATE",
                     help="shape every pair of lab nodes to RATE (tc's units, e.g. 100mbit) for "
                          "the whole session: the suite must pass with the links unshaped and "
                          "shaped (a test that shapes links itself gets these back after it)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the lab is a lab test, marked or not (`--fast` leaves it out)."""
    for item in items:
        if "lab" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.lab)


def session_links(rate: str) -> None:
    """Every pair of lab nodes shaped to RATE, and nothing else; unshaped when RATE is ''."""
    from migctl.lab import net as labnet
    from migctl.lab.nodes import Lab

    lab = Lab()
    state = lab.state()
    labnet.reset(state)
    nodes = sorted(state["nodes"])
    if rate:
        for i, a in enumerate(nodes):
            for b in nodes[i + 1:]:
                labnet.set_link(state, a, b, labnet.LinkSpec(rate=rate))
    lab.save(state)


@pytest.fixture(scope="session")
def lab(request: pytest.FixtureRequest) -> Iterator[LabHandle]:
    """Starts (or reuses) a 3-node lab; removes it afterwards only if this session made it.
    With --lab-link-rate, its links are shaped for the session."""
    from migctl.lab.nodes import Lab

    lab = Lab()
    existed = bool(lab.state().get("nodes"))
    lab.up(3)
    rate = request.config.getoption("--lab-link-rate")
    try:
        session_links(rate)
        print(f"\n[lab] links: {rate or 'unshaped'}")
        yield LabHandle(lab.state())
    finally:
        if not existed and not os.environ.get("MIGCTL_KEEP_LAB"):
            lab.down()
        elif rate:
            session_links("")


@pytest.fixture(autouse=True)
def _session_links_after(request: pytest.FixtureRequest) -> Iterator[None]:
    """A lab test that shaped or reset links leaves the session's shaping behind it."""
    yield
    rate = request.config.getoption("--lab-link-rate")
    if rate and "lab" in request.fixturenames:
        session_links(rate)
