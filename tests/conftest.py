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

from agent import certs
from client.workloads import CACHE  # noqa: F401 - the tests import it from here

ROOT = Path(__file__).resolve().parent.parent


class LabHandle:
    def __init__(self, state: dict) -> None:
        self.nodes = state["nodes"]
        self.docker = {name: docker.DockerClient(base_url=n["docker_host"], timeout=120)
                       for name, n in self.nodes.items()}

    def address(self, node: str) -> str:
        return self.nodes[node]["address"]


def migctl(*args: str, check: bool = True, inventory: Path | None = None
           ) -> subprocess.CompletedProcess[str]:
    """Run the real `migctl` command, as a user would."""
    cmd = [sys.executable, "-m", "client.cli"]
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


@pytest.fixture(scope="session")
def lab() -> Iterator[LabHandle]:
    """Starts (or reuses) a 3-node lab; removes it afterwards only if this session made it."""
    from client.lab import Lab

    lab = Lab()
    existed = bool(lab.state().get("nodes"))
    state = lab.up(3)
    try:
        yield LabHandle(state)
    finally:
        if not existed and not os.environ.get("MIGCTL_KEEP_LAB"):
            lab.down()
