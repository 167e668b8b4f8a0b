"""The fault matrix on the real lab: whatever fails, exactly one copy of the container runs
afterwards, its volume is intact, its count goes on, and `migctl` says what went wrong.

Faults are injected while the destination agent pauses before a journal step
(tests/agent_hooks.py, --test-pause): `pre-copy` is before anything was copied,
`transferring-final` is right after the freeze (the source container is stopped, or paused
when its memory went to a page server or stays there for post-copy), `restoring` is after the
commit, with the new container created and not yet started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import psutil
import pytest

from migctl.lab.nodes import SWITCH_NS, Lab
from migctl.lab.workloads import (
    BASE,
    SERVER,
    ensure_base,
    ensure_toy_image,
    numbers,
    remove_everywhere,
    run_toy,
)
from tests.conftest import CACHE, DELTA, ROOT, LabHandle, migctl, names_its_transfer

pytestmark = pytest.mark.lab

PAUSE = 6.0
HOOKS = "tests.agent_hooks"  # the agent with test hooks


def running_copies(lab: LabHandle, name: str = "toytsm") -> list[str]:
    return [node for node, client in lab.docker.items()
            if any(c.name == name and really_running(c) for c in client.containers.list())]


def really_running(c: docker.models.containers.Container) -> bool:
    """The engine lists a container as running until it has handled its exit (0.2 s after
    a final checkpoint here): its process must exist too. A paused one (the source whose
    memory went to a page server) is frozen, not running."""
    try:
        if c.attrs["State"].get("Paused"):
            return False
        return psutil.Process(c.attrs["State"]["Pid"]).status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, KeyError, ValueError):
        return False


def agent_log(node: str, since: int = 0) -> str:
    """What NODE's agent logged after byte SINCE (its size when the test began: the log
    holds every earlier test's lines too)."""
    with open(Lab().node_dir(node) / "agent.log", "rb") as f:
        f.seek(since)
        return f.read().decode(errors="replace")


def agent_log_size(node: str) -> int:
    return (Lab().node_dir(node) / "agent.log").stat().st_size


