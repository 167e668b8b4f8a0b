"""`migctl evacuate` on the real 3-node lab (client/fleet.py): a node of ten containers, one
of which cannot move (a bind mount), is emptied onto the two others. The nine run once each,
on nodeB or nodeC, with their state intact; the tenth still runs on nodeA and is named with its
reason; the exit status says not everything moved. A run interrupted midway is finished by
the next one."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import docker
import pytest

from migctl.lab.nodes import LAN_NETWORK
from migctl.lab.workloads import (
    BASE,
    crowd_volumes,
    numbers,
    remove_everywhere,
    run_crowd,
    wait_for_redis,
)
from tests.conftest import CACHE, DELTA, ROOT, LabHandle, migctl, session_links

COUNTERS = [f"evac-count{i}" for i in range(5)]  # busybox, each counting into its volume
TOYS = [f"evac-toy{i}" for i in range(3)]  # the seed's toy image, counting the same way
REDIS = "evac-redis"  # on `lan`: its address moves with it, and so do its keys
BIND = "evac-bind"  # a bind mount ties it to nodeA
MOVABLE = [*COUNTERS, *TOYS, REDIS]
VOLUMES = crowd_volumes(COUNTERS, TOYS)


@pytest.fixture
def crowded(lab: LabHandle) -> Iterator[dict]:
    """nodeA with the ten containers; the Redis address, and the bind mount's folder."""
    names = [*MOVABLE, BIND]
    remove_everywhere(lab.docker, names, VOLUMES)
    a = lab.docker["nodeA"]
    addresses = run_crowd(a, CACHE, COUNTERS, TOYS, [REDIS], 0, LAN_NETWORK)
    with tempfile.TemporaryDirectory() as host_dir:
        a.containers.run(BASE, ["sh", "-c", "while true; do date >> /host/log; sleep 1; done"],
                         name=BIND, detach=True, volumes={host_dir: {"bind": "/host",
                                                                     "mode": "rw"}})
        time.sleep(3)  # every counter has counted
        yield {"redis": addresses[REDIS]}
        remove_everywhere(lab.docker, names, VOLUMES)


def running_on(lab: LabHandle, name: str) -> list[str]:
    return [node for node, client in lab.docker.items()
            if any(c.name == name and c.status == "running"
                   for c in client.containers.list(filters={"name": name}))]


def counted(client: docker.DockerClient, name: str) -> list[int]:
    out = client.containers.get(name).exec_run(["cat", "/testrw/counter"])
    assert out.exit_code == 0, out.output
    return numbers(out.output.decode())


def check_moved(lab: LabHandle, crowded: dict) -> None:
    """Each movable container runs once, off nodeA, with its state; the bind one on nodeA."""
    for name in MOVABLE:
        where = running_on(lab, name)
        assert len(where) == 1 and where[0] in ("nodeB", "nodeC"), (name, where)
    for name in [*COUNTERS, *TOYS]:
        client = lab.docker[running_on(lab, name)[0]]
        before = counted(client, name)
        time.sleep(2.2)
        after = counted(client, name)
        assert after == list(range(len(after))), f"{name} restarted or skipped: {after}"
        assert len(after) > len(before), f"{name} stopped counting: {after}"
    db = wait_for_redis(crowded["redis"])
    assert db.get("evacuated") == b"with its state"
    assert running_on(lab, BIND) == ["nodeA"]


def test_evacuate_moves_the_nine_and_names_the_one_that_stays(lab: LabHandle,
                                                              crowded: dict) -> None:
    planned = json.loads(migctl("evacuate", "nodeA", "--dry-run", "--json",
                                check=False).stdout)
    by_name = {m["container"]: m for m in planned}
    assert set(by_name) >= {*MOVABLE, BIND}
    assert all(by_name[n]["destination"] in ("nodeB", "nodeC") for n in MOVABLE), planned
    assert by_name[BIND]["state"] == "stays" and "bind" in by_name[BIND]["reason"]
    assert {by_name[n]["destination"] for n in MOVABLE} == {"nodeB", "nodeC"}, \
        "the plan put everything on one node"

    done = migctl("evacuate", "nodeA", *DELTA, check=False)
    assert done.returncode == 1, done.stdout + done.stderr  # not everything moved
    assert f"{BIND}" in done.stdout and "bind" in done.stdout, done.stdout
    assert "9 of 10 moved off nodeA" in done.stdout, done.stdout
    check_moved(lab, crowded)


def test_an_interrupted_evacuation_is_finished_by_the_next_run(lab: LabHandle,
                                                               crowded: dict) -> None:
    """Interrupted after its first move, one at a time: what was under way goes on in its
    destination's agent; the next run follows it and moves the rest."""
    cmd = [sys.executable, "-m", "migctl.client.cli", "evacuate", "nodeA", "--parallel", "1",
           *DELTA]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        if any(running_on(lab, n) != ["nodeA"] for n in MOVABLE):
            break
        time.sleep(0.5)
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=120)
    left = [n for n in MOVABLE if running_on(lab, n) == ["nodeA"]]
    assert left, "the first run finished before it was interrupted: nothing left to test"
    again = migctl("evacuate", "nodeA", *DELTA, check=False)
    said = re.search(r"(\d+) of (\d+) moved off nodeA", again.stdout)
    assert said, again.stdout + again.stderr
    moved, listed = int(said[1]), int(said[2])
    assert moved == listed - 1 >= len(left), again.stdout  # all but the bind one
    check_moved(lab, crowded)


def test_a_cancel_during_pre_copy_leaves_the_container_where_it_was(
        lab: LabHandle, request: pytest.FixtureRequest) -> None:
    """On real engines and CRIU: a migration of a Redis with 200 MB, cancelled while its
    pre-copy runs, is aborted; it runs on nodeA only, with its data, and nothing of it stays on
    nodeB. The link is shaped to 100 Mbit/s for it, so that the pre-copy lasts seconds on any
    machine (the session's shaping is put back after the test)."""
    from migctl.lab import net as labnet
    from migctl.lab.nodes import Lab

    name = "cancel-redis"
    remove_everywhere(lab.docker, [name], [])
    addresses = run_crowd(lab.docker["nodeA"], CACHE, [], [], [name], 200, LAN_NETWORK)
    state = Lab().state()
    labnet.set_link(state, "nodeA", "nodeB", labnet.LinkSpec(rate="100mbit"))
    Lab().save(state)
    try:
        cmd = [sys.executable, "-m", "migctl.client.cli", "migrate", "--json", *DELTA,
               "--from", "nodeA", "--to", "nodeB", name]
        moving = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        said, deadline = "", time.monotonic() + 120
        while time.monotonic() < deadline and not said:
            watch = migctl("watch", "--once").stdout.split("\n")
            row = next((line.split() for line in watch
                        if " nodeB " in f" {line} " and "destination" in line
                        and "pre-copy" in line), None)
            if row:
                said = migctl("cancel", row[0]).stdout
            time.sleep(0.1)
        _, err = moving.communicate(timeout=120)
        assert "aborted" in said, said
        assert moving.returncode != 0 and "cancelled by the operator" in err, err
        assert running_on(lab, name) == ["nodeA"]
        assert not lab.docker["nodeB"].containers.list(all=True, filters={"name": name})
        assert wait_for_redis(addresses[name]).get("evacuated") == b"with its state"
    finally:
        session_links(request.config.getoption("--lab-link-rate"))
        remove_everywhere(lab.docker, [name], [])
