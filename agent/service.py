"""The Agent service: thin gRPC handlers over the runtime, the data plane and the flow."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from functools import wraps
from pathlib import Path
from typing import Any

import grpc
import psutil
from google.protobuf.json_format import ParseDict

from migctl.agent.catalog.registry import Holding, InventoryRegistry, open_registry
from migctl.agent.catalog.store import Item, Store
from migctl.agent.dataplane import archive, final
from migctl.agent.dataplane.files import digest, iter_file
from migctl.agent.dataplane.image import config_of, iter_layer
from migctl.agent.dataplane.pages import netns_prefix, stop_lazy_leftovers
from migctl.agent.dataplane.rootfs import snapshot_layer
from migctl.agent.dataplane.staging import Staging, valid_migration_id
from migctl.agent.delta import (
    DEFAULT_BLOCK_SIZE,
    Signature,
    agreed_format,
    delta_stream,
    signature_block_cap,
)
from migctl.agent.metrics import Metrics
from migctl.agent.migration import journal as j
from migctl.agent.migration import plan
from migctl.agent.migration.flow import Migration
from migctl.agent.migration.phases.request import preflight_problems
from migctl.agent.migration.policy import Links
from migctl.agent.migration.recovery import remove_strays, settle
from migctl.agent.migration.source import (
    AUTHORIZATION_SECONDS,
    ROOTFS,
    SourceSide,
    manifest_path,
    snapshot_path,
)
from migctl.agent.migration.state import DESTINATION, PEER, State
from migctl.agent.runtime.base import Runtime
from migctl.agent.runtime.spec import valid_name
from migctl.agent.security import caller_of
from migctl.agent.version import PROTOCOL_VERSION, version
from migctl.common.channel import open_channel
from migctl.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    MigctlError,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from migctl.common.peer import Peer
from migctl.common.tls import TLSFiles
from migctl.proto import migctl_pb2 as pb
from migctl.proto import migctl_pb2_grpc as rpc

log = logging.getLogger(__name__)

DEFAULT_HISTORY, MAX_HISTORY = 100, 1000  # journal entries a History call returns
VOUCH_SECONDS = 60.0  # how long a source's word about a migration's cached items is reused


def handler(fn: Any) -> Any:
    """Map our errors onto gRPC statuses so a peer sees the operator's message, not a trace."""

    @wraps(fn)
    def wrapped(self: AgentService, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            result = fn(self, request, context)
            if hasattr(result, "__next__"):
                return _stream_guard(result, context)
            return result
        except MigctlError as err:
            context.abort(err.code, str(err))
        except Exception as err:  # noqa: BLE001 - the caller gets the reason, the log the trace
            log.exception("%s failed", fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{fn.__name__}: {err}")

    return wrapped


def _stream_guard(gen: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
    try:
        yield from gen
    except MigctlError as err:
        context.abort(err.code, str(err))
    except Exception as err:  # noqa: BLE001
        log.exception("stream failed")
        context.abort(grpc.StatusCode.INTERNAL, str(err))


def caller(context: grpc.ServicerContext) -> str:
    """The calling node's name (the Authorization interceptor already checked its role)."""
    who = caller_of(context)
    if who is None:
        raise PermissionDenied("the caller's certificate carries no migctl role")
    return who.name


def advertised_address(listen: str, inventory: InventoryRegistry, node: str) -> str:
    """Where other agents reach this one, as published in a registry: this node's own entry in
    its inventory, else the listen address; "" when that is a wildcard (0.0.0.0, [::]), which
    no peer can dial, and then nothing is published (a peer would fail to reach it)."""
    with contextlib.suppress(KeyError):
        return inventory.address(node)
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host in ("", "0.0.0.0", "::"):
        log.warning("%s listens on %s and is not in its inventory: it publishes nothing to the "
                    "registry, which could not tell peers where to reach it", node, listen)
        return ""
    return listen


ANNOUNCE_S = 10.0  # how often a node announces itself to a pushed registry (Redis)
NODE_TTL_S = 30.0  # and how long its card outlives its last announcement
STARTS = (State.AUTHORIZED, State.REQUESTED)  # a migration's first state at each end
MAX_FOLLOWERS = 16  # Events streams that follow at once (each holds a server worker)
REPORT_WAIT_S = 90.0  # the longest an ended event waits for its report (Release's 60 s, ...)


def _said(entry: j.Entry) -> tuple[str, pb.MigrationReport, str]:
    """What History and Events say of an entry: the container's name, the destination's
    report, why it failed."""
    mine = entry.data
    here = mine if isinstance(mine, j.DestinationData) else j.DestinationData()
    report = ParseDict(here.report, pb.MigrationReport(), ignore_unknown_fields=True)
    return mine.name or report.container or entry.container, report, here.error


class AgentService(rpc.AgentServicer):
    def __init__(self, node: str, runtime: Runtime, state_dir: Path, tls: TLSFiles,
                 lease_seconds: float = 60.0, registry: str = "inventory",
                 inventory: Path | None = None, address: str = "",
                 cache_bytes: int = 2 << 30, metrics: Metrics | None = None,
                 page_server_min_rate: float = 0.0) -> None:
        self.node = node
        self.version = version()
        self.metrics = metrics or Metrics()
        self.tls = tls  # our identity when we call other agents
        self.connect = lambda addr, *name: open_channel(addr, tls, *name)
        self.links = Links(self.connect, page_server_min_rate)
        self.inventory = inventory or Path("/nonexistent")
        self.address = advertised_address(address, InventoryRegistry(
            self.inventory, node, self.connect), node)
        self.registry = open_registry(registry, self.inventory, node,
                                      self.connect) if registry else None
        self.runtime = runtime
        self.state_dir = state_dir
        self.staging = Staging(state_dir)
        self.store = Store(state_dir, cache_bytes=cache_bytes, on_evict=self.evicted)
        self.metrics.watch_cache(self.store.size)
        self._published_layers: set[str] = set()
        self.journal = j.Journal(state_dir)
        self.source = SourceSide(runtime, self.staging, self.journal, self.store, lease_seconds,
                                 self.publish, self.metrics, netns_prefix=netns_prefix(node))
        self._running: dict[str, Migration] = {}  # migration id -> its flow, at this destination
        self._followers = 0  # Events streams following
        self._vouched: dict[tuple[str, str, str, str], tuple[float, frozenset[str]]] = {}
        self._lock = threading.Lock()

    def start_background(self, interval: float = 2.0) -> None:
        """Resolve what a previous run left in flight, then keep leases and rollbacks going."""
        self.source.recover_on_start()
        in_flight = {e.id for e in self.journal.in_flight(DESTINATION)}
        if stop_lazy_leftovers(self.staging.root, in_flight):
            log.warning("stopped lazy-pages processes of migrations that had ended")

        def loop() -> None:
            rounds = 0
            while True:
                try:
                    self.source.expire_leases()
                    self.settle_orphans()
                    remove_strays(self.runtime, self.journal)
                    if rounds % 15 == 0:
                        self.sync_layers()
                    rounds += 1
                except Exception:  # noqa: BLE001 - keep the loop alive, the log says why
                    log.exception("background recovery failed")
                time.sleep(interval)

        def beat() -> None:  # apart: a wedged engine must not hold up leases and rollbacks
            while True:
                try:
                    self.announce()
                except Exception:  # noqa: BLE001 - keep announcing, the log says why
                    log.exception("announcing to the registry failed")
                time.sleep(ANNOUNCE_S)

        threading.Thread(target=loop, name="recovery", daemon=True).start()
        if self.registry is not None and self.registry.pushed:
            threading.Thread(target=beat, name="announce", daemon=True).start()

    def settle_orphans(self) -> None:
        """Destination entries in flight that no migration thread owns: the agent restarted,
        or a rollback could not reach the source yet."""
        with self._lock:
            owned = set(self._running)
        for entry in self.journal.in_flight(DESTINATION):
            if entry.id not in owned:
                settle(entry, self.runtime, self.journal, self.staging, self.tls,
                       lambda text, mid=entry.id: log.warning("migration %s: %s", mid, text))

    def _holdings(self, items: list[Item]) -> list[Holding]:
        return [Holding(i.key, self.node, i.ts, i.size, i.digest) for i in items]

    def evicted(self, items: list[Item]) -> None:
        """The cache let ITEMS go: counted, and the registry no longer names this node."""
        self.metrics.evictions.inc(len(items))
        if self.registry is not None and items:
            self.registry.withdraw(self.node, self._holdings(items))

    def announce(self) -> None:
        """The node's card in the registry (Redis): its address, versions and room, expiring
        after NODE_TTL_S, so that a node that stops answering drops out of the inventory the
        CLI reads there."""
        if self.registry is None or not self.registry.pushed or not self.address:
            return
        info = self.node_info()
        self.registry.announce(self.node, {
            "address": self.address, "version": info.version,
            "protocol_version": info.protocol_version,
            "memory_available_bytes": info.memory_available_bytes,
            "engine_free_bytes": info.engine_free_bytes, "load": info.load,
            "checkpoints_enabled": info.checkpoints_enabled}, NODE_TTL_S)

    def sync_layers(self) -> None:
        """Tell the registry which layers the engine holds now (Redis needs to be told; the
        inventory backend asks the engine itself, so nothing is inspected for it)."""
        if self.registry is None or not self.registry.pushed or not self.address:
            return
        held = self.runtime.held_layers()
        added, gone = held - self._published_layers, self._published_layers - held
        if added:
            self.registry.publish(self.node, self.address,
                                  [Holding(f"layer:{d}", self.node, 0.0, 0, d) for d in added])
        if gone:
            self.registry.withdraw(self.node,
                                   [Holding(f"layer:{d}", self.node, 0.0, 0, d) for d in gone])
        self._published_layers = held

    def publish(self, items: list[Item]) -> None:
        if self.registry is not None and items and self.address:
            self.registry.publish(self.node, self.address, self._holdings(items))

    @handler
    def Holdings(self, request: pb.HoldingsRequest, context: Any) -> pb.HoldingsReply:
        reply = pb.HoldingsReply()
        layers = self.runtime.held_layers() if any(
            k.startswith("layer:") for k in request.keys) else set()
        for key in request.keys:
            if key.startswith("layer:"):
                if key[6:] in layers:
                    reply.holdings.add(key=key, node=self.node, digest=key[6:])
                continue
            for item in self.store.find(key):
                reply.holdings.add(key=key, node=self.node, timestamp=item.ts,
                                   size=item.size, digest=item.digest)
        return reply

    @handler
    def Vouch(self, request: pb.VouchRequest, context: Any) -> pb.VouchReply:
        valid_migration_id(request.migration_id)
        vouched = set(self.source.vouch(request.migration_id, request.destination_node))
        return pb.VouchReply(keys=[k for k in request.keys if k in vouched])

    def vouched(self, context: Any, request: pb.HeldRef) -> None:
        """Serve a cached item only to the bound destination of a live migration whose source
        says the item belongs to that migration's container (answers kept for a minute)."""
        who = caller(context)
        valid_migration_id(request.migration_id)
        valid_name("source node", request.source_node)
        if request.source_node == who:  # its own agent would vouch for anything
            raise PermissionDenied(f"{who} names itself as the source of migration "
                                   f"{request.migration_id}: a destination is never its own "
                                   "source")
        key = (request.migration_id, request.source_node, who, request.key)
        with self._lock:
            cached = self._vouched.get(key)
        if cached is None or time.monotonic() - cached[0] > VOUCH_SECONDS:
            ask = pb.VouchRequest(migration_id=request.migration_id, destination_node=who,
                                  keys=[request.key])
            if request.source_node == self.node:
                keys = set(self.source.vouch(ask.migration_id, ask.destination_node)) & \
                    {request.key}
            else:
                try:
                    with Peer(request.source_node, self.address_of(request.source_node),
                              self.connect) as holder:
                        keys = list(holder.call("Vouch", ask, timeout=10).keys)
                except MigctlError as err:
                    raise PermissionDenied(f"{request.source_node} does not vouch for {who} "
                                           f"in migration {request.migration_id}: "
                                           f"{err}") from None
            cached = (time.monotonic(), frozenset(keys))
            with self._lock:
                self._vouched = {k: v for k, v in self._vouched.items()
                                 if cached[0] - v[0] <= VOUCH_SECONDS}
                self._vouched[key] = cached
        if request.key not in cached[1]:
            raise PermissionDenied(f"{request.key} is not part of migration "
                                   f"{request.migration_id}: not served to {who}")

    @handler
    def FetchHeld(self, request: pb.HeldRef, context: Any) -> Iterator[pb.Chunk]:
        self.vouched(context, request)
        item = self.store.get(request.key, request.timestamp)
        if item is None:
            raise NotFound(f"{self.node} no longer holds {request.key}")
        if request.source_node not in item.entitled:
            raise PermissionDenied(f"{self.node}'s copy of {request.key} came from "
                                   f"{', '.join(sorted(item.entitled)) or 'an older agent'}, "
                                   f"not from {request.source_node}: not served for its "
                                   "migration")
        for data in self.serve_held(item.path):
            yield pb.Chunk(data=data)

    def serve_held(self, path: Path) -> Iterator[bytes]:
        """The chunks of a held item (fault tests slow this down by replacing it)."""
        return iter_file(path)

    def saved_image(self, image_id: str) -> Path:
        """`docker save` output of an image, kept in the cache: layers are served from it."""
        found = self.store.find(f"image:{image_id}")
        if found:
            return found[0].path
        tmp = self.state_dir / f"save-{uuid.uuid4().hex}.tar"
        self.runtime.save_image(image_id, tmp)
        return self.store.put(f"image:{image_id}", 0.0, tmp, "", move=True).path

    @handler
    def ImageConfig(self, request: pb.ImageRef, context: Any) -> pb.ImageConfigReply:
        image_id = self.runtime.image_id(request.image)
        config, tags = config_of(self.saved_image(image_id))
        return pb.ImageConfigReply(config=config, repo_tags=tags)

    @handler
    def ExportLayer(self, request: pb.LayerRef, context: Any) -> Iterator[pb.Chunk]:
        saved = self.saved_image(self.runtime.image_with_layer(request.diff_id))
        for data in iter_layer(saved, request.diff_id):
            yield pb.Chunk(data=data)

    @handler
    def Probe(self, request: pb.ProbeRequest, context: Any) -> Iterator[pb.Chunk]:
        block = bytes(min(request.size, 1 << 20))
        left = min(request.size, 64 << 20)
        while left > 0:
            yield pb.Chunk(data=block[:left])
            left -= len(block)

    @handler
    def GetNode(self, request: pb.GetNodeRequest, context: Any) -> pb.NodeInfo:
        return self.node_info()

    def node_info(self) -> pb.NodeInfo:
        engine, criu, checkpoints = self.runtime.versions()
        return pb.NodeInfo(
            node=self.node, engine_version=engine, criu_version=criu,
            docker_root_dir=str(self.runtime.root_dir()), checkpoints_enabled=checkpoints,
            staging_free_bytes=psutil.disk_usage(str(self.staging.root)).free,
            engine_free_bytes=self.runtime.free_bytes(),
            memory_available_bytes=psutil.virtual_memory().available,
            load=psutil.getloadavg()[0] / (psutil.cpu_count() or 1),
            checkpoint_method=self.runtime.method,
            no_post_copy=self.runtime.post_copy_problem(),
            no_kept_connections=self.runtime.kept_connections_problem(),
            version=self.version, protocol_version=PROTOCOL_VERSION)

    @handler
    def DescribeContainer(self, request: pb.ContainerRef, context: Any) -> pb.ContainerSpec:
        return self.runtime.describe(valid_name("container", request.container))

    @handler
    def ListContainers(self, request: pb.ListContainersRequest,
                       context: Any) -> pb.ListContainersReply:
        return pb.ListContainersReply(containers=self.runtime.list_containers())

    @handler
    def TrialCheckpoint(self, request: pb.ContainerRef, context: Any) -> pb.TrialReply:
        return self.source.trial(valid_name("container", request.container))

    @handler
    def Cancel(self, request: pb.CancelRequest, context: Any) -> pb.CancelReply:
        valid_migration_id(request.migration_id)
        with self._lock:
            migration = self._running.get(request.migration_id)
        if migration is None:
            entry = self.journal.get(request.migration_id, DESTINATION)
            if entry is not None and entry.state.ended:
                raise FailedPrecondition(f"migration {request.migration_id} has ended "
                                         f"({entry.state}): nothing to cancel")
            raise NotFound(f"no migration {request.migration_id} runs at {self.node} (cancel "
                           "it at its destination)")
        outcome = migration.cancel()
        log.info("migration %s cancelled by %s (%s)", request.migration_id, caller(context),
                 outcome)
        return pb.CancelReply(outcome=outcome, state=str(migration.entry.state))

    @handler
    def History(self, request: pb.HistoryRequest, context: Any) -> pb.HistoryReply:
        if not 0 <= request.limit <= MAX_HISTORY:
            raise InvalidArgument(f"History: limit {request.limit} is not from 0 to "
                                  f"{MAX_HISTORY}")
        reply = pb.HistoryReply()
        for entry in self.journal.history(request.limit or DEFAULT_HISTORY):
            name, report, error = _said(entry)
            reply.entries.add(migration_id=entry.id, role=entry.role, container=name,
                              peer=entry.peer, state=entry.state, updated=entry.updated,
                              error=error, report=report)
        return reply

    def Events(self, request: pb.EventsRequest, context: Any) -> Iterator[pb.NodeEvent]:
        """The journal's events after the token, then (follow) new ones as they are written;
        the stream ends when the caller goes away. At most MAX_FOLLOWERS follow at once: each
        holds a worker of the server."""
        after = request.after or "0"
        newest = self.journal.last_event()
        if not (after.isascii() and after.isdigit() and len(after) <= 18) or int(after) > newest:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"Events: {request.after[:40]!r} is not a token of {self.node} (its "
                          f"newest event is {newest})")
        if request.follow:
            with self._lock:
                if self._followers >= MAX_FOLLOWERS:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"{self.node} has {MAX_FOLLOWERS} event followers already")
                self._followers += 1
        try:
            yield from self._events(int(after), request.follow, context)
        finally:
            if request.follow:
                with self._lock:
                    self._followers -= 1

    def _events(self, last: int, follow: bool, context: Any) -> Iterator[pb.NodeEvent]:
        while context.is_active():
            events = self.journal.events(last)
            for e in events:
                entry = self.journal.get(e.id, e.role)
                if entry is not None and e.state.ended and e.role == DESTINATION:
                    entry = self._with_report(entry, e.at, context)
                name, report, _ = _said(entry) if entry is not None else ("", None, "")
                yield pb.NodeEvent(
                    token=str(e.seq), node=self.node, migration_id=e.id, role=e.role,
                    kind="ended" if e.state.ended else
                    "started" if e.state in STARTS else "phase",
                    container=name, peer=entry.peer if entry else "", state=e.state,
                    phase=e.state.phase, at=e.at, gap=e.seq > last + 1 and last > 0,
                    report=report if e.state.ended and report is not None else None)
                last = e.seq
            if not events:
                if not follow:
                    return
                self.journal.wait_for_event(last, timeout=1.0)

    def _with_report(self, entry: j.Entry, ended_at: float, context: Any) -> j.Entry:
        """A destination's entry that just ended, once its report is journaled: the flow
        writes the end first, then releases the source and keeps what it received (up to
        REPORT_WAIT_S), then the report."""
        while (not entry.at_destination.report and time.time() < ended_at + REPORT_WAIT_S
               and context.is_active()):
            time.sleep(0.1)
            entry = self.journal.get(entry.id, entry.role) or entry
        return entry

    @handler
    def Plan(self, request: pb.PlanRequest, context: Any) -> pb.PlanReply:
        source = valid_name("source node", request.source_node)
        if source == self.node:
            raise InvalidArgument(f"{self.node} cannot plan a migration from itself")
        spec = plan.checked(request.spec)
        address = self.address_of(source)
        link = self.links.measure(address)
        if link is None:
            raise Unavailable(f"cannot reach the agent of {source} at {address} to measure "
                              "the link")
        with Peer(source, address, self.connect) as peer:
            source_info = peer.call("GetNode", pb.GetNodeRequest(), timeout=10)
        reply = plan.estimate(spec, set(self.runtime.missing_layers(list(spec.diff_ids))),
                              source, self.node, link)
        reply.problems.extend(preflight_problems(source_info, self.node_info(), spec))
        # the source's own words (the operator sent its description without the configuration)
        reply.problems.extend(spec.unsupported)
        return reply

    @handler
    def Authorize(self, request: pb.AuthorizeRequest, context: Any) -> pb.AuthorizeReply:
        valid_name("container", request.container)
        valid_name("node", request.destination_node)
        if request.destination_node == self.node:
            raise InvalidArgument(f"{self.node} cannot migrate a container to itself")
        mid, cid = self.source.authorize(request.container, request.destination_node)
        log.info("migration %s of %s to %s authorized by %s", mid, cid[:12],
                 request.destination_node, caller(context))
        return pb.AuthorizeReply(migration_id=mid, container_id=cid,
                                 expires_in=AUTHORIZATION_SECONDS)

    def bound(self, context: Any, migration_id: str, container: str = "",
              ended_ok: bool = False) -> j.Entry:
        """The source's entry of MIGRATION_ID, if the caller is the node it is bound to."""
        valid_migration_id(migration_id)
        return self.source.bound(migration_id, caller(context), container, ended_ok)

    @handler
    def Begin(self, request: pb.BeginRequest, context: Any) -> pb.ContainerSpec:
        entry = self.bound(context, request.migration_id, request.container)
        spec = self.source.begin(entry)
        for vol in spec.volumes:
            if not vol.read_only:
                vol.volume_id = self.store.volume_id(vol.name, vol.labels.get("rw-guid", ""))
        return spec

    @handler
    def Commit(self, request: pb.CommitRequest, context: Any) -> pb.CommitReply:
        self.source.commit(self.bound(context, request.migration_id))
        return pb.CommitReply()

    @handler
    def MissingLayers(self, request: pb.MissingLayersRequest, context: Any) -> Any:
        return pb.MissingLayersReply(missing=self.runtime.missing_layers(list(request.diff_ids)))

    @handler
    def SnapshotVolume(self, request: pb.SnapshotVolumeRequest, context: Any) -> pb.FileInfo:
        entry = self.bound(context, request.migration_id)
        self.source.volume_of(entry, request.volume)
        source_dir = self.runtime.volume_path(request.volume)
        info = self.snapshot(entry, snapshot_path(request.volume),
                             lambda path: archive.snapshot(source_dir, path))
        self.source.snapshot_taken(entry, request.volume, info)
        return info

    def snapshot(self, entry: j.Entry, rel: str, make: Any) -> pb.FileInfo:
        """A pre-copy snapshot, while the container runs: MAKE writes it to REL of the
        migration's staging area and returns its manifest, kept for the final pass."""
        if entry.state != State.PRE_COPY:
            raise j.IllegalTransition(f"migration {entry.id} is {entry.state}: snapshots are "
                                      "taken during pre-copy")
        path = self.staging.resolve(entry.id, rel)
        make(path).save(self.staging.resolve(entry.id, manifest_path(rel)))
        return pb.FileInfo(path=rel, size=path.stat().st_size, digest=digest(path))

    @handler
    def SnapshotRootfs(self, request: pb.SnapshotRootfsRequest, context: Any) -> pb.FileInfo:
        entry = self.bound(context, request.migration_id)
        upper = self.runtime.upper_dir(entry.container)
        return self.snapshot(entry, ROOTFS,
                             lambda path: snapshot_layer(upper or Path("/nonexistent"), path))

    @handler
    def OfferBases(self, request_iterator: Iterator[pb.BaseOffer], context: Any) -> Any:
        first = next(request_iterator, None)
        if first is None or not first.path:
            raise InvalidArgument("OfferBases: the first message must name a path")
        entry = self.bound(context, first.migration_id)
        offered = 0
        heads = [first]
        while heads:
            head = heads.pop()

            def parts(head: pb.BaseOffer = head) -> Iterator[bytes]:
                yield head.signature
                for offer in request_iterator:
                    if offer.path:
                        heads.append(offer)  # the next basis begins
                        return
                    yield offer.signature

            body = parts()
            self.source.offer(entry, head.path, body)
            if next(body, None) is not None:
                raise InvalidArgument(f"OfferBases: the signature of {head.path!r} runs on "
                                      "past its end")
            offered += 1
        return pb.OfferReply(accepted=offered)

    @handler
    def FinalSync(self, request: pb.FinalSyncRequest, context: Any) -> Iterator[pb.FinalChunk]:
        entry = self.bound(context, request.migration_id)
        upper = self.runtime.upper_dir(entry.container)
        yield from final.serve(self.source.final_items(entry, upper),
                               self.source.offers(entry.id),
                               touch=lambda: self.source.touch(entry.id),
                               delta_format=agreed_format(request.delta_format))

    @handler
    def PageTunnel(self, request_iterator: Iterator[pb.PageBytes], context: Any
                   ) -> Iterator[pb.PageBytes]:
        first = next(request_iterator, None)
        if first is None:
            raise InvalidArgument("PageTunnel: the first message must name the migration")
        entry = self.bound(context, first.migration_id)
        listener = self.source.open_tunnel(entry, lazy=first.lazy)
        context.add_callback(listener.abort)  # a cancelled stream: CRIU stops waiting on it
        try:
            yield pb.PageBytes()  # ready: the final checkpoint may name it now
            for data in listener.relay(r.data for r in request_iterator):
                self.source.touch(entry.id)
                yield pb.PageBytes(data=data)
        finally:
            self.source.close_tunnel(entry.id, listener)

    @handler
    def Checkpoint(self, request: pb.CheckpointRequest, context: Any) -> pb.CheckpointReply:
        start = time.monotonic()
        entry = self.bound(context, request.migration_id, request.container)
        # asked while it runs: right after a final checkpoint the engine answers only once it
        # has handled the container's exit (0.2 s measured), all of it in the frozen window
        method = self.runtime.method_for(entry.container)
        folder = self.source.checkpoint(entry, request)
        seconds = time.monotonic() - start
        area = self.staging.area(entry.id)
        # The final checkpoint is taken frozen and travels in FinalSync, which carries its own
        # checks: hashing it here would only lengthen the downtime.
        files = [pb.FileInfo(path=str(p.relative_to(area)), size=p.stat().st_size,
                             digest=digest(p) if request.leave_running else "")
                 for p in sorted(folder.rglob("*")) if p.is_file()]
        return pb.CheckpointReply(files=files, seconds=seconds, method=method)

    def staged_file(self, context: Any, migration_id: str, relative: str) -> Path:
        self.bound(context, migration_id)
        path = self.staging.resolve(migration_id, relative)
        if not path.is_file():
            raise NotFound(f"migration {migration_id} has no file {relative!r} here")
        return path

    @handler
    def FetchFile(self, request: pb.FileRef, context: Any) -> Iterator[pb.Chunk]:
        path = self.staged_file(context, request.migration_id, request.path)
        for data in iter_file(path):
            self.source.touch(request.migration_id)
            yield pb.Chunk(data=data)

    @handler
    def FetchDelta(self, request_iterator: Iterator[pb.DeltaRequest], context: Any) -> Any:
        first = next(request_iterator, None)
        if first is None or not first.HasField("target"):
            raise InvalidArgument("FetchDelta: the first message must name the target file")
        mid = first.target.migration_id
        path = self.staged_file(context, mid, first.target.path)
        signature = Signature.from_chunks(
            (r.signature for r in request_iterator),
            max_blocks=signature_block_cap(path.stat().st_size, DEFAULT_BLOCK_SIZE))
        for data in delta_stream(signature, path,
                                 delta_format=agreed_format(first.delta_format)):
            self.source.touch(mid)
            yield pb.Chunk(data=data)

    @handler
    def Hold(self, request_iterator: Iterator[pb.HoldBeat], context: Any) -> pb.HoldReply:
        first = next(request_iterator, None)
        if first is None:
            raise InvalidArgument("Hold: the first beat must name the migration")
        self.source.hold(self.bound(context, first.migration_id), request_iterator)
        return pb.HoldReply()

    @handler
    def Resume(self, request: pb.ResumeRequest, context: Any) -> pb.ResumeReply:
        entry = self.bound(context, request.migration_id, request.container,
                           ended_ok=True)
        return self.source.resume(entry.id, by=PEER)

    @handler
    def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseReply:
        entry = self.bound(context, request.migration_id, request.container)
        self.source.release(entry, request.completed,
                            request.completed and request.remove_container)
        return pb.ReleaseReply()

    def address_of(self, node: str) -> str:
        """Where NODE's agent listens, from this agent's own inventory or registry: never
        from the caller (the channel then pins NODE's certificate name)."""
        for registry in (self.registry, InventoryRegistry(self.inventory, self.node,
                                                          self.connect)):
            if registry is None:
                continue
            with contextlib.suppress(KeyError):
                return registry.address(node)
        raise NotFound(f"{self.node} does not know node {node!r}: add it to the inventory "
                       f"the agent reads ({self.inventory})")

    def Migrate(self, request: pb.MigrateRequest, context: Any) -> Iterator[pb.MigrationEvent]:
        """Runs the migration in its own thread: a client that goes away must not be able to
        stop it halfway (after the freeze only completion or rollback are safe)."""
        try:
            valid_name("container", request.container)
            valid_name("source node", request.source_node)
            valid_migration_id(request.migration_id)
            if request.source_node == self.node:
                raise InvalidArgument(f"{self.node} cannot migrate a container from itself")
            source_address = self.address_of(request.source_node)
        except MigctlError as err:
            context.abort(err.code, str(err))
        with self._lock:
            if any(m.request.container == request.container for m in self._running.values()):
                context.abort(grpc.StatusCode.ALREADY_EXISTS,
                              f"{request.container!r} is already being migrated to {self.node}")
            events: queue.Queue[pb.MigrationEvent | MigctlError | None] = queue.Queue()
            try:
                migration = Migration(node=self.node, runtime=self.runtime,
                                      staging=self.staging, request=request,
                                      source_address=source_address,
                                      emit=events.put, is_migrated_away=self.store.is_departed,
                                      journal=self.journal,
                                      local_info=self.node_info, tls=self.tls, store=self.store,
                                      registry=self.registry, links=self.links,
                                      publish=self.publish, metrics=self.metrics).open()
            except MigctlError as err:
                context.abort(err.code, str(err))
            self._running[migration.migration_id] = migration

        def work() -> None:
            try:
                migration.run()
                with contextlib.suppress(Exception):  # the registry may lag; never fail for it
                    self.sync_layers()
                events.put(None)
            except MigctlError as err:
                events.put(err)
            except OSError as err:  # a full disk, a missing file: this node's own trouble
                events.put(MigctlError(f"{self.node}: {err.strerror or err}"
                                       + (f" ({err.filename})" if err.filename else "")))
            except Exception as err:  # noqa: BLE001
                log.exception("migration failed")
                events.put(MigctlError(f"internal error: {err}"))
            finally:
                with self._lock:
                    self._running.pop(migration.migration_id, None)

        threading.Thread(target=work, name=f"migrate-{request.container}", daemon=True).start()
        while (item := events.get()) is not None:
            if isinstance(item, MigctlError):
                context.abort(item.code, str(item))
            if context.is_active():
                yield item

