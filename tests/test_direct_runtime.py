"""The direct checkpoint path on the real lab: CRIU's images bypass the engine's copies, and
Docker still manages the container afterwards; a container on plain runc takes the engine's
path on the same nodes."""

from __future__ import annotations

import time
from pathlib import Path

import docker
import pytest

from migctl.agent.runtime import direct
from migctl.lab.nodes import Lab
from migctl.lab.workloads import COUNTER, TOY_IMAGE, ensure_toy_image, remove_everywhere, run_toy
from tests.conftest import CACHE, DELTA, LabHandle, migrate_json
from tests.test_migrate_e2e import check_moved, logs, wait_for_count

pytestmark = pytest.mark.lab


def engine_checkpoint_files(client: docker.DockerClient, cid: str) -> list[str]:
    """Files in the engine's own checkpoint folders of CID (images the engine copied)."""
    root = client.info()["DockerRootDir"]
    folder = Path(root) / "containers" / cid / "checkpoints"
    return [str(p) for p in folder.rglob("*") if p.is_file()]


@pytest.mark.parametrize("memory,how", [("delta", "delta"), ("page-server", "page server")])
def test_the_direct_path_moves_the_toy_and_docker_still_manages_it(lab: LabHandle, memory: str,
                                                                   how: str) -> None:
    a, b = lab.docker["nodeA"], lab.docker["nodeB"]
    remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])
    ensure_toy_image(a, CACHE)
    old = run_toy(a)
    assert a.containers.get(old.id).attrs["HostConfig"]["Runtime"] == direct.DIRECT_RUNTIME
    wait_for_count(a, "toytsm", 3)

    report = migrate_json("--memory-transfer", memory, "--from", "nodeA", "--to", "nodeB",
                          "toytsm")
    assert report["memory_transfer"] == how
    assert report["checkpoint_method"] == "direct"
    assert report["restore_method"] == "direct"
    check_moved(lab, "nodeA", "nodeB", report)
    new = b.containers.get("toytsm")
    assert new.attrs["HostConfig"]["Runtime"] == direct.DIRECT_RUNTIME
    # the images never went through the engine: its checkpoint folders hold none
    assert engine_checkpoint_files(a, old.id) == []
    assert engine_checkpoint_files(b, new.id) == []
    assert not list(direct.REQUEST_DIR.glob(f"{old.id}.*"))
    assert not list(direct.REQUEST_DIR.glob(f"{new.id}.*"))

    # Docker manages the restored container as any other
    assert new.exec_run(["cat", "/lines.txt"]).exit_code == 0
    before = logs(b, "toytsm")
    new.stop(timeout=2)
    new.reload()
    assert new.status == "exited"
    new.start()
    time.sleep(1.5)
    new.reload()
    assert new.status == "running"
    assert len(logs(b, "toytsm")) > len(before)
    remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])


def test_a_container_on_plain_runc_takes_the_engines_path(lab: LabHandle) -> None:
    a, c = lab.docker["nodeA"], lab.docker["nodeC"]
    remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])
    ensure_toy_image(a, CACHE)
    a.volumes.create("testrw", labels={"rw-guid": f"guid-plain-{time.time_ns()}"})
    a.volumes.create("testro")
    a.containers.run(TOY_IMAGE, ["sh", "-c", COUNTER], name="toytsm", detach=True,
                     runtime="runc", volumes={"testrw": {"bind": "/testrw", "mode": "rw"},
                                              "testro": {"bind": "/testro", "mode": "ro"}})
    wait_for_count(a, "toytsm", 3)
    report = migrate_json(*DELTA, "--from", "nodeA", "--to", "nodeC", "toytsm")
    assert report["checkpoint_method"] == "engine"
    assert report["restore_method"] == "direct", "the destination creates it with the wrapper"
    new = c.containers.get("toytsm")
    assert new.status == "running"
    wait_for_count(c, "toytsm", 2)
    remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])


def test_an_agent_starting_sweeps_the_requests_a_killed_one_left(lab: LabHandle) -> None:
    """A request left by an agent killed mid-checkpoint would send an operator's later
    `docker checkpoint create` of the container to an old folder, or its memory to a loopback
    port anyone may hold by then. The agent of the engine that runs the container removes it
    when it starts; a request for a container of another engine stays."""
    a = lab.docker["nodeA"]
    remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])
    ensure_toy_image(a, CACHE)
    toy = run_toy(a)
    direct.REQUEST_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    stale = direct.REQUEST_DIR / f"{toy.id}.checkpoint"
    stale.write_text("/var/tmp/old-folder\n127.0.0.1:40000\ntoken\n")
    elsewhere = direct.REQUEST_DIR / f"{'f' * 64}.checkpoint"  # no engine of the lab has it
    elsewhere.write_text("/var/tmp/other\n\ntoken\n")
    try:
        Lab().restart_agent("nodeA")
        assert not stale.exists(), "the stale request survived the agent's start"
        assert elsewhere.exists(), "another engine's request was removed"
    finally:
        stale.unlink(missing_ok=True)
        elsewhere.unlink(missing_ok=True)
        remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])
