"""The compose lab (docker-compose.yml, lab/compose/) end to end, as a user starts it: the base
image and wheels (lab/compose/build-base-image.sh, skipped when up to date), then one
`docker-compose up -d --build`: the node image is built by pip and the node installer, the
operator mints a token per node, each node joins with its own key, and the agents answer. Then
the seed's toy container moves A -> B -> C -> A, the last hop taking a basis from nodeB through
the Redis registry, and the lab is torn down.

    .venv/bin/pytest -v -p no:cacheprovider tests/test_compose.py

Needs root and scripts/setup.sh done (CRIU in /opt/migctl, .venv, .venv-system,
docker-compose and debootstrap), and PyPI (or the machine's pip index) reachable for the
wheels. The first base build takes about a minute (debootstrap, apt, import); the node image's
build about 30 s.

The Docker engine: $DOCKER_HOST if it answers; otherwise a private one (lab/compose/hostd.sh:
its own data root, exec root and socket), stopped afterwards but kept on disk with the images.
MIGCTL_COMPOSE_KEEP=1 leaves the lab (and a private engine) up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from cryptography import x509

from migctl.lab.workloads import ensure_toy_image, numbers, remove_everywhere, run_toy
from tests.conftest import DELTA, ROOT, migctl

pytestmark = pytest.mark.compose

COMPOSE = ROOT / "lab" / "compose"
STATE = COMPOSE / "state"
INVENTORY = COMPOSE / "inventory.json"  # a link to the operator's state/inventory.json
NODES = ["nodeA", "nodeB", "nodeC"]
REGISTRY = "migctl-registry"
OPERATOR = "migctl-operator"
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
            # stopped, not purged: its data root keeps the node image for the next run
            run("bash", str(COMPOSE / "hostd.sh"), "stop", env=env, timeout=180)


@pytest.fixture(scope="module")
def compose_lab(engine: dict[str, str]) -> Iterator[dict[str, docker.DockerClient]]:
    """The three nodes up and their agents answering; the nodes' engines, by node name."""
    compose = ["docker-compose", "-f", str(ROOT / "docker-compose.yml")]
    names = [*NODES, REGISTRY, OPERATOR]
    existing = subprocess.run(["docker", "ps", "-aq", *[f"--filter=name=^{n}$" for n in names]],
                              capture_output=True, text=True, env=engine).stdout.split()
    if existing and engine.get("DOCKER_HOST") != PRIVATE_ENGINE:
        pytest.skip(f"containers named {names} exist on {engine.get('DOCKER_HOST')} already "
                    "(a compose lab is up?): not touching them")
    if existing:  # a lab left on our own engine by an earlier run: ours to clean
        run(*compose, "down", "-v", "-t", "30", env=engine, timeout=300)
    t0 = time.monotonic()
    run("bash", str(COMPOSE / "build-base-image.sh"), env=engine)  # skipped when up to date
    t_build = time.monotonic() - t0
    try:
        run(*compose, "up", "-d", "--build", env=engine, timeout=900)
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
        print(f"compose lab: base image {t_build:.0f} s, built, up and healthy after "
              f"{time.monotonic() - t0 - t_build:.0f} s")
        yield {name: docker.DockerClient(base_url=f"unix://{STATE}/run/{name}/docker.sock",
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
        assert "up, migctl " in line and "(protocol " in line and ", engine " in line, out


def test_every_node_joined_with_its_own_key_and_the_installers_files(
        compose_lab: dict, engine: dict[str, str]) -> None:
    """No node's key is in the operator's state; each node's certificate is the operator's CA's
    for that node's own key, and its token is spent. The image is the node installer's: its
    wrapper is in daemon.json, and the engine runs containers through it."""
    assert not [p for p in STATE.rglob("*.key") if p.name not in ("client.key", "ca.key")], \
        "a node's key is in the operator's folder"
    ca = x509.load_pem_x509_certificate((STATE / "tls" / "ca.crt").read_bytes())
    for name in NODES:
        pem = run("docker", "exec", name, "cat", f"/var/lib/migctl/tls/{name}.crt", env=engine)
        cert = x509.load_pem_x509_certificate(pem.encode())
        cert.verify_directly_issued_by(ca)
        assert cert.subject.rfc4514_string().startswith(f"CN={name}"), cert.subject
        assert not (STATE / "tls" / "private" / "joins" / f"{name}.json").exists()
        spent = run("docker", "exec", name, "sh", "-c", "migctl certs join --dir /tmp/again - "
                    "</etc/migctl/lab/join.token; echo rc=$?", env=engine)
        assert "rc=0" not in spent, f"{name}'s token joined twice: {spent}"
        daemon = json.loads(run("docker", "exec", name, "cat", "/etc/docker/daemon.json",
                                env=engine))
        assert daemon["runtimes"]["migctl"]["path"] == "/usr/local/lib/migctl/migctl-runc"
        assert compose_lab[name].info()["DefaultRuntime"] == "migctl"


def test_the_node_image_is_a_plain_install_on_debians_own_python(
        compose_lab: dict, engine: dict[str, str]) -> None:
    """pip install of the clone (not editable) into a venv of Debian 12's python3 (3.11.2):
    one `migctl` namespace, the runc wrapper inside it, every command the same version."""
    probe = ("import importlib.util, pathlib, sys, migctl; "
             "print(sys.version.split()[0]); "
             "print(pathlib.Path(migctl.__file__).parent); "
             "print([n for n in ('agent', 'client', 'proto') if importlib.util.find_spec(n)]); "
             "print((pathlib.Path(migctl.__file__).parent / 'agent/runtime/migctl-runc')"
             ".is_file())")
    version, where, top_level, wrapper = run(
        "docker", "exec", "nodeA", "/opt/migctl/venv/bin/python", "-c", probe,
        env=engine).split("\n")[:4]
    assert version == "3.11.2", version
    assert "site-packages" in where and not where.startswith("/opt/migctl/src"), where
    assert (top_level, wrapper) == ("[]", "True")
    said = {run("docker", "exec", "nodeA", c, "--version", env=engine).split()[1]
            for c in ("migctl", "migagent", "migctl-delta")}
    assert len(said) == 1, said


def test_every_node_has_the_same_segment_network_lan(compose_lab: dict) -> None:
    """Where addresses move with their containers (and connections with them)."""
    seen = set()
    for client in compose_lab.values():
        lan = client.networks.get("lan").attrs
        ipam = lan["IPAM"]["Config"][0]
        seen.add((lan["Driver"], lan["Options"].get("parent"), ipam["Subnet"], ipam["IPRange"]))
    assert len(seen) == 1 and next(iter(seen))[:2] == ("macvlan", "eth0"), seen


def hop(nodes: dict[str, docker.DockerClient], source: str, destination: str) -> dict:
    """One migration as a user runs it; afterwards exactly one toytsm runs, on DESTINATION, and
    its count went on from where it was frozen."""
    report = json.loads(migctl("migrate", "--json", *DELTA, "--from", source, "--to", destination,
                               "toytsm", inventory=INVENTORY).stdout)
    assert report["destination_node"] == destination, report
    running = [n for n, c in nodes.items()
               if any(k.name == "toytsm" and k.status == "running"
                      for k in c.containers.list(filters={"name": "toytsm"}))]
    assert running == [destination], f"toytsm runs on {running} after {source} -> {destination}"
    at_freeze = counter(nodes[destination])
    after = wait_for_count(nodes[destination], len(at_freeze) + 2)
    assert after == list(range(len(after))), f"the count restarted or skipped: {after}"
    assert len(after) > len(at_freeze), f"the count stopped on {destination}: {after}"
    return report


def registry_nodes(engine: dict[str, str]) -> set[str]:
    """The nodes that published their address in the registry service's Redis."""
    conf = (STATE / "registry" / "redis.conf").read_text().split()
    password = conf[conf.index("requirepass") + 1]
    out = run("docker", "exec", REGISTRY, "redis-cli", "-a", password, "--no-auth-warning",
              "hkeys", "migctl:nodes", env=engine)
    return set(out.split())


def test_toy_moves_a_b_c_a_and_the_last_hop_takes_from_a_neighbour(
        compose_lab: dict, engine: dict[str, str],
        tmp_path_factory: pytest.TempPathFactory) -> None:
    nodes = compose_lab
    cache = tmp_path_factory.mktemp("cache")
    a = nodes["nodeA"]
    ensure_toy_image(a, cache)
    remove_everywhere(nodes, ["toytsm"], ["testrw", "testro"])
    run_toy(a)
    before = wait_for_count(a, 4)
    assert len(before) >= 4, before

    first = hop(nodes, "nodeA", "nodeB")  # the destination pulls from the inventory's address
    assert {o["node"] for o in first["origins"] if o["bytes"]} == {"nodeA"}, first["origins"]
    hop(nodes, "nodeB", "nodeC")
    assert registry_nodes(engine) == set(NODES)
    back = hop(nodes, "nodeC", "nodeA")
    basis = [t for t in back["transfers"] if t["kind"] == "volume snapshot basis"]
    # nodeB held the volume's snapshot since its own hop, and the registry said so
    assert [t["origin"] for t in basis] == ["nodeB"], back["transfers"]
    remove_everywhere(nodes, ["toytsm"], ["testrw", "testro"])
