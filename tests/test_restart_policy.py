"""Containers as people run them: with a restart policy, a migration still leaves exactly one
copy. The source's engine would restart a checkpointed container with a policy at once, so the
source's policy is "no" from the freeze on, and back to what it was if the migration rolls back;
the destination's copy gets the original policy."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from migctl.lab.nodes import Lab
from migctl.lab.workloads import ensure_toy_image, remove_everywhere, run_toy
from tests.conftest import CACHE, DELTA, LabHandle, migctl
from tests.test_faults import (
    HOOKS,
    assert_intact_and_counting,
    finish,
    kill_agent,
    running_copies,
    start_migration,
    wait_for_line,
    wait_one_copy,
)

pytestmark = pytest.mark.lab

POLICIES = [("always", 0), ("unless-stopped", 0), ("on-failure", 3)]


@pytest.fixture
def toy_with_policy(lab: LabHandle, request) -> Iterator[dict]:
    name, retries = request.param
    policy = {"Name": name, "MaximumRetryCount": retries}
    remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])
    ensure_toy_image(lab.docker["nodeA"], CACHE)
    run_toy(lab.docker["nodeA"]).update(restart_policy=policy)
    time.sleep(2)
    yield policy
    for node in ("nodeA", "nodeB"):
        Lab().restart_agent(node)
    remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])


def policy_of(lab: LabHandle, node: str) -> dict:
    c = lab.docker[node].containers.get("toytsm")
    p = c.attrs["HostConfig"]["RestartPolicy"]
    return {"Name": p.get("Name"), "MaximumRetryCount": p.get("MaximumRetryCount", 0)}


@pytest.mark.parametrize("toy_with_policy", POLICIES, indirect=True,
                         ids=[p for p, _ in POLICIES])
def test_a_container_with_a_restart_policy_moves_once(lab: LabHandle,
                                                      toy_with_policy: dict) -> None:
    migctl("migrate", *DELTA, "--from", "nodeA", "--to", "nodeB", "toytsm")
    time.sleep(3)  # long enough for the source engine to have restarted it, if it would
    assert running_copies(lab) == ["nodeB"]
    assert policy_of(lab, "nodeB") == toy_with_policy
    assert policy_of(lab, "nodeA")["Name"] == "no"  # the stopped copy must stay stopped
    assert_intact_and_counting(lab.docker["nodeB"], "nodeB")


FROZEN = {"delta": "exited", "page-server": "paused"}  # the source after the freeze


@pytest.mark.parametrize("memory", list(FROZEN))
@pytest.mark.parametrize("toy_with_policy", POLICIES, indirect=True,
                         ids=[p for p, _ in POLICIES])
def test_a_rollback_gives_the_source_its_policy_back(lab: LabHandle, toy_with_policy: dict,
                                                     memory: str) -> None:
    Lab().restart_agent("nodeB", ["--test-pause", "transferring-final=6"], HOOKS)
    proc, lines = start_migration(["--memory-transfer", memory])
    wait_for_line(lines, "paused before transferring-final")
    assert policy_of(lab, "nodeA")["Name"] == "no"  # frozen: the engine must not restart it
    assert lab.docker["nodeA"].containers.get("toytsm").status == FROZEN[memory]
    assert running_copies(lab) == []
    kill_agent("nodeB")()
    finish(proc, lines)
    Lab().restart_agent("nodeB")  # resolves what was in flight: the source resumes
    assert wait_one_copy(lab) == "nodeA"
    assert policy_of(lab, "nodeA") == toy_with_policy
    assert_intact_and_counting(lab.docker["nodeA"])
