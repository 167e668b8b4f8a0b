"""The source's half of a migration: authorize, begin, freeze, commit, resume, and the lease.

Exactly one copy must run. The source resumes a frozen container on its own only while the
destination has not committed: when the destination falls silent for longer than the lease,
or when the source agent restarts. After the commit, only the destination may ask it to resume.

Zero trust: a migration exists here only once an operator authorized it (`authorize`), bound
to one container and one destination node. Every later call must come from that node and
concern that container (`bound`), and every state change goes through the journal's table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from migctl.agent.catalog.registry import checkpoint_keys
from migctl.agent.catalog.store import Item, Store
from migctl.agent.dataplane import archive
from migctl.agent.dataplane.files import flush_writes
from migctl.agent.dataplane.pages import (
    LAZY_PORT,
    Listener,
    PrivateNetns,
    connect_in,
    end_criu,
    processes_in,
    remove_netns,
    stale_netns,
)
from migctl.agent.dataplane.rootfs import snapshot_layer
from migctl.agent.dataplane.staging import Staging
from migctl.agent.dataplane.tree import Manifest
from migctl.agent.delta import DEFAULT_BLOCK_SIZE, Signature, signature_block_cap
from migctl.agent.metrics import Metrics
from migctl.agent.migration import journal as j
from migctl.agent.migration.state import PEER, SELF, SOURCE, State
from migctl.agent.runtime.base import Runtime, restarts
from migctl.agent.runtime.spec import checkpoint_path, unsupported
from migctl.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    MigctlError,
    NotFound,
    PermissionDenied,
    RuntimeFailure,
)
from migctl.proto import migctl_pb2 as pb

log = logging.getLogger(__name__)

PRE_CHECKPOINT = "pre"
FINAL_CHECKPOINT = "final"
AUTHORIZATION_SECONDS = 120.0  # an authorized migration not begun by then is dropped
HOLD_SILENCE = 2.0   # a destination's hold silent this long is lost: the source resumes
HOLD_TICK = 0.2      # how often a hold is looked at
ABANDONED_LEASES = 10          # a pre-copy silent for this many leases is dropped


def snapshot_path(volume: str) -> str:
    """The staging path of a volume snapshot: a fixed template, never a name from the wire."""
    return f"volumes/{volume}.tar"


ROOTFS = "rootfs.tar"  # the staging path of the writable layer's archive
ROOTFS_CHANGES = "rootfs.changes.tar"


def changes_path(volume: str) -> str:
    """The final pass's archive of what changed in VOLUME since its snapshot."""
    return f"volumes/{volume}.changes.tar"


def manifest_path(rel: str) -> str:
    """Where the source keeps the manifest of the snapshot at REL (agent/dataplane/tree.py)."""
    return f"{rel}.manifest"


def pre_copy_of(final_rel: str) -> str:
    """The pre-copy file whose copy at the destination is the basis of FINAL_REL."""
    if final_rel == ROOTFS_CHANGES:
        return ROOTFS
    if final_rel.startswith("volumes/") and final_rel.endswith(".changes.tar"):
        return final_rel.removesuffix(".changes.tar") + ".tar"
    return checkpoint_path(final_rel, FINAL_CHECKPOINT).replace(
        f"checkpoints/{FINAL_CHECKPOINT}/", f"checkpoints/{PRE_CHECKPOINT}/", 1)


def criu_words(error: str) -> str:
    """ERROR, and the first error CRIU's log gives (the engine names the log; it may be gone)."""
    match = re.search(r"(?:log file:|path=) *(\S+?\.log)", error)
    if match:
        with contextlib.suppress(OSError):
            for line in Path(match[1]).read_text(errors="replace").splitlines():
                if "Error (" in line and not any(n in line for n in CRIU_NOISE):
                    return f"{error} — CRIU: {line.strip()}"
    return error


CRIU_NOISE = ("Can't setup RLIMIT_NOFILE for self", "Dumping FAILED", "Restoring FAILED")
"""Error lines of CRIU's log that are not why it failed: the first is logged on every run on
machines whose root lacks CAP_SYS_RESOURCE (HOST.md), the others only say that it did."""


@dataclass
class Underway:
    """What the source holds in memory of one migration in flight (the journal holds its state
    and data): one object, so that ending the migration forgets all of it at once."""

    last_seen: float = field(default_factory=time.monotonic)  # the destination's last call
    resuming: bool = False  # a resume under way in this process
    freezing: bool = False  # its final checkpoint under way: no lease runs out
    hold_lost: bool = False  # the destination's hold broke during that checkpoint
    offers: dict[str, Signature] = field(default_factory=dict)  # bases for the final pass
    tunnel: Listener | None = None  # its page tunnel, open for the final checkpoint
    serving: threading.Thread | None = None  # its lazy checkpoint, serving the pages
    lazy_done: threading.Event | None = None  # set when that checkpoint ended
    refusing: threading.Thread | None = None  # connection resets being set up


