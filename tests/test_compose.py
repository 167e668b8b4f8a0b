"""The compose lab (docker-compose.yml, lab/compose/) end to end: build the node image, start
nodeA, nodeB and nodeC as containers, migrate the seed's toy container between them, tear it
all down.

OPT-IN: skipped unless MIGCTL_COMPOSE_TESTS=1 (marked `compose`). The main CI runs the namespace
lab (tests/test_migrate_e2e.py and the other `lab` tests), not this.

    MIGCTL_COMPOSE_TESTS=1 .venv/bin/pytest -v -p no:cacheprovider tests/test_compose.py

Needs root, scripts/setup.sh done (CRIU in /opt/migctl, .venv), `apt-get install docker-compose
debootstrap`, and PyPI reachable (the image's venv). About 2-3 minutes, most of it the image build
(debootstrap ~35 s, apt ~20 s, pip ~25 s, import ~10 s).

The Docker engine: $DOCKER_HOST if it answers; otherwise a private one started with
lab/compose/hostd.sh (its own data root, exec root and socket), stopped and purged afterwards.
MIGCTL_COMPOSE_SKIP_BUILD=1 reuses an existing migctl-node:latest; MIGCTL_COMPOSE_KEEP=1 leaves
the lab (and a private engine) up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from client.workloads import ensure_toy_image, numbers, remove_everywhere, run_toy
from tests.conftest import ROOT, migctl

with warnings.catch_warnings():  # the marker is documented here, not in pyproject.toml
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    pytestmark = [
        pytest.mark.compose,
        pytest.mark.skipif(os.environ.get("MIGCTL_COMPOSE_TESTS") != "1",
                           reason="compose lab tests are opt-in: set MIGCTL_COMPOSE_TESTS=1"),
    ]

COMPOSE = ROOT / "lab" / "compose"
INVENTORY = COMPOSE / "inventory.json"
NODES = ["nodeA", "nodeB", "nodeC"]
IMAGE = "migctl-node:latest"
PRIVATE_ENGINE = "unix:///run/migctl-compose/docker.sock"


def run(*cmd: str, env: dict[str, str], timeout: float = 900) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"`{' '.join(cmd)}` failed ({res.returncode}):\n"
                             f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res.stdout


def answers(docker_host: str) -> bool:
    res = subprocess.run(["docker", "-H", docker_host, "version", "--format",
                          "{{.Server.Version}}"], capture_output=True, text=True)
    return res.returncode == 0


@pytest.fixture(scope="module")
def engine() -> Iterator[dict[str, str]]:
    """The environment docker and docker-compose run with: an engine that answers."""
    if os.geteuid() != 0:
        pytest.fail("the compose lab needs root (debootstrap, chroot, a Docker engine)")
    missing = [t for t in ("docker", "docker-compose", "debootstrap") if not shutil.which(t)]
    if missing:
        pytest.fail(f"missing {missing}: apt-get install docker-compose debootstrap")
    if not Path("/opt/migctl/bin/criu").exists():
        pytest.fail("no /opt/migctl/bin/criu: run scripts/setup.sh first")
    given = os.environ.get("DOCKER_HOST", "")
    if given and answers(given):
        yield dict(os.environ)
        return
    env = dict(os.environ, DOCKER_HOST=PRIVATE_ENGINE)
    started = not answers(PRIVATE_ENGINE)
    if started:
        run("bash", str(COMPOSE / "hostd.sh"), "start", env=env, timeout=120)
    try:
        yield env
    finally:
        if started and not os.environ.get("MIGCTL_COMPOSE_KEEP"):
            run("bash", str(COMPOSE / "hostd.sh"), "purge", env=env, timeout=180)


@pytest.fixture(scope="module")
def compose_lab(engine: dict[str, str]) -> Iterator[dict[str, docker.DockerClient]]:
    """The three nodes up and their agents answering; the nodes' engines, by node name."""
    existing = subprocess.run(["docker", "ps", "-aq", *[f"--filter=name=^{n}$" for n in NODES]],
                              capture_output=True, text=True, env=engine).stdout.split()
    if existing:
        pytest.skip(f"containers named {NODES} exist on this engine already (a compose lab "
                    "is up?): not touching them")
    t0 = time.monotonic()
    have_image = subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True,
                                env=engine).returncode == 0
    if not (have_image and os.environ.get("MIGCTL_COMPOSE_SKIP_BUILD")):
        run("bash", str(COMPOSE / "build-node-image.sh"), env=engine)
    t_build = time.monotonic() - t0
    run("bash", str(COMPOSE / "prepare.sh"), env=engine)
    compose = ["docker-compose", "-f", str(ROOT / "docker-compose.yml")]
    try:
        run(*compose, "up", "-d", env=engine, timeout=300)
        deadline = time.monotonic() + 120
        while True:
            health = run("docker", "inspect", "-f", "{{.State.Health.Status}}", *NODES,
                         env=engine).split()
            if health == ["healthy"] * len(NODES):
                break
            if time.monotonic() > deadline or "unhealthy" in health:
                logs = run(*compose, "logs", "--tail", "30", env=engine)
                raise AssertionError(f"nodes not healthy ({health}):\n{logs}")
            time.sleep(1)
        print(f"compose lab: image {t_build:.0f} s, up and healthy after "
              f"{time.monotonic() - t0 - t_build:.0f} s")
        inventory = json.loads(INVENTORY.read_text())
        yield {name: docker.DockerClient(base_url=inventory["nodes"][name]["docker_host"],
                                         timeout=120) for name in NODES}
    finally:
        if not os.environ.get("MIGCTL_COMPOSE_KEEP"):
            run(*compose, "down", "-v", "-t", "30", env=engine, timeout=300)


