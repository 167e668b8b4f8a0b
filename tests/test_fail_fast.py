"""Fail fast, safely: from the freeze until the commit the destination holds a stream of beats
to the source. When the destination's agent dies, or the link is cut, the source resumes the
container by itself within seconds; when the destination's engine stops, the destination does
not commit and rolls back. Always exactly one copy. The time from the fault to the source
running again is measured and printed (not asserted: these machines are noisy)."""

from __future__ import annotations

import time

import pytest

from migctl.lab.nodes import Lab
from tests.conftest import DELTA, LabHandle
from tests.test_faults import (
    HOOKS,
    PAUSE,
    agent_log,
    agent_log_size,
    assert_intact_and_counting,
    finish,
    kill_agent,
    link,
    really_running,
    start_migration,
    toy,  # noqa: F401 - the fixture
    wait_for_line,
    wait_one_copy,
)

pytestmark = pytest.mark.lab


def seconds_until_running_on_a(lab: LabHandle, since: float, timeout: float = 90) -> float:
    a = lab.docker["nodeA"]
    while time.monotonic() - since < timeout:
        if any(c.name == "toytsm" and really_running(c) for c in a.containers.list()):
            return time.monotonic() - since
        time.sleep(0.05)
    raise AssertionError(f"toytsm did not run again on nodeA within {timeout} s")


def report(capsys: pytest.CaptureFixture, what: str, seconds: float) -> None:
    with capsys.disabled():
        print(f"\n[fail-fast] {what}: the source ran again {seconds:.2f} s after the fault")


def frozen_then(fault) -> tuple:
    """A migration paused right after the freeze (the source is stopped), then FAULT."""
    Lab().restart_agent("nodeB", ["--test-pause", f"transferring-final={PAUSE * 5}"], HOOKS)
    proc, lines = start_migration(DELTA)
    wait_for_line(lines, "paused before transferring-final")
    at = time.monotonic()
    fault()
    return proc, lines, at


def test_destination_agent_killed_after_the_freeze(lab: LabHandle, toy: None,  # noqa: F811
                                                   capsys: pytest.CaptureFixture) -> None:
    since = agent_log_size("nodeA")
    proc, lines, at = frozen_then(kill_agent("nodeB"))
    report(capsys, "destination agent killed", seconds_until_running_on_a(lab, at))
    out = finish(proc, lines)
    assert proc.returncode == 1 and "cannot reach the agent of nodeB" in out, out
    assert "the hold of nodeB broke" in agent_log("nodeA", since)
    Lab().restart_agent("nodeB")  # it settles what it left in flight: nothing runs twice
    assert wait_one_copy(lab) == "nodeA"
    assert_intact_and_counting(lab.docker["nodeA"])


def test_link_cut_after_the_freeze(lab: LabHandle, toy: None,  # noqa: F811
                                   capsys: pytest.CaptureFixture) -> None:
    since = agent_log_size("nodeA")
    try:
        proc, lines, at = frozen_then(lambda: link("p-nodeB", "down"))
        report(capsys, "destination's link cut", seconds_until_running_on_a(lab, at))
        assert "fell silent" in agent_log("nodeA", since)
    finally:
        link("p-nodeB", "up")
    out = finish(proc, lines)
    assert proc.returncode == 1 and "migctl: error:" in out, out  # no commit after a resume
    assert wait_one_copy(lab) == "nodeA"
    assert "toytsm" not in [c.name for c in lab.docker["nodeB"].containers.list(all=True)]
    assert_intact_and_counting(lab.docker["nodeA"])


def test_destination_engine_stopped_after_the_freeze(lab: LabHandle, toy: None,  # noqa: F811
                                                     capsys: pytest.CaptureFixture) -> None:
    lab_ctl = Lab()
    node = lab_ctl.state()["nodes"]["nodeB"]
    stop_engine = lambda: lab_ctl.stop_pid(node["dockerd_pid"],  # noqa: E731
                                           str(lab_ctl.node_dir("nodeB") / "daemon.json"))
    try:
        Lab().restart_agent("nodeB", ["--test-pause", "transferring-final=20"], HOOKS)
        proc, lines = start_migration(DELTA)
        wait_for_line(lines, "paused before transferring-final")
        at = time.monotonic()
        stop_engine()  # returns once the engine is gone, while the destination still pauses
        report(capsys, "destination engine stopped (rolled back after the pause)",
               seconds_until_running_on_a(lab, at))
        out = finish(proc, lines)
        assert proc.returncode == 1 and "runs again on nodeA" in out, out
    finally:
        lab_ctl.up(3)  # the engine (and the agents) back
    assert wait_one_copy(lab) == "nodeA"
    assert_intact_and_counting(lab.docker["nodeA"])
