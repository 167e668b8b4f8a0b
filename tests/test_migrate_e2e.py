"""End to end on the real lab: real engines, real CRIU checkpoints, real gRPC between agents."""

from __future__ import annotations

import contextlib
import json
import socket
import time

import docker
import pytest

from migctl.lab.workloads import (
    BASE,
    SERVER,
    TOY_IMAGE,
    ensure_base,
    ensure_toy_image,
    numbers,
    remove_everywhere,
    run_toy,
)
from tests.conftest import CACHE, DELTA, LabHandle, migctl, migrate_json

pytestmark = pytest.mark.lab


def logs(client: docker.DockerClient, name: str) -> list[int]:
    return numbers(client.containers.get(name).logs().decode())


def counter_file(client: docker.DockerClient, name: str) -> list[int]:
    out = client.containers.get(name).exec_run(["cat", "/testrw/counter"])
    assert out.exit_code == 0, out.output
    return numbers(out.output.decode())


def wait_for_count(client: docker.DockerClient, name: str, at_least: int,
                   timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = logs(client, name)
        if len(seen) >= at_least:
            return seen
        time.sleep(0.2)
    raise AssertionError(f"{name} printed only {logs(client, name)} in {timeout} s")


def check_moved(lab: LabHandle, src: str, dst: str, report: dict) -> None:
    """The count goes on at DST from where SRC stopped, and the volumes came along."""
    source, dest = lab.docker[src], lab.docker[dst]
    old = source.containers.get("toytsm")
    assert old.status == "exited", f"source container should be stopped, is {old.status}"
    last_at_source = logs(source, "toytsm")[-1]
    new = dest.containers.get("toytsm")
    assert new.id == report["new_container_id"]
    assert new.status == "running"
    continued = wait_for_count(dest, "toytsm", 3)
    assert continued[0] == last_at_source + 1, (
        f"count restarted: source ended at {last_at_source}, destination began at "
        f"{continued[0]}")
    assert continued == list(range(continued[0], continued[0] + len(continued)))
    history = counter_file(dest, "toytsm")
    assert history[: last_at_source + 1] == list(range(last_at_source + 1)), \
        "the counter file lost its history"
    assert history == list(range(len(history)))
    ro = new.exec_run(["cat", "/testro/file"])
    assert ro.output.decode().strip() == "read-only content"
    assert new.exec_run(["sh", "-c", "echo x > /testro/file"]).exit_code != 0, \
        "the read-only volume must stay read-only"
    assert new.exec_run(["wc", "-l", "/lines.txt"]).output.split()[0] == b"1000"
    assert report["downtime_seconds"] > 0
    assert report["total_seconds"] >= report["downtime_seconds"]
    phases = [p["phase"] for p in report["phases"]]
    assert phases == ["REQUEST", "PRE_COPY", "FREEZE", "FINAL_SYNC", "RESTORE"]
    final = report["phases"][3]
    final_transfers = [t for t in report["transfers"] if t["phase"] == "FINAL_SYNC"]
    assert {t["method"] for t in final_transfers} == {"delta"}, final_transfers
    assert final["matched_bytes"] > final["literal_bytes"], \
        "the second pass must mostly rebuild from what pre-copy brought"
    assert final["bytes"] < final["matched_bytes"]


def test_toy_migrates_there_and_back(lab: LabHandle) -> None:
    a, b = lab.docker["nodeA"], lab.docker["nodeB"]
    remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])
    for client in lab.docker.values():
        for img in (TOY_IMAGE, BASE):
            with contextlib.suppress(docker.errors.ImageNotFound):
                client.images.remove(img, force=True)
    ensure_toy_image(a, CACHE)
    run_toy(a)
    wait_for_count(a, "toytsm", 4)

    report = migrate_json(*DELTA, "--from", "nodeA", "--to", "nodeB", "toytsm")
    check_moved(lab, "nodeA", "nodeB", report)
    assert b.images.get(TOY_IMAGE).id == a.images.get(TOY_IMAGE).id
    assert b.volumes.get("testrw").attrs["Labels"] == a.volumes.get("testrw").attrs["Labels"]
    sent = {t["item"] for t in report["transfers"] if t["kind"] == "volume snapshot"}
    assert sent == {"testrw", "testro"}

    wait_for_count(b, "toytsm", 6)
    back = migrate_json(*DELTA, "--from", "nodeB", "--to", "nodeA", "toytsm")
    check_moved(lab, "nodeB", "nodeA", back)
    layer_bytes = sum(t["bytes"] for t in back["transfers"] if t["kind"] == "layer")
    assert layer_bytes == 0, "nodeA holds every layer already"
    remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])