def counter(client: docker.DockerClient) -> list[int]:
    out = client.containers.get("toytsm").exec_run(["cat", "/testrw/counter"])
    assert out.exit_code == 0, out.output
    return numbers(out.output.decode())


def wait_for_count(client: docker.DockerClient, at_least: int, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        seen = counter(client)
        if len(seen) >= at_least or time.monotonic() > deadline:
            return seen
        time.sleep(0.5)


def test_agents_answer_at_the_inventory_addresses(compose_lab: dict) -> None:
    out = migctl("nodes", inventory=INVENTORY).stdout
    for name in NODES:
        line = next(line for line in out.splitlines() if line.startswith(name))
        assert "up, engine" in line, out


def test_toy_migrates_across_the_compose_nodes(compose_lab: dict,
                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    nodes = compose_lab
    cache = tmp_path_factory.mktemp("cache")
    a, b, c = (nodes[n] for n in NODES)
    ensure_toy_image(a, cache)
    remove_everywhere(nodes, ["toytsm"], ["testrw", "testro"])
    run_toy(a)
    before = wait_for_count(a, 4)
    assert len(before) >= 4, before

    # nodeA -> nodeB: the destination pulls from the source at the inventory's address
    report = json.loads(migctl("migrate", "--json", "--from", "nodeA", "--to", "nodeB", "toytsm",
                               inventory=INVENTORY).stdout)
    assert report["destination_node"] == "nodeB"
    assert a.containers.get("toytsm").status == "exited"
    at_freeze = counter(b)
    after = wait_for_count(b, len(at_freeze) + 2)
    assert after == list(range(len(after))), f"the count restarted or skipped: {after}"
    assert len(after) > len(at_freeze) >= len(before)

    # nodeB -> nodeC: one more hop, the agents find each other through their own inventory
    report = json.loads(migctl("migrate", "--json", "--from", "nodeB", "--to", "nodeC", "toytsm",
                               inventory=INVENTORY).stdout)
    assert report["destination_node"] == "nodeC"
    at_freeze = counter(c)
    after = wait_for_count(c, len(at_freeze) + 2)
    assert after == list(range(len(after))), f"the count restarted or skipped: {after}"
    assert report["downtime_seconds"] < 10, report
