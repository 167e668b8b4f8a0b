"""Post-copy on the real lab (`--memory-transfer post-copy`, docs/runtime.md): a Redis starts
at the destination before its memory arrived and faults it in from the source. Its data must
all be there afterwards; and whatever fails while the pages still arrive (the source's agent,
the destination's agent, the link), exactly one copy runs at the end, with every key.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migctl.lab import net as labnet
from migctl.lab.nodes import Lab
from migctl.lab.workloads import REDIS_IMAGE, ensure_redis_image, fill_redis, remove_everywhere
from tests.conftest import CACHE, ROOT, LabHandle, migctl, migrate_json, names_its_transfer
from tests.test_faults import kill_agent, link

pytestmark = pytest.mark.lab

NAME = "pc-redis"
PORT = 16380  # not Redis's own: a benchmark's Redis may hold that one
POST_COPY = ["--mode", "traditional", "--memory-transfer", "post-copy"]


def ask(host: str, *cmd: str, timeout: float = 5) -> bytes:
    with socket.create_connection((host, PORT), timeout=timeout) as s:
        s.sendall(b"*%d\r\n" % len(cmd) + b"".join(
            b"$%d\r\n%s\r\n" % (len(c), c.encode()) for c in cmd))
        return s.recv(4096)


def count(answer: bytes) -> int:
    assert answer.startswith(b":"), answer
    return int(answer[1:].split(b"\r\n")[0])


def host(lab: LabHandle, node: str) -> str:
    return lab.address(node).split(":")[0]


@pytest.fixture
def redis(lab: LabHandle) -> Iterator[int]:
    """A Redis on nodeA with 40 MB of data (40 000 keys) and one known key; yields DBSIZE."""
    remove_everywhere(lab.docker, [NAME], [])
    ensure_redis_image(lab.docker["nodeA"], CACHE)
    lab.docker["nodeA"].containers.run(REDIS_IMAGE, name=NAME, detach=True,
                                       ports={"6379/tcp": PORT})
    fill_redis(host(lab, "nodeA"), 40, PORT)
    ask(host(lab, "nodeA"), "SET", "kept", "across the move")
    yield count(ask(host(lab, "nodeA"), "DBSIZE"))
    for node in ("nodeA", "nodeB"):  # agents back to normal, faults undone
        Lab().restart_agent(node)
    link("p-nodeA", "up")
    labnet.reset(Lab().state(), "nodeA", "nodeB")
    remove_everywhere(lab.docker, [NAME], [])


def copies(lab: LabHandle) -> dict[str, str]:
    """Where a copy is up, and how: "running" or "paused" (a post-copy source keeps one)."""
    out = {}
    for node, client in lab.docker.items():
        for c in client.containers.list(all=True):
            if c.name == NAME and c.status in ("running", "paused"):
                out[node] = c.status
    return out


def wait_one_running(lab: LabHandle, timeout: float = 120) -> str:
    """Exactly one copy up, running (not paused), stable for a moment; its node."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = copies(lab)
        assert list(now.values()).count("running") <= 1, f"two copies run: {now}"
        if list(now.values()) == ["running"]:
            time.sleep(1.5)
            if copies(lab) == now:
                return next(iter(now))
        time.sleep(0.5)
    raise AssertionError(f"no single running copy after {timeout} s: {copies(lab)}")


def test_post_copy_moves_redis_with_every_key(lab: LabHandle, redis: int) -> None:
    before = count(ask(host(lab, "nodeA"), "INCR", "n"))
    keys = redis + 1  # and "n"
    report = migrate_json(*POST_COPY, "--from", "nodeA", "--to", "nodeB", NAME)
    assert report["memory_transfer"] == "post-copy"
    assert report["pages_seconds"] > 0
    pages = [t for t in report["transfers"] if t["item"] == "final: memory pages"]
    assert pages and pages[0]["bytes"] > 40e6, report["transfers"]
    assert "PAGE_IN" in [p["phase"] for p in report["phases"]]
    # no memory checkpoint before the freeze: the pages come after the restore
    assert not [t for t in report["transfers"] if t["item"].startswith("pre")]
    b = host(lab, "nodeB")
    assert count(ask(b, "DBSIZE")) == keys
    assert ask(b, "GET", "kept") == b"$15\r\nacross the move\r\n"
    assert count(ask(b, "INCR", "n")) == before + 1  # it goes on from its own memory
    assert copies(lab) == {"nodeB": "running"}  # the paused source was killed at the end


