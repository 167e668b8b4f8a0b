"""Cooperative migration on a 3-node lab, with either registry backend.

The scenario of the issue: the container passed through nodeC earlier, so nodeC holds the
image layers and an older snapshot of its 20 MB volume; since then the volume grew by 5 %.
Migrating nodeA -> nodeB cooperatively must take far fewer bytes from nodeA than the
traditional way, with the same result.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from migctl.lab.nodes import Lab
from migctl.lab.workloads import TOY_IMAGE, ensure_toy_image, numbers, remove_everywhere
from migctl.lab.workloads import run_toy as run_counter
from tests.conftest import CACHE, DELTA, LabHandle, migrate_json

pytestmark = pytest.mark.lab

VOLUME_MB = 20


def volume_file(client: docker.DockerClient, volume: str, name: str) -> bytes:
    return Path(client.volumes.get(volume).attrs["Mountpoint"], name).read_bytes()


def from_node(report: dict, node: str) -> int:
    return sum(o["bytes"] for o in report["origins"] if o["node"] == node)


def drop_images(client: docker.DockerClient, like: docker.DockerClient) -> None:
    """CLIENT forgets every image holding a layer of the toy image (tagged or not)."""
    layers = set(like.images.get(TOY_IMAGE).attrs["RootFS"]["Layers"])
    doomed = {img.id for img in client.images.list(all=True)
              if layers & set(img.attrs["RootFS"].get("Layers") or [])}
    for c in client.containers.list(all=True):
        if c.attrs["Image"] in doomed:
            c.remove(force=True)
    for image_id in doomed:
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.images.remove(image_id, force=True)
    assert not any(layers & set(i.attrs["RootFS"].get("Layers") or [])
                   for i in client.images.list(all=True)), "nodeB still holds a toy layer"


def passed_through_c(lab: LabHandle, name: str) -> None:
    """NAME runs on nodeA with a 20 MB volume, has been to nodeC and back, and its volume
    has grown by 5 % since. nodeB has neither the image nor anything of NAME."""
    a = lab.docker["nodeA"]
    remove_everywhere(lab.docker, [name], [f"{name}-rw", f"{name}-ro"])
    ensure_toy_image(a, CACHE)
    drop_images(lab.docker["nodeB"], like=a)
    c = run_counter(a, name=name, rw=f"{name}-rw", ro=f"{name}-ro")
    assert c.exec_run(["sh", "-c", f"head -c {VOLUME_MB * 1_000_000} /dev/urandom "
                                   "> /testrw/data"]).exit_code == 0
    time.sleep(1)
    migrate_json(*DELTA, "--mode", "traditional", "--from", "nodeA", "--to", "nodeC", name)
    time.sleep(1)
    migrate_json(*DELTA, "--mode", "traditional", "--from", "nodeC", "--to", "nodeA", name)
    grow = a.containers.get(name).exec_run(
        ["sh", "-c", f"head -c {VOLUME_MB * 50_000} /dev/urandom >> /testrw/data"])
    assert grow.exit_code == 0
    time.sleep(1)


def check_same_result(lab: LabHandle, name: str, report: dict) -> None:
    a, b = lab.docker["nodeA"], lab.docker["nodeB"]
    assert a.containers.get(name).status == "exited"
    new = b.containers.get(name)
    assert new.id == report["new_container_id"] and new.status == "running"
    at_freeze = volume_file(a, f"{name}-rw", "data")
    assert len(at_freeze) == VOLUME_MB * 1_050_000
    assert hashlib.sha256(volume_file(b, f"{name}-rw", "data")).digest() == \
        hashlib.sha256(at_freeze).digest(), "the volume differs from the source's at freeze"
    last = numbers(a.containers.get(name).logs().decode())[-1]
    deadline = time.monotonic() + 20
    while len(numbers(new.logs().decode())) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert numbers(new.logs().decode())[0] == last + 1, "the count did not go on"
    history = numbers(new.exec_run(["cat", "/testrw/counter"]).output.decode())
    assert history == list(range(len(history)))


@pytest.fixture(params=["inventory", "redis"])
def registry(request, lab: LabHandle) -> Iterator[str]:
    """Every agent uses the given registry backend; Redis is a real server the test starts,
    on the host's lab address so that agents in their namespaces reach it."""
    if request.param == "inventory":
        yield "inventory"
        return
    host = Lab().state()["subnet"].rsplit(".", 1)[0] + ".1"
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    password = secrets.token_hex(16)  # not on loopback: Redis wants a password (protected mode)
    redis = subprocess.Popen(["redis-server", "--bind", host, "--port", str(port), "--save", "",
                              "--appendonly", "no", "--requirepass", password],
                             stdout=subprocess.DEVNULL)
    url = f"redis://:{password}@{host}:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-h", host, "-p", str(port), "-a", password,
                              "--no-auth-warning", "ping"],
                             capture_output=True, text=True).stdout.strip() != "PONG":
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)
        for node in lab.nodes:
            Lab().restart_agent(node, extra_args=["--registry", url])
        yield url
    finally:
        for node in lab.nodes:
            Lab().restart_agent(node)
        redis.terminate()
        redis.wait(timeout=10)


