"""The migration, run by the destination agent: the seed's one-iteration pre-copy.

REQUEST -> PRE_COPY (layers, volume snapshots, checkpoint while running) -> FREEZE (final
checkpoint, the source stops) -> FINAL_SYNC (deltas of what changed) -> RESTORE (create and
start from the checkpoint). Until RESTORE confirms the new container runs, the source keeps its
final checkpoint; any failure after FREEZE ends with the source resumed from it (ROLLBACK).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import shutil
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from google.protobuf.json_format import MessageToDict

from agent.catalog.registry import Registry, checkpoint_keys
from agent.catalog.store import Store
from agent.dataplane import archive
from agent.dataplane import final as final_pass
from agent.dataplane.channel import open_channel
from agent.dataplane.files import digest, flush_writes
from agent.dataplane.image import assemble
from agent.dataplane.pages import ACCEPT_S, PageServer
from agent.dataplane.rootfs import apply_layer_changes, restore_layer
from agent.dataplane.staging import Staging
from agent.dataplane.transfer import fetch_delta, fetch_whole
from agent.delta import (
    DEFAULT_BLOCK_SIZE,
    DELTA_FORMAT,
    DeltaStats,
    Signature,
    make_signature,
    signature_block_cap,
)
from agent.errors import (
    AlreadyExists,
    DeltaError,
    FailedPrecondition,
    MigctlError,
    Refused,
    Unavailable,
)
from agent.metrics import Metrics
from agent.migration import journal as j
from agent.migration.policy import DELTA, PAGE_SERVER, POST_COPY, Link, Links, memory_transfer
from agent.migration.recovery import settle
from agent.migration.report import Report
from agent.migration.source import (
    FINAL_CHECKPOINT,
    PRE_CHECKPOINT,
    ROOTFS,
    ROOTFS_CHANGES,
    changes_path,
    snapshot_path,
)
from agent.migration.sourcing import Sourcing
from agent.migration.state import DESTINATION, SOURCE, State
from agent.peer import Peer
from agent.runtime.base import ContainerState, Runtime, restarts
from agent.runtime.criu.images import Confinement, check_images
from agent.runtime.docker import criu_path, host_listeners
from agent.runtime.spec import check_description, checkpoint_path, port_protocol, unsupported
from agent.security import TLSFiles
from agent.version import PROTOCOL_VERSION, version
from proto import migctl_pb2 as pb

log = logging.getLogger(__name__)

STREAM_SLACK = 30.0    # seconds every stream gets on top of its expected transfer time
STREAM_FACTOR = 4.0    # a stream may take this many times the measured link's estimate
SLOWEST_LINK = 1e6     # bytes/s assumed when the link to the source cannot be measured
HOLD_BEAT = 0.25       # seconds between the beats of the hold on the frozen source
PAGE_LIMIT_FACTOR = 4  # the final checkpoint's pages may be this many times the pre-copy's...
PAGE_LIMIT_SLACK = 256 << 20  # ...or this much more: beyond, a page server stops taking them


@dataclass
class Basis:
    """A file the destination already holds, and its signature computed before the freeze."""

    path: Path
    signature: Signature
    digest: str = ""  # of the content, as the source reported it (when it did)


@dataclass
class Migration:
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

    def __post_init__(self) -> None:
        self.migration_id = self.request.migration_id
        self.source_name = self.request.source_node
        self.entry = j.Entry(self.migration_id, DESTINATION, self.request.container,
                             State.REQUESTED, peer=self.source_name,
                             peer_address=self.source_address,
                             data=j.DestinationData(
                                 remove_source=self.request.remove_source))
        self.journal.create(self.entry)  # an id seen before is refused here
        self.metrics.started.labels(DESTINATION).inc()
        self.report = Report(self.migration_id, self.request.container, self.source_name,
                             self.node, self.emit, self.request.mode, self.metrics)
        self.area = self.staging.create(self.migration_id)
        # The source is reached at the address this agent knows for it, and must prove it is
        # that node: its certificate is checked for the node's name, not just for our CA.
        self.connect = lambda address, *name: open_channel(address, self.tls, *name)
        self.source = Peer(self.source_name, self.source_address, self.connect)
        self.link: Link | None = None  # to the source, measured in the request phase
        self.confinement: Confinement | None = None  # what the created container was given
        self._holding: threading.Event | None = None  # set: the hold on the source ends
        self.pages: PageServer | None = None  # the final checkpoint's page server, if any
        self.pre_checkpoint = pb.CheckpointReply()
        self.source_info = pb.NodeInfo()

    def step(self, state: str, **data: object) -> None:
        """Journal the step about to be taken, before taking it."""
        self.entry = self.journal.move(self.migration_id, DESTINATION, state, data=data)

    @property
    def new_container(self) -> str:
        return self.entry.at_destination.new_container

    # -- calls to the source, with its errors named -----------------------------------------

    def pull(self, kind: str, item: str, phase: int, fetch: Callable[[], int | DeltaStats],
             method: str) -> None:
        start = time.monotonic()
        result = self.source.guarded(fetch)
        self.report.transfer(kind, item, self.source_name, phase, result,
                             time.monotonic() - start, method)

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
        announcement, which the transfer then holds it to)."""
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
            with self.report.phase(pb.REQUEST):
                spec = self.request_phase()
            self.step(State.PRE_COPY)
            with self.report.phase(pb.PRE_COPY):
                bases = self.pre_copy(spec)
                flush_writes()
                self.check_ports_free(spec)
            pages = self.open_page_server(spec)
            lazy = pages is not None and pages.lazy
            self.step(State.FROZEN)
            self.take_hold()
            with self.report.phase(pb.FREEZE):
                self.report.freeze_started()
                frozen_at = time.time()
                final = self.source.call("Checkpoint", pb.CheckpointRequest(
                    migration_id=self.migration_id, container=spec.id, name=FINAL_CHECKPOINT,
                    leave_running=False, page_server=pages is not None and not lazy,
                    lazy_pages=lazy))
                self.report.msg.checkpoint_method = final.method
                self.report.log(f"final checkpoint on {self.source_name}: {final.seconds:.2f} s "
                                f"({final.method})")
                if pages is not None and not lazy:
                    self.report.transfer("checkpoint", f"{FINAL_CHECKPOINT}: memory pages",
                                         self.source_name, pb.FREEZE, pages.finish(),
                                         final.seconds, "whole", "through the page server")
            self.step(State.TRANSFERRING_FINAL)
            with self.report.phase(pb.FINAL_SYNC):
                self.final_sync(spec, final, bases)
            with self.report.phase(pb.RESTORE):
                self.runtime.ping()  # no commit while this node's engine cannot restore
                self.check_images()  # nor for images that would give the process more
                if lazy and pages is not None and pages.ended:
                    # the tunnel ended: no page would come after the commit
                    raise pages.error or Unavailable("the page tunnel ended before the commit")
                self.source.call("Commit", pb.CommitRequest(migration_id=self.migration_id))
                self.release_hold()
                self.restore(spec, pages if lazy else None)
            if lazy:
                assert pages is not None
                with self.report.phase(pb.PAGE_IN):
                    self.page_in(pages)
        except BaseException as err:
            self.fail(err)
            raise
        self.step(State.DONE)
        self.store.forget_departed_volumes([v.name for v in spec.volumes])
        try:  # first: a source paused for a page server still holds its clients' connections
            self.source.call("Release", pb.ReleaseRequest(
                migration_id=self.migration_id, container=spec.id, completed=True,
                remove_container=self.request.remove_source), timeout=60)
        except MigctlError as err:  # the container runs here; the source keeps a stopped copy
            self.report.log(f"warning: could not release the source: {err}")
        try:
            self.keep(spec, frozen_at)
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

    def request_phase(self) -> pb.ContainerSpec:
        source_info = self.source.call("GetNode", pb.GetNodeRequest(), timeout=30)
        if source_info.protocol_version != PROTOCOL_VERSION:
            self.metrics.preflight.labels("nodes").inc()
            raise FailedPrecondition(
                f"{self.source_name} runs migctl {source_info.version or 'older than 0.1'} "
                f"(protocol {source_info.protocol_version}), {self.node} migctl {version()} "
                f"(protocol {PROTOCOL_VERSION}): agents migrate only between the same protocol; "
                "upgrade the older one")
        self.link = self.links.measure(self.source_address)  # for the streams' deadlines
        spec = self.source.call("Begin", pb.BeginRequest(
            migration_id=self.migration_id, container=self.request.container), timeout=60)
        asked = self.request.container
        if asked != spec.name and not (len(asked) >= 12 and spec.id.startswith(asked)):
            raise Refused(f"the source described container {spec.name!r}, not the {asked!r} "
                          "asked for")
        check_description(spec)
        self.entry.container = spec.id
        self.journal.save(self.entry)
        if not spec.running:
            self.metrics.preflight.labels("not_running").inc()
            raise FailedPrecondition(
                f"container {spec.name!r} on {self.source_name} is not running; migctl moves "
                "running containers (start it, or move a stopped one with docker save/load)")
        # Computed here from the description, never taken from the source's own verdict.
        problems = unsupported(spec, self.request.allow_privileged)
        # and what only the source can see, in its processes (what CRIU would refuse): a
        # refusal, so believing it costs nothing
        problems += [p for p in spec.unsupported if p not in unsupported(spec)]
        if problems:
            self.metrics.preflight.labels("unsupported").inc()
            raise FailedPrecondition(
                f"container {spec.name!r} cannot be migrated: " + "; ".join(problems))
        internal = self.runtime.internal_networks(list(spec.networks))
        if internal and not self.request.allow_privileged:
            self.metrics.preflight.labels("unsupported").inc()
            raise FailedPrecondition(
                f"container {spec.name!r} would join {', '.join(map(repr, internal))}, an "
                f"internal network of {self.node} (its own services'): the source's description "
                "alone cannot put a container there; the operator must allow it with "
                "--allow-privileged")
        self.source_info = source_info
        if self.request.memory_transfer:  # what was asked for is refused now, not frozen
            memory_transfer(self.link, source_info.checkpoint_method, criu_path(),
                            self.request.memory_transfer, self.no_post_copy())
        try:
            preflight(source_info, self.local_info(), spec)
        except FailedPrecondition:
            self.metrics.preflight.labels("nodes").inc()
            raise
        existing = self.existing_container(spec.name)
        if existing and not self.is_migrated_away(existing.id):
            raise AlreadyExists(
                f"{self.node} already has a container named {spec.name!r} "
                f"({existing.id[:12]}); remove or rename it first")
        for vol in spec.volumes:
            self.check_volume_free(vol)
        self.check_ports_free(spec)
        return spec

    def check_ports_free(self, spec: pb.ContainerSpec) -> None:
        """The host ports the container publishes must be free here, or its restore fails,
        after the freeze. Asked at the request and again before the freeze (pre-copy takes
        time); containers other migrations created here count as already started."""
        others = [e.at_destination.new_container for e in self.journal.in_flight(DESTINATION)
                  if e.id != self.migration_id and e.at_destination.new_container]
        taken = ports_taken(spec, self.runtime.port_users(others), host_listeners())
        if taken:
            self.metrics.preflight.labels("ports").inc()
            raise FailedPrecondition(
                f"{self.node} already uses host port {', '.join(taken)}: the container could "
                "not publish it here; free it first")

    def existing_container(self, name: str) -> ContainerState | None:
        try:
            return self.runtime.state(name)
        except MigctlError:
            return None

    def departed_to(self, volume: str) -> str:
        """The node that the container which left VOLUME here went to ("" if none or several)."""
        migrations = {self.store.departure(u.id) for u in self.runtime.volume_users(volume)}
        if not migrations:
            migrations = {self.store.departure(volume=volume)}
        peers = set()
        for mid in migrations:
            entry = self.journal.get(mid, SOURCE) if mid else None
            peers.add(entry.peer if entry else "")
        return peers.pop() if len(peers) == 1 else ""

    def check_volume_free(self, vol: pb.VolumeSpec) -> None:
        """A volume of the same name may only be reused when it belongs to the stale copy this
        node left when the container migrated away from it, or, used by no container, when
        this node removed that stale copy (a migration back that then failed: `create`);
        anything else could be lost. Decided from this node's own records alone."""
        name = vol.name
        if not self.runtime.volume_exists(name):
            return
        users = self.runtime.volume_users(name)
        if users and all(self.is_migrated_away(u.id) for u in users):
            return
        if not users and self.store.is_departed_volume(name):
            return
        who = ", ".join(u.name for u in users) or "no container"
        raise AlreadyExists(
            f"{self.node} already has a volume named {name!r} (used by {who}); migrating would "
            "overwrite it: remove it first")

    def pre_copy(self, spec: pb.ContainerSpec) -> dict[str, Basis]:
        """Everything while the container runs; returns the bases for the final deltas, with
        their signatures already computed so the downtime path only does delta + patch.

        Cooperative: layers, read-only volume contents and bases for snapshots and checkpoint
        may come from neighbours (or this node's cache), fetched in parallel; what changed
        since their copies always comes from the source, as deltas."""
        sourcing = Sourcing(self.node, self.request.source_node, self.migration_id,
                            self.request.mode == pb.COOPERATIVE, self.registry,
                            self.links, self.store, self.connect, self.report, pb.PRE_COPY)
        missing = self.runtime.missing_layers(list(spec.diff_ids))
        for diff_id in spec.diff_ids:
            if diff_id not in missing:
                self.report.transfer("layer", diff_id, self.node, pb.PRE_COPY, 0, 0.0, "skipped",
                                     "already on this node")
        snaps = {v.name: self.source.call("SnapshotVolume", pb.SnapshotVolumeRequest(
            migration_id=self.migration_id, volume=v.name))
            for v in spec.volumes}
        for v in spec.volumes:
            self.room(snaps[v.name].size, f"the snapshot of volume {v.name}")
        app, svc = checkpoint_keys(spec)
        plan = sourcing.plan(
            [f"layer:{d}" for d in missing]
            + [f"ro:{snaps[v.name].digest}" for v in spec.volumes if v.read_only]
            + [f"rw:{v.volume_id}" for v in spec.volumes if not v.read_only and v.volume_id]
            + [svc, app])
        (self.area / "basis").mkdir(parents=True, exist_ok=True)
        whole: set[str] = set()          # volumes whose content came whole from a holder
        held_basis: dict[str, Path] = {}  # volume -> a holder's older snapshot of it
        ckpt_basis = self.area / "basis" / "checkpoint"

        def image() -> None:
            if not missing and self.runtime.has_image(spec.image_id):
                spec.image = self.runtime.ensure_tag(spec.image_id, spec.image)
                return
            (self.area / "layers").mkdir(exist_ok=True)
            files = {d: self.area / "layers" / f"{d[7:]}.tar" for d in missing}
            for d, dest in files.items():
                self.source.guarded(lambda d=d, dest=dest: sourcing.fetch_layer(
                    d, plan[f"layer:{d}"], self.source, dest))
            cfg = self.source.call("ImageConfig", pb.ImageRef(image=spec.image_id))
            if "sha256:" + hashlib.sha256(cfg.config).hexdigest() != spec.image_id:
                raise DeltaError("the source sent an image config that is not the image's")
            if json.loads(cfg.config).get("rootfs", {}).get("diff_ids") != list(spec.diff_ids):
                raise DeltaError("the image's config lists other layers than the source said")
            # No tags from the archive: a peer's tags would move this node's own.
            assemble(cfg.config, [], files, self.area / "image.tar")
            self.runtime.load_image(self.area / "image.tar")
            spec.image = self.runtime.ensure_tag(spec.image_id, spec.image)

        def read_only(vol: pb.VolumeSpec) -> None:
            want = snaps[vol.name].digest
            if sourcing.fetch_held("volume", vol.name, plan[f"ro:{want}"],
                                   self.area / snapshot_path(vol.name),
                                   verify=lambda p: _expect(p, want)):
                whole.add(vol.name)

        def snapshot_basis(vol: pb.VolumeSpec) -> None:
            dest = self.area / "basis" / f"{vol.name}.held.tar"
            if sourcing.fetch_held("volume snapshot basis", vol.name,
                                   plan.get(f"rw:{vol.volume_id}", []), dest):
                held_basis[vol.name] = dest

        def checkpoint_basis() -> None:
            dest = self.area / "basis" / "checkpoint.tar"
            if sourcing.fetch_held("checkpoint basis", svc, plan[svc] + plan[app], dest):
                ckpt_basis.mkdir()
                archive.restore(dest, ckpt_basis)

        (self.area / "volumes").mkdir(exist_ok=True)
        jobs = [image, checkpoint_basis] + [
            (lambda v=v: read_only(v)) if v.read_only else (lambda v=v: snapshot_basis(v))
            for v in spec.volumes]
        with ThreadPoolExecutor(max_workers=4) as pool:
            for fut in [pool.submit(job) for job in jobs]:
                fut.result()

        bases: dict[str, Basis] = {}
        for vol in spec.volumes:
            rel = snapshot_path(vol.name)
            local = self.area / rel
            if vol.name not in whole:
                basis = (Basis(held_basis[vol.name], make_signature(held_basis[vol.name]))
                         if vol.name in held_basis else self.local_volume_basis(vol.name))
                self.fetch(rel, local, snaps[vol.name], basis, "volume snapshot", vol.name,
                           pb.PRE_COPY)
            if not self.runtime.volume_exists(vol.name):
                self.entry.at_destination.created_volumes.append(vol.name)
                self.journal.save(self.entry)
            archive.restore(local, self.runtime.ensure_volume(vol))
            if vol.volume_id:
                self.store.remember_volume_id(vol.name, vol.volume_id)
            if not vol.read_only:
                bases[changes_path(vol.name)] = Basis(local, make_signature(local))
        self.snapshots_at = time.time()

        info = self.source.call("SnapshotRootfs", pb.SnapshotRootfsRequest(
            migration_id=self.migration_id))
        self.room(info.size, "the root filesystem's changes")
        self.fetch(ROOTFS, self.area / ROOTFS, info, None, "root filesystem", spec.name,
                   pb.PRE_COPY)
        bases[ROOTFS_CHANGES] = Basis(self.area / ROOTFS, make_signature(self.area / ROOTFS))

        if self.request.memory_transfer == POST_COPY:
            # no memory before the freeze (its pages come after the restore), and no pause
            self.create(spec)
            self.offer(bases)
            return bases
        ckpt = self.checkpoint_reply(self.source.call("Checkpoint", pb.CheckpointRequest(
            migration_id=self.migration_id, container=spec.id, name=PRE_CHECKPOINT,
            leave_running=True)), PRE_CHECKPOINT)
        self.pre_checkpoint = ckpt
        held = {f.path: Basis(ckpt_basis / Path(f.path).name,
                              make_signature(ckpt_basis / Path(f.path).name))
                for f in ckpt.files if _plain_file(ckpt_basis / Path(f.path).name)}
        self.fetch_checkpoint(PRE_CHECKPOINT, ckpt, held, pb.PRE_COPY)
        for f in ckpt.files:
            final_rel = f.path.replace(f"/{PRE_CHECKPOINT}/", f"/{FINAL_CHECKPOINT}/", 1)
            local = self.area / f.path
            bases[final_rel] = Basis(local, make_signature(local))
        self.create(spec)
        # the same checks as the final checkpoint's, before the freeze: a hostile source is
        # refused while its container still runs, and the filters' verdict is kept
        self.check_images(PRE_CHECKPOINT)
        self.offer(bases)
        return bases

    def no_post_copy(self) -> str:
        """Why post-copy cannot run between the source and this node; empty when it can."""
        there, here = self.source_info.no_post_copy, self.runtime.post_copy_problem()
        return (f"{self.source_name}: {there}" if there else
                f"{self.node}: {here}" if here else "")

    def open_page_server(self, spec: pb.ContainerSpec) -> PageServer | None:
        """A page server for the final checkpoint's memory, fed through the source's page
        tunnel, when the link is fast enough (agent.migration.policy), or a lazy-pages daemon
        when post-copy was asked for (launched once the images are here); None: the pages go
        in the final pass as deltas."""
        criu = criu_path()
        asked = self.request.memory_transfer
        how, why = memory_transfer(self.link, self.pre_checkpoint.method, criu, asked,
                                   self.no_post_copy() if asked == POST_COPY else "",
                                   min_rate=self.links.page_server_min_rate,
                                   last=self.links.chosen(self.source_address))
        if not asked and self.link is not None:
            self.links.choose(self.source_address, how)
        lazy = how == POST_COPY
        pre_pages = spec.memory_bytes if lazy else sum(
            f.size for f in self.pre_checkpoint.files if Path(f.path).name.startswith("pages-"))
        limit = max(PAGE_LIMIT_FACTOR * pre_pages, pre_pages + PAGE_LIMIT_SLACK)
        if how == PAGE_SERVER and shutil.disk_usage(self.area).free < limit:
            how, why = DELTA, f"the staging disk has less than {limit / 1e6:.0f} MB free"
        self.report.msg.memory_transfer = how
        self.report.log(f"final checkpoint's memory: {how} ({why})")
        if how == DELTA:
            return None
        assert criu is not None
        images = self.area / "checkpoints" / FINAL_CHECKPOINT
        # lazy: the restore finds the daemon's socket in its work folder (migctl-runc), one the
        # source's files never go to
        server = PageServer(criu, images, self.area / ("lazy-pages" if lazy else "page-server"),
                            limit, lazy=lazy)
        self.pages = server
        requests = itertools.chain(
            [pb.PageBytes(migration_id=self.migration_id, lazy=lazy)],
            (pb.PageBytes(data=data) for data in server.answers()))
        call = self.source.stub.PageTunnel(requests, timeout=ACCEPT_S + self.deadline(limit))
        server.cancel = call.cancel
        self.source.guarded(lambda: next(call))  # ready
        server.start(self.source.guarded_iter(r.data for r in call))
        return server

    def offer(self, bases: dict[str, Basis]) -> None:
        """The signatures of the final pass's bases go to the source now, not in the
        downtime."""
        def offers() -> Iterator[pb.BaseOffer]:
            for rel, basis in bases.items():
                for i, part in enumerate(basis.signature.to_chunks()):
                    yield pb.BaseOffer(migration_id=self.migration_id,
                                       path=rel if i == 0 else "", signature=part)

        size = sum(b.signature.wire_size for b in bases.values())
        self.source.call("OfferBases", offers(), timeout=self.deadline(size))

    def checkpoint_reply(self, reply: pb.CheckpointReply, name: str) -> pb.CheckpointReply:
        """The source's list of checkpoint files, if every path is one of checkpoint NAME's
        plain files, none repeats, and the staging disk can hold them all."""
        paths = [checkpoint_path(f.path, name) for f in reply.files]
        if len(set(paths)) != len(paths):
            raise Refused(f"checkpoint {name!r} lists a file twice")
        self.room(sum(f.size for f in reply.files), f"checkpoint {name!r}")
        return reply

    def keep(self, spec: pb.ContainerSpec, frozen_at: float) -> None:
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
            kept.append(self.store.put(key, frozen_at, ckpt, digest(ckpt), entitled=ends))
        self.publish(kept)

    def fetch_checkpoint(self, name: str, ckpt: pb.CheckpointReply, bases: dict[str, Basis],
                         phase: int) -> None:
        """All files of a checkpoint, reported as one transfer; files the destination holds an
        older copy of travel as deltas."""
        start = time.monotonic()
        total = DeltaStats(literal_bytes=0, matched_bytes=0, wire_bytes=0, new_size=0)
        for f in ckpt.files:
            basis = self.usable(bases.get(f.path), f.size, f.path)
            meter = self.report.meter("checkpoint", f"{name}: {Path(f.path).name}",
                                      0 if basis else f.size)
            got = self.source.guarded(lambda f=f, basis=basis, meter=meter: self.get(
                f.path, self.area / f.path, f, basis, meter))
            _add(total, got)
        self.report.transfer("checkpoint", f"{name} ({len(ckpt.files)} files)", self.source_name,
                             phase, total, time.monotonic() - start,
                             "delta" if bases else "whole")

    def local_volume_basis(self, name: str) -> Basis | None:
        """A volume this node already holds (a stale copy) is a good basis for its snapshot,
        when the container that left it here went to this migration's source: a basis is read
        by the delta the source sends, and a source naming another container's volume must
        not read it (check_volume_free lets it replace a stale copy, not read it)."""
        if not self.runtime.volume_exists(name):
            return None
        if self.departed_to(name) != self.source_name:
            self.report.log(f"volume {name}: the copy here left with a container that went to "
                            f"another node than {self.source_name}; not used as a basis")
            return None
        path = self.area / "basis" / f"{name}.tar"
        archive.snapshot(self.runtime.volume_path(name), path)
        return Basis(path, make_signature(path))

    def get(self, rel: str, dest: Path, info: pb.FileInfo, basis: Basis | None,
            meter: Callable[[int], None]) -> int | DeltaStats:
        """REL of the source's staging area into DEST, held to the size and digest the source
        announced in INFO, within a deadline derived from that size; METER counts its bytes."""
        timeout = self.deadline(info.size)
        if basis is None:
            return fetch_whole(self.source.stub, self.migration_id, rel, dest, info.digest,
                               size=info.size, timeout=timeout, on_bytes=meter)
        return fetch_delta(self.source.stub, self.migration_id, rel, basis.path, basis.signature,
                           dest, size=info.size, timeout=timeout, on_bytes=meter)

    def usable(self, basis: Basis | None, size: int, rel: str) -> Basis | None:
        """BASIS, unless its signature is larger than the source accepts for a file of SIZE
        (signature_block_cap: a cached basis of a much bigger container, a volume that
        shrank): then the file comes whole rather than the migration failing."""
        if basis is None or basis.signature.block_count <= signature_block_cap(
                size, DEFAULT_BLOCK_SIZE):
            return basis
        self.report.log(f"{Path(rel).name}: the basis ({basis.signature.basis_length} B) is "
                        f"too large for a file of {size} B; sent whole")
        return None

    def fetch(self, rel: str, dest: Path, expect: pb.FileInfo, basis: Basis | None, kind: str,
              item: str, phase: int) -> None:
        basis = self.usable(basis, expect.size, rel)
        meter = self.report.meter(kind, item, 0 if basis else expect.size)
        self.pull(kind, item, phase, lambda: self.get(rel, dest, expect, basis, meter),
                  "whole" if basis is None else "delta")

    def final_sync(self, spec: pb.ContainerSpec, final: pb.CheckpointReply,
                   bases: dict[str, Basis]) -> None:
        """One stream while frozen: the final checkpoint's files and what changed in each
        writable volume and the writable layer, applied here as each arrives."""
        final = self.checkpoint_reply(final, FINAL_CHECKPOINT)
        volumes = {changes_path(v.name): v for v in spec.volumes if not v.read_only}
        expected = {f.path for f in final.files} | set(volumes) | {ROOTFS_CHANGES}

        def dest_of(item: pb.FinalItem) -> Path:
            if item.path not in volumes and item.path != ROOTFS_CHANGES:
                checkpoint_path(item.path, FINAL_CHECKPOINT)  # or refused
            self.room(item.size, item.path)
            return self.area / item.path

        def basis_of(rel: str) -> Path | None:
            return bases[rel].path if rel in bases else None

        def meter_of(item: pb.FinalItem) -> Callable[[int], None]:
            kind, name = (("volume snapshot", volumes[item.path].name) if item.path in volumes
                          else ("root filesystem", spec.name) if item.path == ROOTFS_CHANGES
                          else ("checkpoint", f"{FINAL_CHECKPOINT}: {Path(item.path).name}"))
            return self.report.meter(kind, name, item.size if item.method == "whole" else 0)

        bound = sum(f.size for f in final.files) + sum(v.size_bytes for v in volumes.values())
        ckpt = DeltaStats(literal_bytes=0, matched_bytes=0, wire_bytes=0, new_size=0)
        ckpt_seconds = 0.0

        def run() -> set[str]:
            nonlocal ckpt_seconds
            stream = self.source.stub.FinalSync(pb.FinalSyncRequest(
                migration_id=self.migration_id, delta_format=DELTA_FORMAT),
                timeout=self.deadline(bound))
            got: set[str] = set()
            for r in final_pass.receive(stream, dest_of, basis_of, meter_of):
                got.add(r.path)
                local = self.area / r.path
                if r.path in volumes:
                    name = volumes[r.path].name
                    self.report.transfer("volume snapshot", name, self.source_name,
                                         pb.FINAL_SYNC, r.result, r.seconds, r.method,
                                         "what changed since pre-copy")
                    archive.apply_changes(local, self.runtime.volume_path(name))
                elif r.path == ROOTFS_CHANGES:
                    self.report.transfer("root filesystem", spec.name, self.source_name,
                                         pb.FINAL_SYNC, r.result, r.seconds, r.method,
                                         "what changed since pre-copy")
                    self.apply_rootfs(self.new_container, local, changes=True)
                else:
                    _add(ckpt, r.result)
                    ckpt_seconds += r.seconds
            return got

        got = self.source.guarded(run)
        if expected - got:
            raise Refused("the final pass left out " + ", ".join(sorted(expected - got)))
        self.report.transfer("checkpoint", f"{FINAL_CHECKPOINT} ({len(final.files)} files)",
                             self.source_name, pb.FINAL_SYNC, ckpt, ckpt_seconds, "delta")

    def create(self, spec: pb.ContainerSpec) -> None:
        """Create the new container before the freeze, so that the restore only starts it;
        until it runs, a rollback removes it (agent/migration/recovery.py)."""
        stale = self.existing_container(spec.name)
        if stale:  # departed (request_phase): its volumes stay replaceable once it is gone
            self.store.mark_volumes_departed(stale.id, list(stale.volumes))
            self.runtime.remove(stale.id)
        new = self.entry.at_destination.new_container = self.runtime.create_like(
            spec, self.request.allow_privileged)
        self.confine()  # here, before the freeze: the engine is asked outside the downtime
        if self.request.memory_transfer == POST_COPY:
            # until every page arrived, a restart (after the kill of a copy whose pages cannot
            # come) would run it afresh, without its memory: its policy comes at the end
            policy = self.runtime.restart_policy(new)
            if restarts(policy):
                self.runtime.set_restart_policy(new, {"Name": "no"})
                self.entry.at_destination.restart_policy = policy
        self.journal.save(self.entry)
        self.apply_rootfs(self.new_container, self.area / ROOTFS)

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

    def restore(self, spec: pb.ContainerSpec, pages: PageServer | None = None) -> None:
        """PAGES: post-copy; its lazy-pages daemon starts first (journaled as lazy: a restarted
        agent removes a copy whose pages may not all have arrived, then stops the daemon)."""
        cid = self.new_container
        self.step(State.RESTORING, lazy=pages is not None)
        self.report.msg.restore_method = self.runtime.method_for(cid)
        if pages is not None:
            start = time.monotonic()
            pages.launch()
            self.report.log(f"lazy-pages daemon ready in {time.monotonic() - start:.2f} s")
        self.runtime.start_from_checkpoint(
            cid, self.area / "checkpoints" / FINAL_CHECKPOINT, f"migctl-{self.migration_id}",
            lazy_in=pages.work if pages is not None else None)

        def running() -> None:
            self.report.running()
            if pages is not None:  # should the daemon fail, the process stops before it reads
                # zeros (set as soon as it runs, not after the restore's settle)
                pages.on_fail = kill_now(self.runtime.state(cid).pid)
                if pages.proc is not None and pages.proc.poll() not in (None, 0):
                    pages.on_fail()

        self.runtime.wait_running(cid, on_running=running)

    def page_in(self, pages: PageServer) -> None:
        """Post-copy: the container runs; it is done once the daemon has every page."""
        self.step(State.PAGING_IN)
        got = pages.finish(self.deadline(pages.limit))
        done = pages.exited_at or time.monotonic()
        running = min(self.report.running_at or done, done)  # a small one may beat the mark
        self.report.msg.pages_seconds = done - running
        policy = self.entry.at_destination.restart_policy
        if policy:  # complete: it may be restarted now
            self.runtime.set_restart_policy(self.new_container, policy)
        rate = (f"; the link measured {self.link.throughput / 1e6:.0f} MB/s before the freeze"
                if self.link else "")
        self.report.transfer("checkpoint", f"{FINAL_CHECKPOINT}: memory pages",
                             self.source_name, pb.PAGE_IN, got, done - running, "whole",
                             f"post-copy: faulted in, the rest pushed{rate}")

    def apply_rootfs(self, cid: str, layer: Path, changes: bool = False) -> None:
        """What the container wrote to its root filesystem goes into the new container's
        writable layer before the restore (CRIU reopens the files its process held): the
        pre-copy archive when the container is created, then what changed, in place."""
        upper = self.runtime.upper_dir(cid)
        if upper is not None:
            (apply_layer_changes if changes else restore_layer)(layer, upper)
            return
        with tarfile.open(layer) as tar:
            wrote = bool(tar.getmembers())
        if wrote:
            raise FailedPrecondition(f"{self.node}'s storage driver keeps no writable layer "
                                     "that migctl can fill (overlay2 is needed)")

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