def start(args: list[str]) -> tuple[subprocess.Popen, list[str]]:
    names_its_transfer(["migrate", *args])
    proc = subprocess.Popen([sys.executable, "-m", "migctl.client.cli", "migrate", *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    return proc, lines


def wait_for(lines: list[str], text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in lines):
        assert proc.poll() is None or any(text in line for line in lines), \
            f"it ended before {text!r}:\n{''.join(lines)}"
        assert time.monotonic() < deadline, f"never saw {text!r}:\n{''.join(lines)}"
        time.sleep(0.05)


@pytest.mark.parametrize("fault", ["kill-source-agent", "kill-destination-agent", "cut-link"])
def test_a_fault_while_pages_arrive_leaves_one_copy_with_every_key(
        lab: LabHandle, redis: int, fault: str) -> None:
    """The link is slowed to 40 Mbit/s, so the 40 MB of pages take ~8 s to arrive after the
    restore; the fault strikes then. The copy at the destination is incomplete: it is removed
    (its lazy-pages daemon stopped only after that), and the source, paused since the freeze,
    goes on from there; a cut link that comes back may instead let the transfer finish. Either
    way one copy runs, with every key."""
    keys = redis
    labnet.set_link(Lab().state(), "nodeA", "nodeB", labnet.LinkSpec(rate="40mbit"))
    proc, lines = start([*POST_COPY, "--from", "nodeA", "--to", "nodeB", NAME])
    wait_for(lines, "▶ page-in", proc)
    {"kill-source-agent": kill_agent("nodeA"), "kill-destination-agent": kill_agent("nodeB"),
     "cut-link": lambda: link("p-nodeA", "down")}[fault]()
    if fault == "cut-link":
        threading.Timer(20, link, ("p-nodeA", "up")).start()
    proc.wait(timeout=300)
    time.sleep(0.2)
    out = "".join(lines)
    assert "Traceback" not in out, out
    if fault.startswith("kill"):
        assert proc.returncode == 1, out
        Lab().restart_agent("nodeA" if "source" in fault else "nodeB")
    node = wait_one_running(lab)
    if fault.startswith("kill"):
        assert node == "nodeA", out  # the copy that was still paging in is gone
    h = host(lab, node)
    assert count(ask(h, "DBSIZE")) == keys, f"keys lost on {node}:\n{out}"
    assert ask(h, "GET", "kept") == b"$15\r\nacross the move\r\n"
    if node == "nodeA":
        assert NAME not in [c.name for c in lab.docker["nodeB"].containers.list(all=True)]
        staging = str(Lab().node_dir("nodeB") / "agent" / "staging")
        leftovers = subprocess.run(["pgrep", "-af", staging], capture_output=True,
                                   text=True).stdout
        assert not leftovers, f"the lazy-pages daemon or its guard still runs: {leftovers}"


def test_a_node_without_post_copy_is_refused_before_the_freeze(lab: LabHandle,
                                                               redis: int) -> None:
    """Asked for where it cannot run, post-copy is refused by name before anything stops: here
    the source's CRIU could not size its page server's pipes."""
    pipe = Path("/proc/sys/fs/pipe-max-size")
    old = pipe.read_text().strip()
    try:
        pipe.write_text("1048576")
        from migctl.agent.runtime.direct import pipe_size_problem

        if not pipe_size_problem():
            pytest.skip("this agent has CAP_SYS_RESOURCE: the pipe size is no limit here")
        res = migctl("migrate", *POST_COPY, "--from", "nodeA", "--to", "nodeB", NAME, check=False)
    finally:
        pipe.write_text(old)
    assert res.returncode == 1
    assert "no post-copy for this migration: nodeA: fs.pipe-max-size is 1048576" in res.stderr
    assert copies(lab) == {"nodeA": "running"}
    assert count(ask(host(lab, "nodeA"), "DBSIZE")) == redis


def test_a_restore_that_fails_after_the_commit_unpauses_the_source(lab: LabHandle,
                                                                   redis: int) -> None:
    """The destination's images are damaged after the commit: its lazy-pages daemon or its
    restore fails. The source's CRIU is ended (not killed: a killed CRIU would leave the
    container thawed while still marked paused), the container is unpaused, takes new
    connections again, and has every key."""
    from tests.test_faults import HOOKS, PAUSE

    source_log = Lab().node_dir("nodeA") / "agent.log"
    seen = source_log.stat().st_size
    Lab().restart_agent("nodeB", ["--test-pause", f"restoring={PAUSE}"], HOOKS)
    proc, lines = start([*POST_COPY, "--from", "nodeA", "--to", "nodeB", NAME])
    wait_for(lines, "paused before restoring", proc)
    staging = Lab().node_dir("nodeB") / "agent" / "staging"
    for inventory in staging.glob("*/checkpoints/final/inventory.img"):
        inventory.write_bytes(b"garbage")
    proc.wait(timeout=300)
    time.sleep(0.2)
    out = "".join(lines)
    assert proc.returncode == 1, out
    assert "runs again on nodeA (unpaused" in out, out
    assert wait_one_running(lab) == "nodeA"
    a = host(lab, "nodeA")
    assert count(ask(a, "DBSIZE")) == redis  # over the network: it takes connections again
    assert ask(a, "GET", "kept") == b"$15\r\nacross the move\r\n"
    with source_log.open() as f:
        f.seek(seen)
        assert "did not end" not in f.read(), "CRIU had to be killed"
