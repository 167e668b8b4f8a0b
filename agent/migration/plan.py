"""A dry run of a migration (the Plan RPC): what would move to this node, and how long it
would take over the link to the source as measured now.

The description comes from the operator, who got it from the source: it is not believed beyond
its shapes and sizes, and only sizes come out of it. Every piece is counted from the source
(neighbours holding pieces are not looked up), the root filesystem's changes are not known
before a snapshot, and the downtime depends on what changes meanwhile: the estimate is of the
pre-copy's transfers, one after the other.
"""

from __future__ import annotations

from migctl.agent.migration.policy import Link
from migctl.agent.runtime.spec import check_description
from migctl.common.errors import InvalidArgument, Refused
from migctl.proto import migctl_pb2 as pb

MAX_PIECES = 256   # layers, or volumes, of one description
MAX_BYTES = 1 << 50


def checked(spec: pb.ContainerSpec) -> pb.ContainerSpec:
    """SPEC, if its identifiers have the engine's shapes and its sizes are sizes."""
    try:
        check_description(spec)
    except Refused as err:
        raise InvalidArgument(str(err)) from None
    if len(spec.diff_ids) > MAX_PIECES or len(spec.volumes) > MAX_PIECES:
        raise InvalidArgument(f"the description lists {len(spec.diff_ids)} layers and "
                              f"{len(spec.volumes)} volumes: at most {MAX_PIECES} of each")
    if spec.layer_sizes and len(spec.layer_sizes) != len(spec.diff_ids):
        raise InvalidArgument(f"the description gives {len(spec.layer_sizes)} layer sizes for "
                              f"{len(spec.diff_ids)} layers")
    sizes = [*spec.layer_sizes, *(v.size_bytes for v in spec.volumes), spec.memory_bytes]
    if any(not 0 <= n <= MAX_BYTES for n in sizes):
        raise InvalidArgument(f"the description has a size outside 0 to {MAX_BYTES} bytes")
    return spec


def estimate(spec: pb.ContainerSpec, missing: set[str], source: str, here: str,
             link: Link) -> pb.PlanReply:
    """The plan of moving SPEC from SOURCE to HERE, which lacks the layers MISSING."""
    reply = pb.PlanReply(link=link.describe())

    def item(kind: str, name: str, size: int, reason: str = "") -> None:
        seconds = link.expected(size) if size else 0.0
        reply.items.add(kind=kind, item=name, bytes=size, origin=source, seconds=seconds,
                        reason=reason)
        reply.bytes += size
        reply.seconds += seconds

    sizes = list(spec.layer_sizes) or [0] * len(spec.diff_ids)
    for diff_id, size in zip(spec.diff_ids, sizes, strict=True):
        if diff_id in missing:
            item("layer", diff_id, size, "" if size else "size not known: counted as 0")
        else:
            reply.items.add(kind="layer", item=diff_id, origin=here,
                            reason="already on this node")
    for vol in spec.volumes:
        item("volume snapshot", vol.name, vol.size_bytes)
    item("checkpoint", "memory", spec.memory_bytes, "about the memory the container uses")
    return reply
