"""The migration, run by the destination agent: the seed's one-iteration pre-copy.

REQUEST -> PRE_COPY (layers, volume snapshots, checkpoint while running) -> FREEZE (final
checkpoint, the source stops) -> FINAL_SYNC (deltas of what changed) -> RESTORE (create and
start from the checkpoint). Until RESTORE confirms the new container runs, the source keeps its
final checkpoint; any failure after FREEZE ends with the source resumed from it (ROLLBACK).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from migctl.agent.catalog.registry import Registry, checkpoint_keys
from migctl.agent.catalog.store import Store
from migctl.agent.dataplane import archive
from migctl.agent.dataplane.files import digest
from migctl.agent.dataplane.pages import PageServer
from migctl.agent.dataplane.staging import Staging
from migctl.agent.metrics import Metrics
from migctl.agent.migration import journal as j
from migctl.agent.migration.phases import final_sync, freeze, page_in, pre_copy, request, restore
from migctl.agent.migration.policy import Link, Links
from migctl.agent.migration.recovery import settle
from migctl.agent.migration.report import Report
from migctl.agent.migration.source import (
    FINAL_CHECKPOINT,
    snapshot_path,
)
from migctl.agent.migration.state import DESTINATION, State
from migctl.agent.runtime.base import Network, Runtime
from migctl.agent.runtime.criu.images import Confinement, check_images
from migctl.common.channel import open_channel
from migctl.common.errors import (
    Cancelled,
    FailedPrecondition,
    MigctlError,
)
from migctl.common.peer import Connect, Peer
from migctl.common.tls import TLSFiles
from migctl.proto import migctl_pb2 as pb

log = logging.getLogger(__name__)

STREAM_SLACK = 30.0    # seconds every stream gets on top of its expected transfer time
STREAM_FACTOR = 4.0    # a stream may take this many times the measured link's estimate
SLOWEST_LINK = 1e6     # bytes/s assumed when the link to the source cannot be measured
HOLD_BEAT = 0.25       # seconds between the beats of the hold on the frozen source


@dataclass
class Migration:
    """One migration at the destination: the context every phase (agent/migration/phases/)
    reads and fills, and the driver that runs them in order. Constructing it does nothing;
    `open` journals it and reaches for the source."""

    node: str
    runtime: Runtime
    staging: Staging
    request: pb.MigrateRequest
    source_address: str  # resolved by this agent from the source's node name
    emit: Callable[[pb.MigrationEvent], None]
    is_migrated_away: Callable[[str], bool]
    journal: j.Journal
    local_info: Callable[[], pb.NodeInfo]
    tls: TLSFiles
    store: Store
    registry: Registry | None
    links: Links
    publish: Callable[[list], None]
    metrics: Metrics = field(default_factory=Metrics)
    # what the phases learn, each set once by the phase named
    source_info: pb.NodeInfo = field(default_factory=pb.NodeInfo)  # request
    link: Link | None = None  # to the source, measured in the request phase
    keep_connections: bool = False  # request: CRIU carries its TCP connections
    segments: dict[str, Network] = field(default_factory=dict)  # request: its moving networks
    probing: Future[list[str]] | None = None  # freeze: who else answers for its addresses
    snapshots_at: float = 0.0  # pre-copy: when the volume snapshots were taken
    pre_checkpoint: pb.CheckpointReply = field(default_factory=pb.CheckpointReply)  # pre-copy
    confinement: Confinement | None = None  # pre-copy: what the created container was given
    pages: PageServer | None = None  # the final checkpoint's page server, if any (freeze)
    frozen_at: float = 0.0  # freeze: wall clock, the cached checkpoint's time
    _holding: threading.Event | None = None  # set: the hold on the source ends
    # the operator's cancel (`cancel`), and the commit, after which it is refused
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _commit_lock: threading.Lock = field(default_factory=threading.Lock)
    committing: bool = False
    # made by `open`
    entry: j.Entry = field(init=False)  # this migration's journal entry, as last written
    report: Report = field(init=False)
    area: Path = field(init=False)  # its staging area
    connect: Connect = field(init=False)  # a channel to another node, with this node's TLS
    source: Peer = field(init=False)

    @property
    def migration_id(self) -> str:
        return self.request.migration_id

    @property
    def source_name(self) -> str:
        return self.request.source_node

    def open(self) -> Migration:
        """Journal the migration (an id seen before is refused here), make its staging area,
        and open the channel to the source, which must prove it is that node: its certificate
        is checked for the node's name, not just for our CA."""
        self.entry = j.Entry(self.migration_id, DESTINATION, self.request.container,
                             State.REQUESTED, peer=self.source_name,
                             peer_address=self.source_address,
                             data=j.DestinationData(remove_source=self.request.remove_source))
        self.journal.create(self.entry)
        self.metrics.started.labels(DESTINATION).inc()
        self.report = Report(self.migration_id, self.request.container, self.source_name,
                             self.node, self.emit, self.request.mode, self.metrics)
        self.area = self.staging.create(self.migration_id)
        self.connect = lambda address, *name: open_channel(address, self.tls, *name)
        self.source = Peer(self.source_name, self.source_address, self.connect)
        return self

    def step(self, state: State, **data: object) -> None:
        """Journal the step about to be taken, before taking it. Every step forward is where a
        cancel takes effect (the failure that follows undoes what the state says was done)."""
        with self._commit_lock:  # a cancel sees the state before this step or after it
            if not state.ended:
                self.check_cancelled()
            self.entry = self.journal.move(self.migration_id, DESTINATION, state, data=data)

    def cancel(self) -> str:
        """The operator's cancel, taken at the next step: "aborted" before the freeze,
        "rolling back" after it; refused once the source may have committed."""
        with self._commit_lock:
            if self.committing:
                raise FailedPrecondition(
                    f"migration {self.migration_id} has committed: the container runs at "
                    f"{self.node} from now on, and the migration completes")
            self._cancelled.set()
            return "rolling back" if self.entry.state.frozen else "aborted"

    def check_cancelled(self) -> None:
        if self._cancelled.is_set() and not self.committing:
            raise Cancelled(f"migration {self.migration_id} was cancelled by the operator")

    def commit_point(self) -> None:
        """The last moment a cancel is taken: from here the source is asked to commit."""
        with self._commit_lock:
            self.check_cancelled()
            self.committing = True

    @contextlib.contextmanager
    def enter(self, state: State) -> Iterator[None]:
        """Journal STATE, then report the phase it is part of (State.phase) while inside."""
        self.step(state)
        with self.report.phase(state.phase):
            yield

    @property
    def new_container(self) -> str:
        return self.entry.at_destination.new_container

    def take_hold(self) -> None:
        """From the freeze until the commit, a stream of beats to the source: if this agent dies
        or the link breaks, the source resumes within seconds instead of waiting for its lease."""
        self._holding = threading.Event()

        def beats() -> Iterator[pb.HoldBeat]:
            yield pb.HoldBeat(migration_id=self.migration_id)
            while not self._holding.wait(HOLD_BEAT):
                yield pb.HoldBeat()

        def hold() -> None:
            try:
                self.source.call("Hold", beats(), timeout=None)
            except MigctlError as err:  # the source resumes by itself; the flow finds out
                log.info("migration %s: hold ended: %s", self.migration_id, err)

        threading.Thread(target=hold, name=f"hold-{self.migration_id}", daemon=True).start()

    def release_hold(self) -> None:
        if self._holding is not None:
            self._holding.set()

    def deadline(self, size: int) -> float:
        """Seconds a stream of SIZE bytes from the source may take: the estimate of the link
        measured before the freeze (never re-measured during the downtime), with room to
        spare, so a stalled or endless stream is cut off."""
        expected = self.link.expected(size) if self.link else size / SLOWEST_LINK
        return STREAM_SLACK + STREAM_FACTOR * expected

    def room(self, size: int, what: str) -> None:
        """Refuse before fetching what the staging disk cannot hold (the size is the source's
        announcement, which the transfer then holds it to). A cancel is taken here too, between
        one fetch and the next."""
        self.check_cancelled()
        free = shutil.disk_usage(self.area).free
        if size > free:
            raise FailedPrecondition(f"{what} is announced as {size / 1e6:.1f} MB but {self.node} "
                                     f"has {free / 1e6:.1f} MB free for staging")

    # -- the phases -------------------------------------------------------------------------

    def run(self) -> pb.MigrationReport:
        try:
            return self._run()
        finally:
            self.release_hold()  # after a rollback, if it failed: the source no longer waits
            # a lazy daemon outlives a rollback still pending: its copy may still run, and
            # would read zeros; the rollback's retry removes it, stops the daemon, drops staging
            pending = self.pages is not None and self.pages.lazy and not self.ended()
            if self.pages is not None and not pending:
                self.pages.stop()
            self.source.close()
            if not pending:
                self.staging.drop(self.migration_id)

    def _run(self) -> pb.MigrationReport:
        try:
            spec = request.run(self)  # describe, check both nodes, measure the link
            bases = pre_copy.run(self, spec)  # everything while it runs; the bases' signatures
            pages = freeze.prepare(self, spec)  # how the final checkpoint's memory travels
            final = freeze.run(self, spec, pages)  # the source stops
            final_sync.run(self, spec, final, bases)  # what changed, in one stream
            restore.run(self, spec, pages)  # commit, then start from the checkpoint here
            page_in.run(self, pages)  # post-copy: the pages arrive while it runs
        except BaseException as err:
            self.fail(err)
            raise
        return self.finish(spec)

    def finish(self, spec: pb.ContainerSpec) -> pb.MigrationReport:
        """It runs here: the source lets go of its copy, this node keeps what it received."""
        self.step(State.DONE)
        self.store.forget_departed_volumes([v.name for v in spec.volumes])
        try:  # first: a source paused for a page server still holds its clients' connections
            self.source.call("Release", pb.ReleaseRequest(
                migration_id=self.migration_id, container=spec.id, completed=True,
                remove_container=self.request.remove_source), timeout=60)
        except MigctlError as err:  # the container runs here; the source keeps a stopped copy
            self.report.log(f"warning: could not release the source: {err}")
        try:
            self.keep(spec)
        except (MigctlError, OSError) as err:  # the container runs; only the cache suffers
            self.report.log(f"warning: could not keep a copy for later migrations: {err}")
        report = self.report.done(self.new_container)
        self.keep_report(report)
        return report

    def ended(self) -> bool:
        now = self.journal.get(self.migration_id, DESTINATION)
        return now is None or now.state.ended

    def keep_report(self, report: pb.MigrationReport) -> None:
        """REPORT goes into the journal entry, for `migctl history`."""
        self.entry.at_destination.report = MessageToDict(report)
        self.journal.save(self.entry)

    def keep(self, spec: pb.ContainerSpec) -> None:
        """The destination keeps what it received for later migrations: the final snapshot of
        each writable volume, read-only contents, the checkpoint; the registry learns it."""
        kept = []
        app, svc = checkpoint_keys(spec)
        ends = (self.source_name, self.node)  # the nodes that held it (Item.entitled)
        for vol in spec.volumes:
            path = self.area / snapshot_path(vol.name)
            if vol.read_only:
                key, ts = f"ro:{digest(path)}", 0.0
            elif vol.volume_id:  # the pre-copy snapshot: an older copy is still a good basis
                key, ts = f"rw:{vol.volume_id}", self.snapshots_at
            else:
                continue
            if path.exists() and (ts or not self.store.find(key)):
                kept.append(self.store.put(key, ts, path, digest(path), move=True,
                                           entitled=ends))
            elif path.exists():
                self.store.entitle(key, ts, ends)
        ckpt = self.area / "basis" / "final-checkpoint.tar"
        archive.snapshot(self.area / "checkpoints" / FINAL_CHECKPOINT, ckpt)
        for key in (svc, app):
            kept.append(self.store.put(key, self.frozen_at, ckpt, digest(ckpt), entitled=ends))
        self.publish(kept)

    def confine(self) -> Confinement:
        """What the engine gave the created container, which the checkpoint's images may not
        exceed."""
        self.confinement = Confinement.of(self.runtime.inspect(self.new_container),
                                          self.runtime.confines_with_seccomp())
        return self.confinement

    def check_images(self, name: str = FINAL_CHECKPOINT) -> None:
        """Checkpoint NAME's images give the process nothing beyond what the engine gave the
        created container (agent/runtime/criu/images.py): the final one is checked before the
        commit, so that a refusal leaves the source to resume."""
        confinement = self.confinement or self.confine()  # or an agent restarted since
        check_images(self.area / "checkpoints" / name, confinement,
                     restored=name == FINAL_CHECKPOINT)

    def fail(self, err: BaseException) -> None:
        """Leave exactly one copy running (agent/migration/recovery.py)."""
        log.warning("migration %s failed: %s", self.migration_id, err)
        self.entry.at_destination.error = str(err)
        self.journal.save(self.entry)
        frozen = self.entry.state.frozen
        self.metrics.failed(err, self.report.current.phase if self.report.current else
                            pb.REQUEST, self.entry.state.failure)
        try:
            if not frozen:
                settle(self.entry, self.runtime, self.journal, self.staging, self.tls,
                       self.report.log)
                return
            with self.report.phase(pb.ROLLBACK):
                settle(self.entry, self.runtime, self.journal, self.staging, self.tls,
                       self.report.log)
        finally:
            self.keep_report(self.report.finish())