def kill_now(pid: int) -> Callable[[], None]:
    """A kill of the container's first process (and so its PID namespace) by pid: faster than
    any engine call; psutil checks that the pid is still that process."""
    try:
        proc = psutil.Process(pid) if pid > 0 else None
    except psutil.Error:
        proc = None

    def kill() -> None:
        with contextlib.suppress(psutil.Error):
            if proc is not None and proc.is_running():
                log.warning("the lazy-pages daemon ended before every page arrived: killing "
                            "the restored process %d", pid)
                proc.kill()
    return kill


def _add(total: DeltaStats, got: int | DeltaStats) -> None:
    """Add one file's transfer (a delta's statistics, or a whole file's size) to TOTAL."""
    if isinstance(got, DeltaStats):
        total.literal_bytes += got.literal_bytes
        total.matched_bytes += got.matched_bytes
        total.wire_bytes += got.wire_bytes
        total.new_size += got.new_size
    else:
        total.literal_bytes += got
        total.wire_bytes += got
        total.new_size += got


def _plain_file(path: Path) -> bool:
    """A neighbour's archive may hold symlinks: a basis is only ever a regular file of its own
    (a link could point at /proc/kcore, or at a secret whose block hashes would leave)."""
    return path.is_file() and not path.is_symlink()


def _expect(path: Path, want: str) -> None:
    if digest(path) != want:
        raise DeltaError(f"{path.name}: not the content the source holds")