def test_layers_the_destination_has_are_not_sent(lab: LabHandle) -> None:
    a, b = lab.docker["nodeA"], lab.docker["nodeC"]
    remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])
    for client in (a, b):
        for img in (TOY_IMAGE, BASE):
            with contextlib.suppress(docker.errors.ImageNotFound):
                client.images.remove(img, force=True)
    ensure_toy_image(a, CACHE)
    ensure_base(b, CACHE)  # nodeC holds the base layer, not the toy's own layer
    base_layer, toy_layer = a.images.get(TOY_IMAGE).attrs["RootFS"]["Layers"]
    run_toy(a)
    wait_for_count(a, "toytsm", 2)

    report = migrate_json(*DELTA, "--from", "nodeA", "--to", "nodeC", "toytsm")
    layers = [t for t in report["transfers"] if t["kind"] == "layer"]
    skipped = {t["item"] for t in layers if t["method"] == "skipped"}
    assert skipped == {base_layer}
    sent = [t for t in layers if t["method"] != "skipped"]
    assert len(sent) == 1 and sent[0]["item"] == toy_layer
    base_size = CACHE.joinpath("busybox-rootfs.tar").stat().st_size
    assert 0 < sent[0]["bytes"] < base_size / 4, "the base layer must not travel"
    assert b.images.get(TOY_IMAGE).attrs["RootFS"]["Layers"] == [base_layer, toy_layer]
    assert b.containers.get("toytsm").status == "running"
    remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])


def hit(address: str, hold: bool = False) -> tuple[int, socket.socket | None]:
    """One request to the server; with HOLD the connection is kept open afterwards."""
    deadline = time.monotonic() + 20
    while True:
        try:
            s = socket.create_connection((address, 8080), timeout=5)
            data = b""
            while b"\n" not in data:
                chunk = s.recv(100)
                if not chunk:
                    break
                data += chunk
            if data.startswith(b"hits="):
                if hold:
                    return int(data[5:].strip()), s
                s.close()
                return int(data[5:].strip()), None
            s.close()
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"the server at {address}:8080 does not answer")
        time.sleep(0.2)


@pytest.mark.parametrize("memory,expected", [("delta", "delta"),
                                             ("page-server", "page server")])
def test_server_with_connected_client_keeps_its_memory(lab: LabHandle, memory: str,
                                                       expected: str) -> None:
    a, b = lab.docker["nodeA"], lab.docker["nodeB"]
    remove_everywhere(lab.docker, ["hitserver"], [])
    ensure_base(a, CACHE)
    a.containers.run(BASE, ["sh", "-c", SERVER], name="hitserver", detach=True,
                     ports={"8080/tcp": 8080})
    addr_a = lab.address("nodeA").split(":")[0]
    assert [hit(addr_a)[0] for _ in range(3)] == [1, 2, 3]
    held, conn = hit(addr_a, hold=True)  # a client connected during both checkpoints
    assert held == 4
    try:
        report = migrate_json("--memory-transfer", memory, "--from", "nodeA", "--to", "nodeB",
                              "hitserver")
    finally:
        assert conn is not None
        conn.close()
    assert report["memory_transfer"] == expected
    assert b.containers.get("hitserver").id == report["new_container_id"]
    assert a.containers.get("hitserver").status == "exited"  # killed, if it was paused
    addr_b = lab.address("nodeB").split(":")[0]
    after = hit(addr_b)[0]
    assert after == 5, f"the server forgot its state: hit {after} after 4"
    assert hit(addr_b)[0] == 6
    remove_everywhere(lab.docker, ["hitserver"], [])