def wait_one_copy(lab: LabHandle, timeout: float = 90) -> str:
    """Exactly one running copy, stable for a moment; returns the node it runs on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        copies = running_copies(lab)
        if len(copies) == 1:
            time.sleep(1.5)
            if running_copies(lab) == copies:
                return copies[0]
        assert len(copies) <= 1, f"two copies run: {copies}"
        time.sleep(0.5)
    raise AssertionError(f"no single running copy after {timeout} s: {running_copies(lab)}")


def assert_intact_and_counting(client: docker.DockerClient, node: str = "nodeA") -> None:
    c = client.containers.get("toytsm")
    history = numbers(c.exec_run(["cat", "/testrw/counter"]).output.decode())
    why = [line for line in (Lab().node_dir(node) / "agent.log").read_text().splitlines()
           if "resum" in line or "restor" in line][-6:]  # what the source said, if it failed
    assert history == list(range(len(history))), \
        "the counter file lost or repeated lines; the agent of " + node + " said:\n" + \
        "\n".join(why)
    time.sleep(2.5)
    later = numbers(c.exec_run(["cat", "/testrw/counter"]).output.decode())
    assert len(later) > len(history) and later[: len(history)] == history, "it stopped counting"


def start_migration(extra: list[str]) -> tuple[subprocess.Popen, list[str]]:
    names_its_transfer(["migrate", *extra])
    proc = subprocess.Popen(
        [sys.executable, "-m", "migctl.client.cli", "migrate", "--from", "nodeA", "--to", "nodeB",
         *extra, "toytsm"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    return proc, lines


def wait_for_line(lines: list[str], text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in lines):
        assert time.monotonic() < deadline, f"never saw {text!r}:\n{''.join(lines)}"
        time.sleep(0.1)


def finish(proc: subprocess.Popen, lines: list[str]) -> str:
    proc.wait(timeout=300)
    time.sleep(0.2)
    return "".join(lines)


@pytest.fixture
def toy(lab: LabHandle) -> Iterator[None]:
    lab_ctl = Lab()
    remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])
    ensure_toy_image(lab.docker["nodeA"], CACHE)
    run_toy(lab.docker["nodeA"])
    time.sleep(2)
    yield
    for node in ("nodeA", "nodeB"):  # agents back to normal, faults undone
        lab_ctl.restart_agent(node)
    link("p-nodeA", "up")
    remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])


def link(port: str, state: str) -> None:
    subprocess.run(["ip", "netns", "exec", SWITCH_NS, "ip", "link", "set", port, state],
                   check=True)


def kill_agent(node: str) -> Callable[[], None]:
    def inject() -> None:
        pid = Lab().state()["nodes"][node]["agent_pid"]
        os.kill(pid, signal.SIGKILL)
    return inject


def fill_disk(lab: LabHandle) -> Callable[[], None]:
    def inject() -> None:
        staging = Lab().node_dir("nodeB") / "agent" / "staging"
        with open(staging / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass
    return inject


@pytest.fixture
def small_staging(lab: LabHandle) -> Iterator[Path]:
    staging = Lab().node_dir("nodeB") / "agent" / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "migctl-test-full", str(staging)],
                   check=True)
    try:
        yield staging
    finally:
        subprocess.run(["umount", "-l", str(staging)], check=False)


CASES = ["kill-source-agent", "kill-destination-agent", "cut-link", "fill-disk"]


# before the freeze (where the memory has not travelled yet, so any named transfer does), the
# freeze and after it, every way the final checkpoint's memory can travel (post-copy's faults
# while its pages arrive are in tests/test_postcopy.py)
WHEN = [("pre-copy", "delta"), ("transferring-final", "delta"),
        ("transferring-final", "page-server"), ("transferring-final", "post-copy")]


@pytest.mark.parametrize("when,memory", WHEN, ids=[f"{w}-{m}" for w, m in WHEN])
@pytest.mark.parametrize("fault", CASES)
def test_fault_leaves_exactly_one_running_copy(lab: LabHandle, toy: None, request,
                                               fault: str, when: str, memory: str) -> None:
    if fault == "fill-disk":
        request.getfixturevalue("small_staging")
    inject = {"kill-source-agent": kill_agent("nodeA"),
              "kill-destination-agent": kill_agent("nodeB"),
              "cut-link": lambda: link("p-nodeA", "down"),
              "fill-disk": fill_disk(lab)}[fault]
    Lab().restart_agent("nodeB", ["--test-pause", f"{when}={PAUSE}"], HOOKS)
    proc, lines = start_migration(["--memory-transfer", memory])
    wait_for_line(lines, f"paused before {when}")
    inject()
    if fault == "cut-link":
        threading.Timer(25, link, ("p-nodeA", "up")).start()  # the link comes back later
    out = finish(proc, lines)
    assert proc.returncode == 1, out
    assert "migctl: error:" in out and "Traceback" not in out, out
    expected = {"kill-source-agent": "cannot reach the agent of nodeA",
                "kill-destination-agent": "cannot reach the agent of nodeB",
                "cut-link": "cannot reach the agent of nodeA",
                "fill-disk": "No space left on device"}[fault]
    # a full disk is found by the size check before a fetch, or by the write itself
    assert expected in out or (fault == "fill-disk" and "free for staging" in out), out

    if fault.startswith("kill"):  # the agent comes back and resolves what was in flight
        Lab().restart_agent("nodeA" if "source" in fault else "nodeB")
    node = wait_one_copy(lab)
    assert node == "nodeA"
    assert_intact_and_counting(lab.docker["nodeA"])
    assert "toytsm" not in [c.name for c in lab.docker["nodeB"].containers.list(all=True)]


def failed_restore(destination: str, args: list[str]) -> str:
    """A migration whose restore at DESTINATION fails after the commit (its final checkpoint
    is damaged while the destination pauses before restoring); its output."""
    Lab().restart_agent(destination, ["--test-pause", f"restoring={PAUSE}"], HOOKS)
    proc, lines = start_migration(args)
    wait_for_line(lines, "paused before restoring")
    staging = Lab().node_dir(destination) / "agent" / "staging"
    for inventory in staging.glob("*/checkpoints/final/inventory.img"):
        inventory.write_bytes(b"garbage")
    out = finish(proc, lines)
    assert proc.returncode == 1, out
    return out


@pytest.mark.parametrize("memory,resumed", [
    ("delta", "restored from its final checkpoint"),
    ("page-server", "unpaused: it goes on where it was paused for the final checkpoint")])
def test_restore_failure_after_the_commit_resumes_the_source(lab: LabHandle, toy: None,
                                                            memory: str, resumed: str) -> None:
    """The destination's restore fails (its checkpoint is damaged) after it committed: the
    source, told by the destination, resumes from its final checkpoint, or unpauses the
    container when its memory went to the page server."""
    out = failed_restore("nodeB", ["--memory-transfer", memory])
    assert "restore of container" in out, out
    assert f"runs again on nodeA ({resumed})" in out, out
    wait_one_copy(lab)
    before = numbers(lab.docker["nodeA"].containers.get("toytsm").logs().decode())
    assert before == list(range(len(before))), "the count restarted: memory was lost"
    assert_intact_and_counting(lab.docker["nodeA"])


def test_a_retry_after_a_failed_way_back_succeeds(lab: LabHandle, toy: None) -> None:
    """toytsm goes to nodeB, leaving its stopped copy on nodeA; the way back fails after the
    new container replaced that copy at nodeA (its restore fails). The volume nodeA keeps is
    an older copy of the same volume, now used by no container: a retry must not be refused
    for it (it was: "already has a volume named 'testrw' (used by no container)")."""
    migctl("migrate", *DELTA, "--from", "nodeA", "--to", "nodeB", "toytsm")
    out = failed_restore("nodeA", [*DELTA, "--from", "nodeB", "--to", "nodeA"])
    assert "runs again on nodeB" in out, out
    assert wait_one_copy(lab) == "nodeB"
    assert [c.name for c in lab.docker["nodeA"].containers.list(all=True)] == []
    Lab().restart_agent("nodeA")
    migctl("migrate", *DELTA, "--from", "nodeB", "--to", "nodeA", "toytsm")
    assert wait_one_copy(lab) == "nodeA"
    assert_intact_and_counting(lab.docker["nodeA"])


def test_someone_elses_volume_of_the_same_name_is_never_overwritten(
        lab: LabHandle, toy: None) -> None:
    """nodeB has a volume named as the container's, used by no container and never part of
    a migration: the migration is refused before anything is frozen, and its data stays."""
    b = lab.docker["nodeB"]
    b.volumes.create("testrw")
    ensure_toy_image(b, CACHE)
    b.containers.run("toytsm:1", ["sh", "-c", "echo mine > /v/data"], remove=True,
                     volumes={"testrw": {"bind": "/v", "mode": "rw"}})
    res = migctl("migrate", *DELTA, "--from", "nodeA", "--to", "nodeB", "toytsm", check=False)
    assert res.returncode == 1
    assert "nodeB already has a volume named 'testrw' (used by no container)" in res.stderr
    assert "freeze" not in res.stderr
    out = b.containers.run("toytsm:1", ["cat", "/v/data"], remove=True,
                           volumes={"testrw": {"bind": "/v", "mode": "ro"}})
    assert out.strip() == b"mine"
    assert running_copies(lab) == ["nodeA"]


def test_a_host_port_taken_at_the_destination_is_refused_before_the_freeze(
        lab: LabHandle) -> None:
    """The container publishes a host port that a container at nodeB already publishes: its
    restore there would fail after the freeze; the migration is refused before it, by name."""
    names = ["porty", "blocker"]
    remove_everywhere(lab.docker, names, [])
    try:
        for node, name in (("nodeA", "porty"), ("nodeB", "blocker")):
            ensure_base(lab.docker[node], CACHE)
            lab.docker[node].containers.run(BASE, ["sh", "-c", SERVER], name=name, detach=True,
                                            ports={"8080/tcp": 18080})
        res = migctl("migrate", *DELTA, "--from", "nodeA", "--to", "nodeB", "porty", check=False)
        assert res.returncode == 1, res.stderr
        assert "nodeB already uses host port 18080/tcp (used by blocker)" in res.stderr
        assert "freeze" not in res.stderr
        assert running_copies(lab, "porty") == ["nodeA"]
    finally:
        remove_everywhere(lab.docker, names, [])


def test_the_disk_check_refuses_before_the_freeze(lab: LabHandle, toy: None) -> None:
    staging = Lab().node_dir("nodeB") / "agent" / "staging"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "migctl-test-tiny", str(staging)],
                   check=True)
    try:
        res = migctl("migrate", *DELTA, "--from", "nodeA", "--to", "nodeB", "toytsm", check=False)
    finally:
        subprocess.run(["umount", "-l", str(staging)], check=False)
    assert res.returncode == 1
    assert "pre-flight check failed: nodeB has" in res.stderr and "staging" in res.stderr
    assert "freeze" not in res.stderr, "nothing may be frozen when the check fails"
    assert running_copies(lab) == ["nodeA"]


def test_two_migrations_of_one_container_are_refused(lab: LabHandle, toy: None) -> None:
    Lab().restart_agent("nodeB", ["--test-pause", f"pre-copy={PAUSE}"], HOOKS)
    proc, lines = start_migration(DELTA)
    wait_for_line(lines, "paused before pre-copy")
    to_b = migctl("migrate", *DELTA, "--from", "nodeA", "--to", "nodeB", "toytsm", check=False)
    to_c = migctl("migrate", *DELTA, "--from", "nodeA", "--to", "nodeC", "toytsm", check=False)
    out = finish(proc, lines)
    assert proc.returncode == 0, out
    assert to_b.returncode == 1 and "already being migrated" in to_b.stderr, to_b.stderr
    assert to_c.returncode == 1 and "already being migrated" in to_c.stderr, to_c.stderr
    assert wait_one_copy(lab) == "nodeB"


def test_five_concurrent_migrations_all_succeed(lab: LabHandle) -> None:
    names = [f"toy{i}" for i in range(5)]
    a = lab.docker["nodeA"]
    remove_everywhere(lab.docker, names, [f"rw{i}" for i in range(5)] +
                      [f"ro{i}" for i in range(5)])
    ensure_toy_image(a, CACHE)
    for i, name in enumerate(names):
        run_toy(a, name=name, rw=f"rw{i}", ro=f"ro{i}")
    time.sleep(3)
    procs = [subprocess.Popen([sys.executable, "-m", "migctl.client.cli", "migrate", *DELTA,
                               "--from", "nodeA", "--to", "nodeB", "-q", name], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in names]
    for name, p in zip(names, procs, strict=True):
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{name}: {err}"
    b = lab.docker["nodeB"]
    for name in names:
        c = b.containers.get(name)
        assert c.status == "running"
        history = numbers(c.exec_run(["cat", "/testrw/counter"]).output.decode())
        assert history == list(range(len(history))) and len(history) >= 3, name
        assert a.containers.get(name).status == "exited"
    remove_everywhere(lab.docker, names, [f"rw{i}" for i in range(5)] +
                      [f"ro{i}" for i in range(5)])


@pytest.mark.parametrize("memory", ["delta", "page-server"])
def test_the_source_resumes_by_itself_when_the_destination_vanishes(
        lab: LabHandle, toy: None, memory: str) -> None:
    """No agent is restarted, and the destination took no hold (the last resort): the source's
    lease on the frozen container (stopped, or paused for a page server) runs out and it
    resumes the container itself, since the destination never committed."""
    Lab().restart_agent("nodeA", extra_args=["--lease-seconds", "5"])
    Lab().restart_agent("nodeB", ["--test-no-hold", "--test-pause",
                                  f"transferring-final={PAUSE}"], HOOKS)
    since = agent_log_size("nodeA")
    proc, lines = start_migration(["--memory-transfer", memory])
    wait_for_line(lines, "paused before transferring-final")
    kill_agent("nodeB")()
    out = finish(proc, lines)
    assert proc.returncode == 1 and "cannot reach the agent of nodeB" in out, out
    assert wait_one_copy(lab) == "nodeA"
    assert_intact_and_counting(lab.docker["nodeA"])
    log = agent_log("nodeA", since)
    assert "no word from nodeB" in log


def test_a_rollback_through_the_engine_leaves_no_copy_of_memory_in_it(lab: LabHandle) -> None:
    """A container on plain runc checkpoints and resumes through the engine, which keeps its
    own copy of the checkpoint under containers/ID/checkpoints/: after a rollback, the memory
    (pages-*.img) stayed there (second red team). It must be gone once the source runs again."""
    from migctl.lab.workloads import COUNTER, TOY_IMAGE

    a = lab.docker["nodeA"]
    remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])
    ensure_toy_image(a, CACHE)
    a.volumes.create("testrw", labels={"rw-guid": f"guid-plain-{time.time_ns()}"})
    a.volumes.create("testro")
    c = a.containers.run(TOY_IMAGE, ["sh", "-c", COUNTER], name="toytsm", detach=True,
                         runtime="runc", volumes={"testrw": {"bind": "/testrw", "mode": "rw"},
                                                  "testro": {"bind": "/testro", "mode": "ro"}})
    time.sleep(2)
    try:
        Lab().restart_agent("nodeB", ["--test-pause", f"transferring-final={PAUSE}"], HOOKS)
        proc, lines = start_migration(DELTA)
        wait_for_line(lines, "paused before transferring-final")
        kill_agent("nodeB")()
        finish(proc, lines)
        Lab().restart_agent("nodeB")  # settles what was in flight: the source resumes
        assert wait_one_copy(lab) == "nodeA"
        root = Path(a.info()["DockerRootDir"])
        left = [str(p) for p in (root / "containers" / c.id / "checkpoints").rglob("*")
                if p.is_file()]
        assert left == [], f"the engine keeps a copy of the checkpoint: {left}"
        assert_intact_and_counting(a)
    finally:
        Lab().restart_agent("nodeB")
        remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])