def test_cooperative_takes_far_less_from_the_source(lab: LabHandle, registry: str) -> None:
    passed_through_c(lab, "coop")
    coop = migrate_json(*DELTA, "--mode", "cooperative", "--from", "nodeA", "--to", "nodeB", "coop")
    check_same_result(lab, "coop", coop)
    layers = [t for t in coop["transfers"] if t["kind"] == "layer" and t["method"] != "skipped"]
    assert layers and all(t["origin"] == "nodeC" for t in layers), \
        [(t["item"][:19], t["origin"], t["reason"]) for t in layers]
    basis = [t for t in coop["transfers"] if t["kind"] == "volume snapshot basis"]
    assert [t["origin"] for t in basis] == ["nodeC"] and basis[0]["reason"], basis

    passed_through_c(lab, "trad")
    trad = migrate_json(*DELTA, "--mode", "traditional", "--from", "nodeA", "--to", "nodeB", "trad")
    check_same_result(lab, "trad", trad)
    assert all(o["node"] == "nodeA" for o in trad["origins"])

    coop_a, trad_a = from_node(coop, "nodeA"), from_node(trad, "nodeA")
    backend = registry.split("@")[-1]  # without the password
    print(f"\n[{backend}] bytes from nodeA: cooperative {coop_a}, traditional {trad_a} "
          f"({1 - coop_a / trad_a:.1%} fewer); by origin: {coop['origins']}")
    assert coop_a <= 0.15 * trad_a, f"cooperative took {coop_a} B from nodeA, " \
                                    f"traditional {trad_a} B"
    new_part = VOLUME_MB * 50_000  # random, so incompressible: it must come from nodeA
    assert coop_a >= new_part, "the new 5 % can only come from the source"
    remove_everywhere(lab.docker, ["coop", "trad"], ["coop-rw", "coop-ro", "trad-rw", "trad-ro"])


def test_a_neighbour_dying_mid_fetch_falls_back_to_the_source(lab: LabHandle,
                                                             registry: str) -> None:
    passed_through_c(lab, "coop")
    args = ["--registry", registry]
    hooks = "tests.agent_hooks"
    # nodeC dies after 3 of the snapshot's 20 chunks (1 MiB each): mid-fetch on any link
    Lab().restart_agent("nodeC", [*args, "--test-die-serving", "3"], hooks)
    Lab().restart_agent("nodeB", [*args, "--test-pause", "pre-copy=1"], hooks)
    report = migrate_json(*DELTA, "--from", "nodeA", "--to", "nodeB", "coop")
    assert not Lab().alive(Lab().state()["nodes"]["nodeC"]["agent_pid"],
                           str(Lab().node_dir("nodeC") / "agent")), "nodeC did not die serving"
    check_same_result(lab, "coop", report)
    basis = [t for t in report["transfers"] if t["kind"] == "volume snapshot basis"]
    snap = [t for t in report["transfers"]
            if t["kind"] == "volume snapshot" and t["item"] == "coop-rw" and
            t["phase"] == "PRE_COPY"]
    assert basis == [] and snap[0]["origin"] == "nodeA" and snap[0]["method"] == "whole"
    Lab().restart_agent("nodeC", extra_args=args)
    Lab().restart_agent("nodeB", extra_args=args)
    remove_everywhere(lab.docker, ["coop"], ["coop-rw", "coop-ro"])


def test_stale_or_corrupted_copies_are_never_used_unverified(lab: LabHandle,
                                                            registry: str) -> None:
    passed_through_c(lab, "coop")
    cache = Lab().node_dir("nodeC") / "agent" / "cache"
    corrupted = 0
    for f in cache.iterdir():
        if f.stat().st_size > 4096:
            with f.open("r+b") as fh:
                fh.seek(f.stat().st_size // 2)
                fh.write(b"\xff" * 64)
            corrupted += 1
    assert corrupted >= 2  # the volume snapshot and the checkpoint, at least
    report = migrate_json(*DELTA, "--from", "nodeA", "--to", "nodeB", "coop")
    check_same_result(lab, "coop", report)
    used_from_c = [t for t in report["transfers"]
                   if t["origin"] == "nodeC" and t["kind"] != "layer"]
    assert used_from_c == [], f"corrupted copies were used: {used_from_c}"
    ro = volume_file(lab.docker["nodeB"], "coop-ro", "file")
    assert ro.decode().strip() == "read-only content"
    remove_everywhere(lab.docker, ["coop"], ["coop-rw", "coop-ro"])