def test_bad_input_gets_a_clear_error_and_the_container_keeps_running(
        lab: LabHandle, tmp_path) -> None:
    a = lab.docker["nodeA"]
    remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])
    ensure_toy_image(a, CACHE)
    run_toy(a)

    res = migctl("migrate", *DELTA, "--from", "nodeA", "--to", "nodeB", "no-such-container",
                 check=False)
    assert res.returncode == 1
    assert "no-such-container" in res.stderr and "nodeA" in res.stderr
    assert "Traceback" not in res.stderr

    res = migctl("migrate", *DELTA, "--from", "nodeA", "--to", "nodeZ", "toytsm", check=False)
    assert res.returncode == 1 and "unknown node 'nodeZ'" in res.stderr

    inventory = json.loads(migctl("lab", "env", "nodeA").stdout and
                           (CACHE.parent / "inventory.json").read_text())
    inventory["nodes"]["nodeDead"] = {"address": "127.0.0.1:1"}
    bad = tmp_path / "inventory.json"
    bad.write_text(json.dumps(inventory))
    for args in (["--from", "nodeDead", "--to", "nodeB"], ["--from", "nodeA", "--to", "nodeDead"]):
        res = migctl("migrate", *DELTA, *args, "toytsm", check=False, inventory=bad)
        assert res.returncode == 1
        assert "cannot reach the agent of nodeDead at 127.0.0.1:1" in res.stderr, res.stderr

    a.containers.get("toytsm").reload()
    assert a.containers.get("toytsm").status == "running"
    assert "toytsm" not in [c.name for c in lab.docker["nodeB"].containers.list(all=True)]
    remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])


SHRINK_PORT = 16379  # not Redis's own: a benchmark's Redis may hold that one


def test_a_service_that_shrank_migrates_though_the_cached_basis_is_far_larger(
        lab: LabHandle) -> None:
    """The destination caches a service's checkpoint; the next time the service is much
    smaller, that basis's signature is more than the source accepts for the new file
    (signature_block_cap). The file then comes whole: the migration must not fail on it."""
    from migctl.lab.workloads import REDIS_IMAGE, ensure_redis_image, fill_redis, wait_for_redis

    a, b = lab.docker["nodeA"], lab.docker["nodeB"]
    host_a, host_b = (lab.address(n).split(":")[0] for n in ("nodeA", "nodeB"))
    remove_everywhere(lab.docker, ["shrink"], [])
    ensure_redis_image(a, CACHE)
    a.containers.run(REDIS_IMAGE, name="shrink", detach=True,
                     ports={"6379/tcp": SHRINK_PORT})
    fill_redis(host_a, 90, SHRINK_PORT)  # a ~100 MB checkpoint: over the 64 MiB always accepted
    # what the destination's pre-flight checks and `migctl plan` counts: the processes' memory
    from migctl.agent.runtime.docker import DockerRuntime

    memory = DockerRuntime(lab.nodes["nodeA"]["docker_host"]).describe("shrink").memory_bytes
    assert 90e6 <= memory <= 200e6, memory
    migrate_json(*DELTA, "--mode", "traditional", "--from", "nodeA", "--to", "nodeB", "shrink")
    remove_everywhere(lab.docker, ["shrink"], [])  # nodeB's cache keeps the checkpoint

    a.containers.run(REDIS_IMAGE, name="shrink", detach=True,
                     ports={"6379/tcp": SHRINK_PORT})
    wait_for_redis(host_a, SHRINK_PORT).set("kept", "across the move")
    report = migrate_json(*DELTA, "--mode", "traditional", "--from", "nodeA", "--to", "nodeB",
                          "shrink")
    basis = [t for t in report["transfers"] if t["kind"] == "checkpoint basis"]
    assert basis and basis[0]["origin"] == "nodeB", report["transfers"]  # the big one was found
    assert b.containers.get("shrink").status == "running"
    assert wait_for_redis(host_b, SHRINK_PORT).get("kept") == b"across the move"
    remove_everywhere(lab.docker, ["shrink"], [])
