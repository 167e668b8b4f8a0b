"""The request: the source describes the container, and both nodes are checked before
anything moves (versions, CRIU, disk and memory, names, volumes and ports already taken here,
what the description may ask of this node). Its undo is the source's release: nothing was
made here yet."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from migctl.agent.migration.phases import freeze
from migctl.agent.migration.policy import memory_transfer
from migctl.agent.migration.state import DESTINATION, SOURCE
from migctl.agent.runtime.base import ContainerState
from migctl.agent.runtime.host import criu_path, host_listeners
from migctl.agent.runtime.spec import (
    check_description,
    endpoint_problems,
    port_protocol,
    unsupported,
)
from migctl.agent.version import PROTOCOL_VERSION, version
from migctl.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    MigctlError,
    Refused,
)
from migctl.proto import migctl_pb2 as pb

if TYPE_CHECKING:
    from migctl.agent.migration.flow import Migration

log = logging.getLogger(__name__)


def run(m: Migration) -> pb.ContainerSpec:
    with m.report.phase(pb.REQUEST):
        return describe(m)


def describe(m: Migration) -> pb.ContainerSpec:
    """The source's description of the container, once everything it asks of this node is
    checked here (never taken from the source's own verdict)."""
    source_info = m.source.call("GetNode", pb.GetNodeRequest(), timeout=30)
    if source_info.protocol_version != PROTOCOL_VERSION:
        m.metrics.preflight.labels("nodes").inc()
        raise FailedPrecondition(
            f"{m.source_name} runs migctl {source_info.version or 'older than 0.1'} "
            f"(protocol {source_info.protocol_version}), {m.node} migctl {version()} "
            f"(protocol {PROTOCOL_VERSION}): agents migrate only between the same protocol; "
            "upgrade the older one")
    m.link = m.links.measure(m.source_address)  # for the streams' deadlines
    spec = m.source.call("Begin", pb.BeginRequest(
        migration_id=m.migration_id, container=m.request.container), timeout=60)
    asked = m.request.container
    if asked != spec.name and not (len(asked) >= 12 and spec.id.startswith(asked)):
        raise Refused(f"the source described container {spec.name!r}, not the {asked!r} "
                      "asked for")
    check_description(spec)
    m.entry.container = spec.id
    m.entry.at_destination.name = spec.name
    m.journal.save(m.entry)
    if not spec.running:
        m.metrics.preflight.labels("not_running").inc()
        raise FailedPrecondition(
            f"container {spec.name!r} on {m.source_name} is not running; migctl moves "
            "running containers (start it, or move a stopped one with docker save/load)")
    # Computed here from the description, never taken from the source's own verdict.
    problems = unsupported(spec, m.request.allow_privileged)
    # and what only the source can see, in its processes (what CRIU would refuse): a
    # refusal, so believing it costs nothing
    problems += [p for p in spec.unsupported if p not in unsupported(spec)]
    if problems:
        m.metrics.preflight.labels("unsupported").inc()
        raise FailedPrecondition(
            f"container {spec.name!r} cannot be migrated: " + "; ".join(problems))
    check_endpoints(m, spec)
    internal = m.runtime.internal_networks(list(spec.networks))
    if internal and not m.request.allow_privileged:
        m.metrics.preflight.labels("unsupported").inc()
        raise FailedPrecondition(
            f"container {spec.name!r} would join {', '.join(map(repr, internal))}, an "
            f"internal network of {m.node} (its own services'): the source's description "
            "alone cannot put a container there; the operator must allow it with "
            "--allow-privileged")
    m.source_info = source_info
    if m.request.memory_transfer:  # what was asked for is refused now, not frozen
        memory_transfer(m.link, source_info.checkpoint_method, criu_path(),
                        m.request.memory_transfer, freeze.no_post_copy(m))
    try:
        preflight(source_info, m.local_info(), spec)
    except FailedPrecondition:
        m.metrics.preflight.labels("nodes").inc()
        raise
    choose_connections(m, spec)
    existing = existing_container(m, spec.name)
    if existing and not m.is_migrated_away(existing.id):
        raise AlreadyExists(
            f"{m.node} already has a container named {spec.name!r} "
            f"({existing.id[:12]}); remove or rename it first")
    for vol in spec.volumes:
        check_volume_free(m, vol)
    check_ports_free(m, spec)
    return spec


def check_endpoints(m: Migration, spec: pb.ContainerSpec) -> None:
    """The container's addresses that move (on macvlan or ipvlan networks) can be its
    addresses here: refused before anything moves otherwise, naming what is missing."""
    if not spec.endpoints:
        return
    networks = {e.network: m.runtime.network(e.network) for e in spec.endpoints}
    if problems := endpoint_problems(spec, networks, m.node):
        m.metrics.preflight.labels("network").inc()
        raise FailedPrecondition(f"container {spec.name!r} cannot keep its addresses on "
                                 f"{m.node}: " + "; ".join(problems))
    # kept for the probe after the freeze (freeze.probe_addresses), off the frozen window
    m.segments = {name: net for name, net in networks.items() if net is not None}


KEEP, CLOSE = "keep", "close"  # MigrateRequest.connections ("": KEEP where an address moves)


def choose_connections(m: Migration, spec: pb.ContainerSpec) -> None:
    """Whether CRIU carries the container's established TCP connections or closes them at the
    restore. A container with an address that moves (macvlan, ipvlan) keeps them unless asked
    to close them: what keeps them from it is refused here, before anything moves, never
    closed silently. One whose addresses are its node's own (bridge) closes them, as asked or
    not asked."""
    asked = m.request.connections
    if asked not in ("", KEEP, CLOSE):
        raise InvalidArgument(f"connections {asked!r}: give {KEEP!r} or {CLOSE!r}")
    keep = asked == KEEP or (not asked and bool(spec.endpoints))
    problems = kept_connections_problems(m, spec) if keep else []
    if problems:
        m.metrics.preflight.labels("connections").inc()
        raise FailedPrecondition(
            f"the TCP connections of container {spec.name!r} cannot be kept: "
            + "; ".join(problems) + f" (with connections {CLOSE!r} it moves, and its "
            "clients reconnect)")
    m.keep_connections = keep
    m.report.msg.connections = "kept" if keep else "closed"
    m.report.log("connections: kept" if keep else "connections: closed (" + (
        "asked" if asked == CLOSE else "its addresses are its node's own: bridge networks")
        + ")")


def kept_connections_problems(m: Migration, spec: pb.ContainerSpec) -> list[str]:
    """What keeps the container's connections from being carried, in words (none: they can
    be): every network of its own must move its address, and both nodes must be able to."""
    moving = {e.network for e in spec.endpoints}
    out = [f"it is on network {n!r}, whose addresses are {m.source_name}'s own (only "
           "macvlan and ipvlan networks move an address)"
           for n in (list(spec.networks) or ["bridge"]) if n not in moving]
    if there := m.source_info.no_kept_connections:
        out.append(f"{m.source_name}: {there}")
    if here := m.runtime.kept_connections_problem():
        out.append(f"{m.node}: {here}")
    return out


def check_ports_free(m: Migration, spec: pb.ContainerSpec) -> None:
    """The host ports the container publishes must be free here, or its restore fails,
    after the freeze. Asked at the request and again before the freeze (pre-copy takes
    time); containers other migrations created here count as already started."""
    others = [e.at_destination.new_container for e in m.journal.in_flight(DESTINATION)
              if e.id != m.migration_id and e.at_destination.new_container]
    taken = ports_taken(spec, m.runtime.port_users(others), host_listeners())
    if taken:
        m.metrics.preflight.labels("ports").inc()
        raise FailedPrecondition(
            f"{m.node} already uses host port {', '.join(taken)}: the container could "
            "not publish it here; free it first")


def existing_container(m: Migration, name: str) -> ContainerState | None:
    try:
        return m.runtime.state(name)
    except MigctlError:
        return None


def departed_to(m: Migration, volume: str) -> str:
    """The node that the container which left VOLUME here went to ("" if none or several)."""
    migrations = {m.store.departure(u.id) for u in m.runtime.volume_users(volume)}
    if not migrations:
        migrations = {m.store.departure(volume=volume)}
    peers = set()
    for mid in migrations:
        entry = m.journal.get(mid, SOURCE) if mid else None
        peers.add(entry.peer if entry else "")
    return peers.pop() if len(peers) == 1 else ""


def check_volume_free(m: Migration, vol: pb.VolumeSpec) -> None:
    """A volume of the same name may only be reused when it belongs to the stale copy this
    node left when the container migrated away from it, or, used by no container, when
    this node removed that stale copy (a migration back that then failed: `create`);
    anything else could be lost. Decided from this node's own records alone."""
    name = vol.name
    if not m.runtime.volume_exists(name):
        return
    users = m.runtime.volume_users(name)
    if users and all(m.is_migrated_away(u.id) for u in users):
        return
    if not users and m.store.is_departed_volume(name):
        return
    who = ", ".join(u.name for u in users) or "no container"
    raise AlreadyExists(
        f"{m.node} already has a volume named {name!r} (used by {who}); migrating would "
        "overwrite it: remove it first")


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


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


ANY_ADDRESS = ("", "0.0.0.0", "::")
