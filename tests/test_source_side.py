"""The source's half of a migration, without a lab: its lease, the hold that breaks during the
final checkpoint, the commit racing a resume, and the one object it keeps per migration in
flight (forgotten when the migration ends), against a runtime that only records."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from migctl.agent.catalog.store import Store
from migctl.agent.dataplane.staging import Staging
from migctl.agent.migration import journal as j
from migctl.agent.migration.source import FINAL_CHECKPOINT, PRE_CHECKPOINT, SourceSide
from migctl.agent.migration.state import PEER, SOURCE, State
from migctl.agent.runtime.base import ContainerState
from migctl.common.errors import FailedPrecondition
from migctl.proto import migctl_pb2 as pb

CID = "c" * 64


@dataclass
class RecordingRuntime:
    """A container that stops at its final checkpoint and runs again when restored or started;
    the final checkpoint waits for `release` when `hold_final` is set."""

    running_now: bool = True
    calls: list[str] = field(default_factory=list)
    hold_final: threading.Event | None = None
    in_final: threading.Event = field(default_factory=threading.Event)

    def describe(self, container: str) -> pb.ContainerSpec:
        return pb.ContainerSpec(id=CID, name="toy", image="toy:1", image_id="sha256:" + "1" * 64)

    def state(self, container: str) -> ContainerState:
        return ContainerState(CID, "toy", running=self.running_now)

    def checkpoint(self, container: str, name: str, directory: Path, leave_running: bool,
                   page_server: str = "", lazy_in: Path | None = None, *,
                   before_final: bool = False, keep_connections: bool = False) -> Path:
        self.calls.append(f"checkpoint {name}")
        if not leave_running:
            self.in_final.set()
            if self.hold_final is not None:
                self.hold_final.wait(10)
            self.running_now = False
        folder = directory / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "inventory.img").write_bytes(b"x")
        return folder

    def restart_policy(self, container: str) -> dict[str, Any]:
        return {"Name": "unless-stopped"}

    def set_restart_policy(self, container: str, policy: dict[str, Any]) -> None:
        self.calls.append(f"policy {policy['Name']}")

    def start_from_checkpoint(self, cid: str, checkpoint_dir: Path, name: str,
                              lazy_in: Path | None = None,
                              keep_connections: bool = False) -> None:
        self.calls.append(f"restore {checkpoint_dir.name}")
        self.running_now = True

    def wait_running(self, cid: str, **_: Any) -> None:
        assert self.running_now

    def start(self, container: str) -> None:
        self.running_now = True

    def running(self, container: str, settle: float = 0.0) -> bool:
        return self.running_now

    def gone(self, container: str) -> bool:
        return False

    def method_for(self, container: str) -> str:
        return "engine"

    def remove(self, container: str) -> None:
        self.calls.append("remove")


@pytest.fixture
def side(tmp_path: Path) -> tuple[SourceSide, RecordingRuntime]:
    runtime = RecordingRuntime()
    return SourceSide(runtime, Staging(tmp_path), j.Journal(tmp_path),  # type: ignore[arg-type]
                      Store(tmp_path / "store"), lease_seconds=0.2), runtime


def frozen(side: SourceSide) -> j.Entry:
    """A migration to nodeB through its pre-copy checkpoint and its final one."""
    mid, _ = side.authorize("toy", "nodeB")
    side.begin(side.bound(mid, "nodeB"))
    side.checkpoint(side.bound(mid, "nodeB"), pb.CheckpointRequest(name=PRE_CHECKPOINT,
                                                                   leave_running=True))
    side.checkpoint(side.bound(mid, "nodeB"), pb.CheckpointRequest(name=FINAL_CHECKPOINT))
    return side.bound(mid, "nodeB")


def state(side: SourceSide, mid: str) -> State:
    entry = side.journal.get(mid, SOURCE)
    assert entry is not None
    return entry.state


def test_a_lease_that_runs_out_resumes_the_frozen_container(side) -> None:
    side, runtime = side
    entry = frozen(side)
    assert state(side, entry.id) == State.FROZEN and not runtime.running_now
    assert entry.id in side._underway
    side.expire_leases()
    assert state(side, entry.id) == State.FROZEN  # the lease still runs
    time.sleep(0.3)
    side.expire_leases()
    assert state(side, entry.id) == State.ROLLED_BACK and runtime.running_now
    assert runtime.calls[-2:] == ["restore final", "policy unless-stopped"]
    assert entry.id not in side._underway  # ended: nothing of it stays in memory


def test_a_hold_lost_during_the_final_checkpoint_resumes_once_it_ends(side) -> None:
    side, runtime = side
    mid, _ = side.authorize("toy", "nodeB")
    side.begin(side.bound(mid, "nodeB"))
    runtime.hold_final = threading.Event()
    worker = threading.Thread(target=side.checkpoint, args=(
        side.bound(mid, "nodeB"), pb.CheckpointRequest(name=FINAL_CHECKPOINT)))
    worker.start()
    assert runtime.in_final.wait(5)
    # the destination's hold breaks while CRIU dumps: nothing resumes under the dump...
    side.hold(side.bound(mid, "nodeB"), iter([]))
    with pytest.raises(FailedPrecondition, match="being resumed or checkpointed"):
        side.resume(mid, by=PEER)
    side.expire_leases()  # ...nor does a lease
    assert state(side, mid) == State.FROZEN
    runtime.hold_final.set()  # the dump ends: the container resumes at once
    worker.join(5)
    assert state(side, mid) == State.ROLLED_BACK and runtime.running_now
    with pytest.raises(FailedPrecondition, match="will not hand over"):
        side.commit(side.bound(mid, "nodeB", ended_ok=True))


def test_a_commit_wins_over_a_later_lease_and_release_forgets_the_migration(side) -> None:
    side, runtime = side
    entry = frozen(side)
    side.commit(entry)
    time.sleep(0.3)
    side.expire_leases()  # committed: the destination owns it; no lease resumes it
    assert state(side, entry.id) == State.COMMITTED and not runtime.running_now
    side.release(side.bound(entry.id, "nodeB"), completed=True, remove_container=True)
    assert state(side, entry.id) == State.DONE and runtime.calls[-1] == "remove"
    assert entry.id not in side._underway


def test_a_migration_abandoned_before_the_freeze_is_dropped(side) -> None:
    side, runtime = side
    mid, _ = side.authorize("toy", "nodeB")
    side.begin(side.bound(mid, "nodeB"))
    side.touch(mid)
    side.underway(mid).last_seen -= 100  # silent for many leases
    side.expire_leases()
    assert state(side, mid) == State.FAILED and runtime.running_now
    assert mid not in side._underway and not (side.staging.root / mid).exists()
