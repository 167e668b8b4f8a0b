"""The source's half of a migration: begin, freeze, commit, resume, and the lease.

Exactly one copy must run. The source resumes a frozen container on its own only while the
destination has not committed: when the destination falls silent for longer than the lease,
or when the source agent restarts. After the commit, only the destination may ask it to resume.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.catalog.store import Item, Store
from agent.dataplane.staging import Staging
from agent.errors import AlreadyExists, FailedPrecondition, MigctlError
from agent.migration import journal as j
from agent.runtime.docker import DockerRuntime
from proto import migctl_pb2 as pb

log = logging.getLogger(__name__)

FINAL_CHECKPOINT = "final"


class SourceSide:
    def __init__(self, runtime: DockerRuntime, staging: Staging, journal: j.Journal,
                 store: Store, lease_seconds: float,
                 publish: Callable[[list[Item]], None] = lambda _: None) -> None:
        self.publish = publish
        self.runtime = runtime
        self.staging = staging
        self.journal = journal
        self.store = store
        self.lease = lease_seconds
        self.last_seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def touch(self, migration_id: str) -> None:
        """Every call of the destination about a migration renews its lease."""
        self.last_seen[migration_id] = time.monotonic()

    def begin(self, request: pb.BeginRequest) -> pb.ContainerSpec:
        spec = self.runtime.describe(request.container)
        with self._lock:
            for other in self.journal.in_flight(j.SOURCE):
                if other.container == spec.id and other.id != request.migration_id:
                    raise AlreadyExists(
                        f"{spec.name!r} is already being migrated (migration {other.id} to "
                        f"{other.peer}, {other.state}); wait for it to end")
            self.journal.record(j.Entry(
                request.migration_id, j.SOURCE, spec.id, j.PRE_COPY,
                peer=request.destination_node,
                data={"volumes": {v.name: {"read_only": v.read_only,
                                           "guid": v.labels.get("rw-guid", "")}
                                  for v in spec.volumes}, "snapshots": {}}))
        self.touch(request.migration_id)
        return spec

    def snapshot_taken(self, migration_id: str, volume: str, info: pb.FileInfo) -> None:
        entry = self.journal.get(migration_id, j.SOURCE)
        if entry is not None:
            entry.data.setdefault("snapshots", {})[info.path] = {
                "volume": volume, "digest": info.digest, "ts": time.time()}
            self.journal.record(entry)

    def keep_last_snapshots(self, entry: j.Entry) -> None:
        """The source keeps its last snapshot of each volume: a good basis when the container
        comes back, or for a neighbour's migration."""
        kept = []
        area = self.staging.area(entry.id)
        for rel, snap in entry.data.get("snapshots", {}).items():
            vol = entry.data.get("volumes", {}).get(snap["volume"], {})
            if vol.get("read_only"):
                key, ts = f"ro:{snap['digest']}", 0.0
                if self.store.find(key):
                    continue
            elif rel.endswith(".final.tar"):
                vid = self.store.volume_id(snap["volume"], vol.get("guid", ""))
                key, ts = f"rw:{vid}", snap["ts"]
            else:
                continue
            if (area / rel).exists():
                kept.append(self.store.put(key, ts, area / rel, snap["digest"], move=True))
        self.publish(kept)

    def checkpoint(self, request: pb.CheckpointRequest) -> Path:
        area = self.staging.area(request.migration_id)
        entry = self.journal.get(request.migration_id, j.SOURCE)
        if entry is None or entry.ended:
            raise FailedPrecondition(f"migration {request.migration_id} is not in flight here")
        if not request.leave_running:
            # Journal first: if the agent dies during the checkpoint, a restart resumes.
            self.journal.transition(request.migration_id, j.SOURCE, (j.PRE_COPY,), j.FROZEN)
        self.touch(request.migration_id)
        return self.runtime.checkpoint(request.container, request.name, area / "checkpoints",
                                       request.leave_running)

    def commit(self, migration_id: str) -> None:
        # Under the same lock as a lease's resume: one of the two wins, never both.
        with self._lock:
            committed = self.journal.transition(migration_id, j.SOURCE, (j.FROZEN,), j.COMMITTED)
        if committed is None:
            entry = self.journal.get(migration_id, j.SOURCE)
            state = entry.state if entry else "unknown here"
            raise FailedPrecondition(
                f"the source will not hand over migration {migration_id} ({state}): it "
                "resumed the container itself (the destination fell silent for longer than "
                f"the {self.lease:.0f} s lease, or the source agent restarted)")

    def resume(self, migration_id: str) -> pb.ResumeReply:
        """Start the container again from its final checkpoint (or fresh, if that fails)."""
        entry = self.journal.get(migration_id, j.SOURCE)
        if entry is None:
            raise FailedPrecondition(f"no migration {migration_id} here to roll back")
        cid = entry.container
        if self.runtime.inspect(cid)["State"].get("Running"):
            self.journal.transition(migration_id, j.SOURCE, (j.PRE_COPY, j.FROZEN, j.COMMITTED),
                                    j.ROLLED_BACK)
            return pb.ResumeReply(restored=True, detail="it was still running")
        folder = self.staging.area(migration_id) / "checkpoints" / FINAL_CHECKPOINT
        try:
            if not (folder / "inventory.img").exists():
                raise FailedPrecondition("the final checkpoint was never completed")
            self.runtime.start_from_checkpoint(cid, folder, f"resume-{migration_id}")
            self.runtime.wait_running(cid)
            reply = pb.ResumeReply(restored=True, detail="restored from its final checkpoint")
        except MigctlError as err:
            log.warning("resume from checkpoint failed, restarting fresh: %s", err)
            self.runtime.start(cid)
            self.runtime.wait_running(cid)
            reply = pb.ResumeReply(restored=False,
                                   detail=f"restore failed ({err}); restarted without its memory")
        entry.state = j.ROLLED_BACK
        entry.data["resume"] = reply.detail
        self.journal.record(entry)
        self.staging.drop(migration_id)
        return reply

    def release(self, request: pb.ReleaseRequest) -> None:
        entry = self.journal.get(request.migration_id, j.SOURCE)
        if request.completed:
            if entry is None or entry.state != j.COMMITTED:
                raise FailedPrecondition(
                    f"migration {request.migration_id} was never committed here; refusing to "
                    "treat the container as moved")
            try:
                self.keep_last_snapshots(entry)
            except (MigctlError, OSError) as err:
                log.warning("could not keep the last snapshots: %s", err)
            if request.remove_container:
                self.runtime.remove(entry.container)
            else:
                self.store.mark_departed(entry.container, request.migration_id)
            entry.state = j.DONE
            self.journal.record(entry)
        elif entry is not None and entry.state == j.PRE_COPY:
            entry.state = j.FAILED
            self.journal.record(entry)
        elif entry is not None and entry.state in (j.FROZEN, j.COMMITTED):
            raise FailedPrecondition(f"migration {request.migration_id} is frozen here: resume "
                                     "it before releasing it")
        self.staging.drop(request.migration_id)

    # -- without the destination ------------------------------------------------------------

    def recover_on_start(self) -> None:
        """Uncommitted frozen containers resume at once: the destination cannot have committed."""
        for entry in self.journal.in_flight(j.SOURCE):
            self.last_seen[entry.id] = time.monotonic()
            if entry.state == j.FROZEN:
                log.warning("migration %s was frozen when the agent stopped: resuming %s",
                            entry.id, entry.container[:12])
                self._resume_quietly(entry.id)
            elif entry.state == j.COMMITTED:
                log.warning("migration %s is committed: the destination %s owns %s; waiting "
                            "for it to release or resume", entry.id, entry.peer,
                            entry.container[:12])

    def expire_leases(self) -> None:
        now = time.monotonic()
        for entry in self.journal.in_flight(j.SOURCE):
            idle = now - self.last_seen.setdefault(entry.id, now)
            if entry.state == j.FROZEN and idle > self.lease:
                log.warning("migration %s: no word from %s for %.0f s; resuming %s", entry.id,
                            entry.peer, idle, entry.container[:12])
                self._resume_quietly(entry.id)
            elif entry.state == j.PRE_COPY and idle > 10 * self.lease:
                entry.state = j.FAILED  # abandoned before the freeze: only files to drop
                self.journal.record(entry)
                self.staging.drop(entry.id)

    def _resume_quietly(self, migration_id: str) -> None:
        with self._lock:
            entry = self.journal.get(migration_id, j.SOURCE)
            if entry is None or entry.state != j.FROZEN:
                return  # committed meanwhile: no longer ours to resume
            try:
                self.resume(migration_id)
            except MigctlError as err:
                log.error("could not resume after migration %s: %s", migration_id, err)