class SourceSide:
    def __init__(self, runtime: Runtime, staging: Staging, journal: j.Journal,
                 store: Store, lease_seconds: float,
                 publish: Callable[[list[Item]], None] = lambda _: None,
                 metrics: Metrics | None = None, netns_prefix: str = "migctl-pc-") -> None:
        self.publish = publish
        self.netns_prefix = netns_prefix  # this node's lazy checkpoints' network namespaces
        self.metrics = metrics or Metrics()
        self.runtime = runtime
        self.staging = staging
        self.journal = journal
        self.store = store
        self.lease = lease_seconds
        self._lock = threading.Lock()
        self._underway: dict[str, Underway] = {}

    def underway(self, migration_id: str) -> Underway:
        """MIGRATION_ID's object (made on first use: a restarted agent has none)."""
        return self._underway.setdefault(migration_id, Underway())

    def _known(self, migration_id: str) -> Underway:
        """Its object if it has one, else a blank one that is not kept (a read)."""
        return self._underway.get(migration_id) or Underway()

    def _forget(self, migration_id: str) -> None:
        with self._lock:
            self._underway.pop(migration_id, None)

    def touch(self, migration_id: str) -> None:
        """Every call of the destination about a migration renews its lease."""
        self.underway(migration_id).last_seen = time.monotonic()

    # -- asking CRIU --------------------------------------------------------------------------

    def trial(self, container: str) -> pb.TrialReply:
        """A checkpoint of CONTAINER left running, into a scratch folder removed at once: what
        CRIU says of it now (the pre-flight reads /proc; CRIU knows more). Not while a
        migration of it is under way: both would checkpoint it."""
        cid = self.runtime.state(container).id
        if not self.runtime.running(cid):
            raise FailedPrecondition(f"{container!r} does not run: there is nothing to dump")
        scratch = self.staging.root / f"trial-{uuid.uuid4().hex[:16]}"
        with self._lock:
            for other in self.journal.in_flight(SOURCE):
                if other.container == cid:
                    raise FailedPrecondition(f"{container!r} is being migrated (migration "
                                             f"{other.id}); ask CRIU once it ended")
            start = time.monotonic()
            try:
                self.runtime.checkpoint(cid, "trial", scratch, leave_running=True)
                problem = ""
            except RuntimeFailure as err:
                problem = criu_words(str(err))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return pb.TrialReply(problem=problem, seconds=time.monotonic() - start)

    # -- binding -----------------------------------------------------------------------------

    def authorize(self, container: str, destination: str) -> tuple[str, str]:
        """The operator's consent: a new migration id bound to CONTAINER and DESTINATION.
        What every destination refuses, whatever the operator allows, is refused here too: a
        hostile bound destination would otherwise snapshot what an honest one refuses (a
        volume over a host folder). Privileged powers are the operator's to allow at the
        destination; they reveal nothing of this node."""
        spec = self.runtime.describe(container)
        described = unsupported(spec)  # what the description alone shows; the rest is what
        problems = unsupported(spec, allow_privileged=True) + [  # its processes hold (CRIU)
            p for p in spec.unsupported if p not in described]
        if problems:
            raise FailedPrecondition(f"container {spec.name!r} cannot be migrated: "
                                     + "; ".join(problems))
        migration_id = uuid.uuid4().hex[:16]
        with self._lock:
            for other in self.journal.in_flight(SOURCE):
                if other.container == spec.id:
                    raise AlreadyExists(
                        f"{spec.name!r} is already being migrated (migration {other.id} to "
                        f"{other.peer}, {other.state}); wait for it to end")
            self.journal.create(j.Entry(
                migration_id, SOURCE, spec.id, State.AUTHORIZED, peer=destination,
                data=j.SourceData(
                    name=spec.name, authorized_at=time.time(),
                    keys=list(checkpoint_keys(spec)),
                    volumes={v.name: {"read_only": v.read_only,
                                      "guid": v.labels.get("rw-guid", "")}
                             for v in spec.volumes})))
        self.staging.create(migration_id)
        self.touch(migration_id)
        return migration_id, spec.id

    def bound(self, migration_id: str, caller: str, container: str = "",
              ended_ok: bool = False) -> j.Entry:
        """The migration's entry, if CALLER is the node it is bound to and CONTAINER (when
        named) is its container; PermissionDenied otherwise, with the same words whether the
        id is unknown or someone else's (no oracle for ids). An ended migration is refused
        unless ENDED_OK (a Resume, which says itself what an ended migration allows)."""
        entry = self.journal.get(migration_id, SOURCE)
        if entry is None or entry.peer != caller:
            raise PermissionDenied(f"{caller} has no migration {migration_id} on this node")
        if container and container not in (entry.container, entry.at_source.name):
            raise PermissionDenied(f"migration {migration_id} is not about {container!r}")
        if entry.ended and not ended_ok:
            raise FailedPrecondition(f"migration {migration_id} has ended ({entry.state})")
        self.touch(migration_id)
        return entry

    def begin(self, entry: j.Entry) -> pb.ContainerSpec:
        age = time.time() - entry.at_source.authorized_at
        if entry.state == State.AUTHORIZED and age > AUTHORIZATION_SECONDS:
            self._drop(entry)
            raise FailedPrecondition(f"migration {entry.id} was authorized {age:.0f} s ago "
                                     f"and has expired ({AUTHORIZATION_SECONDS:.0f} s)")
        spec = self.runtime.describe(entry.container)
        self.journal.move(entry.id, SOURCE, State.PRE_COPY, by=PEER,  # a replay fails here
                          data={"moves_address": bool(spec.endpoints)})
        self.metrics.started.labels(SOURCE).inc()
        return spec

    def vouch(self, migration_id: str, destination: str) -> list[str]:
        """For a holder of cached items: the keys DESTINATION may fetch for MIGRATION_ID, if it
        is that live migration's bound destination (PermissionDenied otherwise). Checkpoints of
        the container's image and service, its writable volumes' snapshots, the content of its
        read-only volumes as snapshotted here."""
        entry = self.journal.get(migration_id, SOURCE)
        if entry is None or entry.peer != destination or entry.ended or \
                entry.state == State.AUTHORIZED:
            raise PermissionDenied(f"{destination} has no live migration {migration_id} from "
                                   "this node")
        volumes = entry.at_source.volumes
        # the service's checkpoints only: an application's (app:<image>) may be another
        # container's of the same image, and a destination would read its memory
        keys = [k for k in entry.at_source.keys if not k.startswith("app:")]
        keys += [f"rw:{self.store.volume_id(name, v.get('guid', ''))}"
                 for name, v in volumes.items() if not v.get("read_only")]
        keys += [f"ro:{snap['digest']}" for snap in entry.at_source.snapshots.values()
                 if volumes.get(snap["volume"], {}).get("read_only")]
        return keys

    def volume_of(self, entry: j.Entry, volume: str) -> dict:
        if volume not in entry.at_source.volumes:
            raise PermissionDenied(f"{volume!r} is not a volume of migration {entry.id}'s "
                                   "container")
        return entry.at_source.volumes[volume]

    # -- the steps the destination asks for -------------------------------------------------

    def snapshot_taken(self, entry: j.Entry, volume: str, info: pb.FileInfo) -> None:
        with self._lock:  # read fresh: the entry may have moved (and gained data) meanwhile
            entry = self.journal.get(entry.id, SOURCE) or entry
            entry.at_source.snapshots[info.path] = {
                "volume": volume, "digest": info.digest, "ts": time.time()}
            self.journal.save(entry)

    def keep_last_snapshots(self, entry: j.Entry) -> None:
        """The source keeps its last snapshot of each volume: a good basis when the container
        comes back, or for a neighbour's migration."""
        kept = []
        area = self.staging.root / entry.id
        for rel, snap in entry.at_source.snapshots.items():
            vol = entry.at_source.volumes.get(snap["volume"], {})
            if vol.get("read_only"):
                key, ts = f"ro:{snap['digest']}", 0.0
                if self.store.find(key):
                    self.store.entitle(key, ts, [entry.peer])
                    continue
            else:  # the pre-copy snapshot: an older copy is still a good basis
                vid = self.store.volume_id(snap["volume"], vol.get("guid", ""))
                key, ts = f"rw:{vid}", snap["ts"]
            if (area / rel).exists():
                # the container's data: for a migration back from where it went (Item.entitled)
                kept.append(self.store.put(key, ts, area / rel, snap["digest"], move=True,
                                           entitled=[entry.peer]))
        self.publish(kept)

    def open_tunnel(self, entry: j.Entry, lazy: bool = False) -> Listener:
        """A page tunnel for the final checkpoint: opened in pre-copy, one per migration."""
        with self._lock:
            now = self.journal.get(entry.id, SOURCE)
            if now is None or now.state != State.PRE_COPY:
                raise j.IllegalTransition(f"migration {entry.id} is "
                                          f"{now.state if now else 'gone'}: a page tunnel is "
                                          "opened before the final checkpoint")
            u = self.underway(entry.id)
            if u.tunnel is not None:
                raise FailedPrecondition(f"migration {entry.id} already has a page tunnel open")
            listener = u.tunnel = Listener(lazy)  # the slot, before anything
        if not lazy:
            return listener
        try:  # made now, not in the frozen window; gone with the last holder of the tunnel
            problem = self.runtime.post_copy_problem()  # this node's own word, not the peer's
            if problem:
                raise FailedPrecondition(f"this node cannot serve pages lazily: {problem}")
            netns = PrivateNetns(f"{self.netns_prefix}{entry.id[:12]}")
            listener.netns, listener.on_close = netns.path, netns.remove
        except BaseException:
            self.close_tunnel(entry.id, listener)
            raise
        return listener

    def close_tunnel(self, migration_id: str, listener: Listener) -> None:
        """The stream ended; the port stays bound while a checkpoint still holds it."""
        with self._lock:
            u = self._underway.get(migration_id)
            if u is not None and u.tunnel is listener:
                u.tunnel = None
        listener.release()

    def _abort_tunnel(self, migration_id: str) -> None:
        with self._lock:
            tunnel = self._known(migration_id).tunnel
        if tunnel is not None:
            tunnel.abort()

    def checkpoint(self, entry: j.Entry, request: pb.CheckpointRequest) -> Path:
        if (request.name, request.leave_running) not in ((PRE_CHECKPOINT, True),
                                                         (FINAL_CHECKPOINT, False)):
            raise InvalidArgument(f"checkpoints are {PRE_CHECKPOINT!r} (leave running) or "
                                  f"{FINAL_CHECKPOINT!r} (stop), not {request.name!r} with "
                                  f"leave_running={request.leave_running}")
        area = self.staging.area(entry.id)
        if (request.page_server or request.lazy_pages) and request.name != FINAL_CHECKPOINT:
            raise InvalidArgument("only the final checkpoint sends its pages to a page server")
        if request.page_server and request.lazy_pages:
            raise InvalidArgument("a final checkpoint sends its pages to a page server or serves "
                                  "them lazily, not both")
        keep = request.keep_connections
        if keep and request.name != FINAL_CHECKPOINT:
            raise InvalidArgument("only the final checkpoint carries the TCP connections")
        # its copy here must not answer for an address the destination's copy takes over
        isolate = dataclasses.replace(entry.at_source, keep_connections=keep).isolated
        if request.leave_running:
            if entry.state != State.PRE_COPY:
                raise j.IllegalTransition(f"migration {entry.id} is {entry.state}: no "
                                          "pre-copy checkpoint now")
        else:
            lazy = request.lazy_pages
            tunnel = self.tunnel_for(entry, lazy) if request.page_server or lazy else None
            # Journal first: if the agent dies during the checkpoint, a restart resumes, and
            # puts back the restart policy, which must be "no" while the container is stopped
            # here (the engine would start it again: a second copy). With a page server, the
            # container is paused and stays so: its memory there is the rollback.
            try:
                policy = self.runtime.restart_policy(entry.container)
                with self._lock:
                    self.journal.move(entry.id, SOURCE, State.FROZEN, by=PEER,
                                      data={"restart_policy": policy, "paused": bool(tunnel),
                                            "lazy": lazy, "keep_connections": keep})
                    self.underway(entry.id).freezing = True
            except BaseException:
                if tunnel is not None:
                    tunnel.release()
                raise
            serving = False
            try:
                if restarts(policy):
                    self.runtime.set_restart_policy(entry.container, {"Name": "no"})
                if tunnel is not None:
                    self.runtime.pause(entry.container)
                if isolate:
                    # The destination takes its address over: its network namespace outlives
                    # the checkpoint that stops it (the engine removes it a moment later), and
                    # what its kernel took from now on would never reach the destination. It
                    # answers for its addresses no longer.
                    self.runtime.isolate(entry.container, True)
                if tunnel is None:
                    return self.runtime.checkpoint(entry.container, request.name,
                                                   area / "checkpoints", False,
                                                   keep_connections=keep)
                if lazy:
                    serving = True  # the checkpoint's thread releases the tunnel
                    folder = self._lazy_checkpoint(entry, tunnel, area / "checkpoints", keep)
                else:
                    folder = self.runtime.checkpoint(entry.container, request.name,
                                                     area / "checkpoints", True, tunnel.address,
                                                     keep_connections=keep)
                if not isolate:
                    # its clients' connections are reset: they fail over at once (to its new
                    # address). After the images (never in them), and off the frozen window
                    refusing = threading.Thread(target=self._refuse,
                                                args=(entry.container, True),
                                                name=f"refuse-{entry.id}", daemon=True)
                    with self._lock:
                        self.underway(entry.id).refusing = refusing
                    refusing.start()
                return folder
            finally:
                if tunnel is not None and not serving:
                    tunnel.release()  # runc is done with the port
                with self._lock:
                    u = self.underway(entry.id)
                    lost, u.freezing, u.hold_lost = u.hold_lost, False, False
                self.touch(entry.id)  # the lease counts from the end of the checkpoint
                if lost:  # the destination's hold broke while CRIU was dumping
                    self._resume_quietly(entry.id)
        folder = self.runtime.checkpoint(entry.container, request.name, area / "checkpoints",
                                         True, before_final=True)
        flush_writes()  # the snapshots and this checkpoint, before the freeze
        return folder

    def tunnel_for(self, entry: j.Entry, lazy: bool = False) -> Listener:
        """The migration's open page tunnel (LAZY: one for a lazy checkpoint), on a node that
        can send pages to it."""
        if self.runtime.method_for(entry.container) != "direct":
            raise FailedPrecondition(f"{entry.container[:12]} is checkpointed through the "
                                     "engine, which cannot send pages to a page server")
        with self._lock:
            tunnel = self._known(entry.id).tunnel
            if tunnel is None or tunnel.lazy != lazy or (lazy and tunnel.netns is None) \
                    or not tunnel.hold():  # a lazy one is ready once its namespace is
                # held: the port stays ours until released
                raise FailedPrecondition(f"migration {entry.id} has no "
                                         f"{'lazy ' if lazy else ''}page tunnel open for the "
                                         "page server")
        return tunnel

    def _lazy_checkpoint(self, entry: j.Entry, tunnel: Listener, directory: Path,
                         keep_connections: bool = False) -> Path:
        """Post-copy: CRIU dumps all but the memory pages, then serves those from its page server
        in a network namespace of this checkpoint's own, until the destination's lazy-pages
        daemon has them all. Returns once the other images are written (the page server then
        listens): the connection this agent makes to it goes into the lazy tunnel; the
        checkpoint's thread ends with CRIU, and only then is the container free to resume."""
        netns = tunnel.netns
        assert netns is not None
        start = time.monotonic()
        done = threading.Event()
        failed: list[BaseException] = []

        def serve() -> None:
            try:
                self.runtime.checkpoint(entry.container, FINAL_CHECKPOINT, directory, True,
                                        f"127.0.0.1:{LAZY_PORT}", netns,
                                        keep_connections=keep_connections)
            except BaseException as err:  # noqa: BLE001 - said by the caller, or logged
                failed.append(err)
                log.warning("migration %s: the lazy checkpoint ended: %s", entry.id, err)
            finally:
                with self._lock:  # first: a commit from now on is refused
                    self._known(entry.id).serving = None
                done.set()
                tunnel.abort()  # CRIU is gone: the relay ends too
                with contextlib.suppress(Exception):
                    tunnel.release()  # the last holder removes the namespace
                log.info("migration %s: the lazy checkpoint ended after %.2f s", entry.id,
                         time.monotonic() - start)

        thread = threading.Thread(target=serve, name=f"lazy-{entry.id}", daemon=True)
        with self._lock:
            u = self.underway(entry.id)
            u.serving, u.lazy_done = thread, done
        thread.start()
        try:
            tunnel.attach(connect_in(netns, LAZY_PORT,
                                     give_up=lambda: done.is_set() or tunnel.aborted))
        except BaseException:
            self._end_criu(entry.container, netns, done)
            if failed:
                raise failed[0] from None
            raise
        log.info("migration %s: the lazy checkpoint's page server serves after %.2f s",
                 entry.id, time.monotonic() - start)
        return directory / FINAL_CHECKPOINT

    def _refuse(self, container: str, refuse: bool) -> None:
        """A paused copy resets new connections (its clients try elsewhere at once); failing
        to set that up only costs clients time."""
        try:
            self.runtime.refuse_connections(container, refuse)
        except MigctlError as err:
            log.warning("%s: connections: %s", container[:12], err)

    def take_connections_again(self, migration_id: str, container: str) -> None:
        """Before a paused copy runs here again: the resets go (after their setup ended). A
        failure fails the resume, which is retried: a copy that refuses every client would
        look like it runs."""
        with self._lock:
            u = self._known(migration_id)
            refusing, u.refusing = u.refusing, None
        if refusing is not None:
            refusing.join(30)
        self.runtime.refuse_connections(container, False)

    def _end_criu(self, container: str, netns: Path, done: threading.Event,
                  timeout: float = 60.0) -> None:
        """End a lazy checkpoint's CRIU (pages.end_criu), and wait for its checkpoint."""
        end_criu(netns, lambda: not done.is_set(),
                 lambda: self.runtime.freeze(container) if container else None, timeout)
        done.wait(timeout)

    def stop_serving(self, migration_id: str, timeout: float = 60.0) -> None:
        """A lazy checkpoint's CRIU stops serving pages (its tunnel is cut), and is waited for:
        the container must not run here while CRIU still hands its memory out."""
        with self._lock:
            u = self._known(migration_id)
            thread, tunnel, done = u.serving, u.tunnel, u.lazy_done
        self._abort_tunnel(migration_id)
        if thread is None:
            return
        thread.join(min(timeout, 5.0))
        if thread.is_alive() and tunnel is not None and tunnel.netns is not None and done:
            entry = self.journal.get(migration_id, SOURCE)
            self._end_criu(entry.container if entry else "", tunnel.netns, done, timeout)
            thread.join(timeout)
        if thread.is_alive():
            raise FailedPrecondition(f"migration {migration_id}: CRIU still serves the "
                                     "container's pages here; it cannot resume yet")

    def still_paused(self, entry: j.Entry) -> None:
        """A container paused for a page-server checkpoint must still be paused when its
        changes are read and when it is handed over: run since, its memory is newer than the
        pages sent (someone unpaused it, or its engine stopped it)."""
        if entry.at_source.paused and not self.runtime.state(entry.container).paused:
            raise FailedPrecondition(f"{entry.container[:12]} is no longer paused here since its "
                                     "final checkpoint: its memory moved on")

    def offer(self, entry: j.Entry, rel: str, chunks: Iterator[bytes]) -> None:
        """Keep the destination's signature of its basis for REL's final pass; REL must be a
        final path whose pre-copy file exists here, which caps the signature's size."""
        if entry.state != State.PRE_COPY:
            raise j.IllegalTransition(f"migration {entry.id} is {entry.state}: bases are "
                                      "offered during pre-copy")
        pre = self.staging.resolve(entry.id, pre_copy_of(rel))
        if not pre.is_file():
            raise InvalidArgument(f"{rel!r} has no pre-copy file here to be the basis of")
        signature = Signature.from_chunks(chunks, max_blocks=signature_block_cap(
            pre.stat().st_size, DEFAULT_BLOCK_SIZE))
        with self._lock:
            self.underway(entry.id).offers[rel] = signature

    def final_items(self, entry: j.Entry, upper: Path | None) -> Iterator[tuple[str, Path]]:
        """What the final pass sends, made as it is needed: the final checkpoint's files, then
        an archive of what changed in each writable volume and in the writable layer."""
        if entry.state != State.FROZEN or self._known(entry.id).freezing:
            raise j.IllegalTransition(f"migration {entry.id} is {entry.state}: the final pass "
                                      "follows the final checkpoint")
        self.still_paused(entry)
        area = self.staging.area(entry.id)
        folder = area / "checkpoints" / FINAL_CHECKPOINT
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.is_symlink():
                yield str(path.relative_to(area)), path
        for name, vol in sorted(entry.at_source.volumes.items()):
            if not vol.get("read_only"):
                yield self._changes(entry, changes_path(name), snapshot_path(name),
                                    lambda out, since, name=name: archive.snapshot(
                                        self.runtime.volume_path(name), out, since))
        yield self._changes(entry, ROOTFS_CHANGES, ROOTFS, lambda out, since: snapshot_layer(
            upper or Path("/nonexistent"), out, since))

    def _changes(self, entry: j.Entry, rel: str, pre: str,
                 make: Callable[[Path, Manifest], object]) -> tuple[str, Path]:
        manifest = self.staging.resolve(entry.id, manifest_path(pre))
        if not manifest.is_file():
            raise FailedPrecondition(f"migration {entry.id} has no pre-copy snapshot {pre!r} "
                                     "to compare the final pass with")
        out = self.staging.resolve(entry.id, rel)
        make(out, Manifest.load(manifest))
        return rel, out

    def offers(self, migration_id: str) -> dict[str, Signature]:
        with self._lock:
            return dict(self._known(migration_id).offers)

    def commit(self, entry: j.Entry) -> None:
        self.still_paused(entry)
        with self._lock:
            serving = self._known(entry.id).serving is not None
        if entry.at_source.lazy and not serving:
            raise FailedPrecondition(f"migration {entry.id}: the lazy checkpoint no longer "
                                     "serves the container's pages here; it cannot be handed "
                                     "over")
        # Under the same lock as a lease's resume: one of the two wins, never both.
        with self._lock:
            committed = self.journal.try_move(entry.id, SOURCE, State.COMMITTED, by=PEER)
        if committed is None:
            now = self.journal.get(entry.id, SOURCE)
            raise FailedPrecondition(
                f"the source will not hand over migration {entry.id} "
                f"({now.state if now else 'unknown here'}): it is not frozen here (it resumed "
                f"the container itself when the destination fell silent for longer than the "
                f"{self.lease:.0f} s lease or the source agent restarted, or it never froze)")

    def resume(self, migration_id: str, by: str) -> pb.ResumeReply:
        """Start the container again from its final checkpoint (or fresh, if that fails).

        The journal moves to RESUMING first, under the commit's lock, so a commit can no
        longer win; an interrupted resume is retried from RESUMING."""
        with self._lock:
            entry = self.journal.get(migration_id, SOURCE)
            if entry is None:
                raise NotFound(f"no migration {migration_id} here")
            if entry.state == State.ROLLED_BACK:  # a retry after a reply that was lost: no-op
                return pb.ResumeReply(restored=True, detail=entry.at_source.resume or
                                      "it was resumed here before")
            u = self.underway(migration_id)
            if u.resuming or u.freezing:
                raise FailedPrecondition(f"migration {migration_id} is being resumed or "
                                         "checkpointed right now; try again")
            if entry.state in (State.PRE_COPY, State.FAILED) and by == PEER and \
                    self.runtime.state(entry.container).running:
                # never frozen: the destination's rollback only needs the source to let go
                if self.journal.try_move(migration_id, SOURCE, State.FAILED, by=PEER):
                    self.metrics.source_ended("failed", "destination", entry.state)
                self.staging.drop(migration_id)
                return pb.ResumeReply(restored=True, detail="it was never frozen and runs")
            if entry.state != State.RESUMING:
                entry = self.journal.move(migration_id, SOURCE, State.RESUMING, by=by)
            u.resuming = True
        try:
            return self._resume(entry, by)
        finally:
            with self._lock:
                u.resuming = False

    def _resume(self, entry: j.Entry, by: str) -> pb.ResumeReply:
        migration_id, cid = entry.id, entry.container
        self.stop_serving(migration_id)
        gone = self.runtime.gone(cid)
        now = None if gone else self.runtime.state(cid)
        if entry.at_source.paused and not gone:  # whatever it is now, it takes clients again
            self.take_connections_again(migration_id, cid)
        if entry.at_source.isolated and now is not None and (now.running or now.paused):
            # it answers for its addresses again (a stopped one is restored into a new network
            # namespace, and its old one is gone)
            self.runtime.isolate(cid, False)
        if gone:
            # removed here meanwhile (by an operator): nothing is left to resume, ever
            reply = pb.ResumeReply(restored=False, detail="the container was removed from "
                                   "this node meanwhile; nothing to resume")
            log.warning("migration %s: %s", migration_id, reply.detail)
        elif now is not None and now.paused:  # a page-server checkpoint: its memory never left it
            self.runtime.unpause(cid)
            reply = pb.ResumeReply(restored=True, detail="unpaused: it goes on where it was "
                                   "paused for the final checkpoint")
        elif now is not None and now.running and self.runtime.running(cid):  # not a stop just taken
            reply = pb.ResumeReply(restored=True, detail="it was still running")
        else:
            folder = self.staging.root / migration_id / "checkpoints" / FINAL_CHECKPOINT
            try:
                if entry.at_source.paused:  # stopped meanwhile (an engine restart?)
                    raise FailedPrecondition("its final checkpoint's memory pages went to the "
                                             "destination's page server")
                if not (folder / "inventory.img").exists():
                    raise FailedPrecondition("the final checkpoint was never completed")
                self.runtime.start_from_checkpoint(
                    cid, folder, f"resume-{migration_id}",
                    keep_connections=entry.at_source.keep_connections)
                self.runtime.wait_running(cid)
                reply = pb.ResumeReply(restored=True,
                                       detail="restored from its final checkpoint")
            except MigctlError as err:
                log.warning("resume from checkpoint failed, restarting fresh: %s", err)
                self.runtime.start(cid)
                self.runtime.wait_running(cid)
                reply = pb.ResumeReply(restored=False, detail=f"restore failed ({err}); "
                                       "restarted without its memory")
        policy = entry.at_source.restart_policy or {"Name": "no"}
        if restarts(policy) and not gone:  # it runs again: its policy too
            self.runtime.set_restart_policy(cid, policy)
        self.journal.move(migration_id, SOURCE, State.ROLLED_BACK, data={"resume": reply.detail})
        self.metrics.source_ended(State.ROLLED_BACK, "destination" if by == PEER else "source",
                                  entry.state)
        self.staging.drop(migration_id)
        self._forget(migration_id)
        return reply

    def release(self, entry: j.Entry, completed: bool, remove_container: bool) -> None:
        if completed:
            if entry.state != State.COMMITTED:
                raise FailedPrecondition(
                    f"migration {entry.id} was never committed here ({entry.state}); "
                    "refusing to treat the container as moved")
            if entry.at_source.paused and not self.runtime.gone(entry.container) and \
                    self.runtime.state(entry.container).running:
                self.runtime.kill(entry.container)  # paused (or not): it now runs there
            self.stop_serving(entry.id)  # ended when the destination had every page
            try:
                self.keep_last_snapshots(entry)
            except (MigctlError, OSError) as err:
                log.warning("could not keep the last snapshots: %s", err)
            if remove_container:
                self.runtime.remove(entry.container)
            else:
                self.store.mark_departed(entry.container, entry.id)
            self.journal.move(entry.id, SOURCE, State.DONE, by=PEER)
            self.metrics.source_ended("succeeded", "destination", entry.state)
        elif entry.state in (State.AUTHORIZED, State.PRE_COPY):
            self.journal.move(entry.id, SOURCE, State.FAILED, by=PEER)
            if entry.state == State.PRE_COPY:  # begun: counted as started
                self.metrics.source_ended("failed", "destination", entry.state)
        else:
            raise FailedPrecondition(f"migration {entry.id} is {entry.state} here: resume it "
                                     "before releasing it")
        self._forget(entry.id)
        self.staging.drop(entry.id)

    # -- without the destination ------------------------------------------------------------

    def recover_on_start(self) -> None:
        """Uncommitted frozen containers resume at once: the destination cannot have committed."""
        entries = self.journal.in_flight(SOURCE)
        for netns in stale_netns(self.netns_prefix):  # a lazy checkpoint's, from before
            mid = netns.name[len(self.netns_prefix):]
            container = next((e.container for e in entries if e.id.startswith(mid)), "")
            end_criu(netns, lambda n=netns: bool(processes_in(n)),
                     lambda c=container: self.runtime.freeze(c) if c else None, timeout=10)
            remove_netns(netns)
            log.warning("removed the network namespace %s of a lazy checkpoint", netns.name)
        for entry in self.journal.in_flight(SOURCE):
            self.touch(entry.id)
            if entry.state in (State.FROZEN, State.RESUMING):
                log.warning("migration %s was %s when the agent stopped: resuming %s",
                            entry.id, entry.state, entry.container[:12])
                self._resume_quietly(entry.id)
            elif entry.state == State.COMMITTED:
                log.warning("migration %s is committed: the destination %s owns %s; waiting "
                            "for it to release or resume", entry.id, entry.peer,
                            entry.container[:12])

    def expire_leases(self) -> None:
        now = time.monotonic()
        for entry in self.journal.in_flight(SOURCE):
            u = self.underway(entry.id)
            idle = now - u.last_seen
            if u.freezing:
                continue  # a final checkpoint is being taken: it ends, then the lease counts
            if entry.state == State.FROZEN and idle > self.lease:
                log.warning("migration %s: no word from %s for %.0f s; resuming %s", entry.id,
                            entry.peer, idle, entry.container[:12])
                self._resume_quietly(entry.id)
            elif entry.state == State.RESUMING and not u.resuming:
                self._resume_quietly(entry.id)  # an earlier attempt failed: try again
            elif entry.state == State.AUTHORIZED and (
                    time.time() - entry.at_source.authorized_at > AUTHORIZATION_SECONDS):
                self._drop(entry)
            elif entry.state == State.PRE_COPY and idle > ABANDONED_LEASES * self.lease:
                self._drop(entry)  # abandoned before the freeze: only files to drop

    def hold(self, entry: j.Entry, beats: Iterator[object]) -> None:
        """The destination's hold: returns when it ends. Ended or silent before the commit,
        the container is resumed here at once (a checkpoint under way finishes first); the
        commit and this resume race under one lock, so one of them wins."""
        last = [time.monotonic()]
        ended = threading.Event()

        def read() -> None:
            try:
                for _ in beats:
                    last[0] = time.monotonic()
            except Exception:  # noqa: BLE001 - a broken stream is what we watch for
                pass
            finally:
                ended.set()

        threading.Thread(target=read, name=f"hold-{entry.id}", daemon=True).start()
        while not ended.wait(HOLD_TICK) and time.monotonic() - last[0] <= HOLD_SILENCE:
            pass
        with self._lock:  # the freeze moves the state and marks itself under this lock
            now = self.journal.get(entry.id, SOURCE)
            u = self.underway(entry.id)
            freezing = u.freezing
            if freezing:
                u.hold_lost = True  # resumed as soon as the checkpoint ends
        if freezing:
            self._abort_tunnel(entry.id)  # a dump into a dead tunnel ends now, not in minutes
        if now is None or (now.state != State.FROZEN and not freezing):
            return  # committed (the hold's normal end), resumed, ended, or never frozen
        why = "broke" if ended.is_set() else f"fell silent for {HOLD_SILENCE:.0f} s"
        log.warning("migration %s: the hold of %s %s before the commit; resuming %s",
                    entry.id, entry.peer, why, entry.container[:12])
        if not freezing:
            self._resume_quietly(entry.id)

    def _drop(self, entry: j.Entry) -> None:
        if self.journal.try_move(entry.id, SOURCE, State.FAILED) is not None:
            if entry.state == State.PRE_COPY:  # begun: counted as started
                self.metrics.source_ended("failed", "source", entry.state)
            self._forget(entry.id)
            self.staging.drop(entry.id)

    def _resume_quietly(self, migration_id: str) -> None:
        try:
            self.resume(migration_id, by=SELF)
        except j.IllegalTransition:
            pass  # committed meanwhile: no longer ours to resume
        except MigctlError as err:
            log.error("could not resume after migration %s: %s", migration_id, err)