def preflight(source: pb.NodeInfo, here: pb.NodeInfo, spec: pb.ContainerSpec) -> None:
    """Refuse before anything is frozen what would fail after (`preflight_problems`)."""
    problems = preflight_problems(source, here, spec)
    if problems:
        raise FailedPrecondition("pre-flight check failed: " + "; ".join(problems))


def preflight_problems(source: pb.NodeInfo, here: pb.NodeInfo,
                       spec: pb.ContainerSpec) -> list[str]:
    """What would fail after the freeze: engines that cannot checkpoint, CRIU versions that
    cannot read each other's images, too little disk or memory here."""
    problems = []
    for info in (source, here):
        if not info.checkpoints_enabled:
            problems.append(f"the engine of {info.node} is not in experimental mode "
                            "(checkpoints need it)")
        if not info.criu_version:
            problems.append(f"{info.node} has no CRIU")
    theirs, ours = _version(source.criu_version), _version(here.criu_version)
    if theirs and ours and (ours[:1] != theirs[:1] or ours < theirs):
        problems.append(f"CRIU {here.criu_version} on {here.node} cannot be trusted to restore "
                        f"images of CRIU {source.criu_version} on {source.node}")
    volumes = sum(v.size_bytes for v in spec.volumes)
    # pre-copy and final copies of volume snapshots and checkpoints, plus a basis each
    staging_need = 3 * volumes + 3 * spec.memory_bytes
    if here.staging_free_bytes < staging_need:
        problems.append(f"{here.node} has {here.staging_free_bytes / 1e6:.1f} MB free for "
                        f"staging, the migration needs about {staging_need / 1e6:.1f} MB")
    if here.engine_free_bytes < volumes:
        problems.append(f"{here.node} has {here.engine_free_bytes / 1e6:.1f} MB free for "
                        f"volumes, they need {volumes / 1e6:.1f} MB")
    if here.memory_available_bytes < spec.memory_bytes:
        problems.append(f"{here.node} has {here.memory_available_bytes / 1e6:.0f} MB of memory "
                        f"available, the container uses {spec.memory_bytes / 1e6:.0f} MB")
    return problems


def ports_taken(spec: pb.ContainerSpec, users: dict[tuple[str, str, int], str],
                listening: set[tuple[str, str, int]]) -> list[str]:
    """The host ports SPEC publishes that a container (USERS) or a process of this node
    (LISTENING) already holds on an overlapping address, as "PORT/PROTO (used by WHO)"."""
    holders = [*users.items(), *((key, "a process of this node") for key in listening)]
    taken = []
    for binding in spec.ports:
        if not binding.host_port.isdigit():  # none: the engine picks a free one
            continue
        proto, port = port_protocol(binding.container_port), int(binding.host_port)
        who = next((name for (p, address, n), name in holders  # containers named first
                    if (p, n) == (proto, port) and _overlap(address, binding.host_ip)), "")
        if who:
            taken.append(f"{port}/{proto} (used by {who})")
    return taken


def _overlap(a: str, b: str) -> bool:
    """Two bind addresses that would collide: the same, or either one every address."""
    return a in ANY_ADDRESS or b in ANY_ADDRESS or a == b


ANY_ADDRESS = ("", "0.0.0.0", "::")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())
