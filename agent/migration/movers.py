"""How files move from the source to this node: whole or as a delta against a basis held
here, held to the size and digest the source announced, within a deadline derived from that
size, each counted in the report; a checkpoint's files as one transfer; the root filesystem's
changes into the new container's writable layer."""

from __future__ import annotations

import logging
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from migctl.agent.dataplane.rootfs import apply_layer_changes, restore_layer
from migctl.agent.dataplane.transfer import fetch_delta, fetch_whole
from migctl.agent.delta import (
    DEFAULT_BLOCK_SIZE,
    DeltaStats,
    Signature,
    signature_block_cap,
)
from migctl.agent.runtime.spec import checkpoint_path
from migctl.common.errors import (
    FailedPrecondition,
    Refused,
)
from migctl.proto import migctl_pb2 as pb

if TYPE_CHECKING:
    from migctl.agent.migration.flow import Migration

log = logging.getLogger(__name__)


def pull(m: Migration, kind: str, item: str, phase: int, fetch: Callable[[], int | DeltaStats],
         method: str) -> None:
    start = time.monotonic()
    result = m.source.guarded(fetch)
    m.report.transfer(kind, item, m.source_name, phase, result,
                      time.monotonic() - start, method)


def checkpoint_reply(m: Migration, reply: pb.CheckpointReply, name: str) -> pb.CheckpointReply:
    """The source's list of checkpoint files, if every path is one of checkpoint NAME's
    plain files, none repeats, and the staging disk can hold them all."""
    paths = [checkpoint_path(f.path, name) for f in reply.files]
    if len(set(paths)) != len(paths):
        raise Refused(f"checkpoint {name!r} lists a file twice")
    m.room(sum(f.size for f in reply.files), f"checkpoint {name!r}")
    return reply


def fetch_checkpoint(m: Migration, name: str, ckpt: pb.CheckpointReply, bases: dict[str, Basis],
                     phase: int) -> None:
    """All files of a checkpoint, reported as one transfer; files the destination holds an
    older copy of travel as deltas."""
    start = time.monotonic()
    total = DeltaStats(literal_bytes=0, matched_bytes=0, wire_bytes=0, new_size=0)
    for f in ckpt.files:
        basis = usable(m, bases.get(f.path), f.size, f.path)
        meter = m.report.meter("checkpoint", f"{name}: {Path(f.path).name}",
                               0 if basis else f.size)
        got = m.source.guarded(lambda f=f, basis=basis, meter=meter: get(
            m, f.path, m.area / f.path, f, basis, meter))
        add_transfer(total, got)
    m.report.transfer("checkpoint", f"{name} ({len(ckpt.files)} files)", m.source_name,
                      phase, total, time.monotonic() - start,
                      "delta" if bases else "whole")


def get(m: Migration, rel: str, dest: Path, info: pb.FileInfo, basis: Basis | None,
        meter: Callable[[int], None]) -> int | DeltaStats:
    """REL of the source's staging area into DEST, held to the size and digest the source
    announced in INFO, within a deadline derived from that size; METER counts its bytes."""
    timeout = m.deadline(info.size)
    if basis is None:
        return fetch_whole(m.source.stub, m.migration_id, rel, dest, info.digest,
                           size=info.size, timeout=timeout, on_bytes=meter)
    return fetch_delta(m.source.stub, m.migration_id, rel, basis.path, basis.signature,
                       dest, size=info.size, timeout=timeout, on_bytes=meter)


def usable(m: Migration, basis: Basis | None, size: int, rel: str) -> Basis | None:
    """BASIS, unless its signature is larger than the source accepts for a file of SIZE
    (signature_block_cap: a cached basis of a much bigger container, a volume that
    shrank): then the file comes whole rather than the migration failing."""
    if basis is None or basis.signature.block_count <= signature_block_cap(
            size, DEFAULT_BLOCK_SIZE):
        return basis
    m.report.log(f"{Path(rel).name}: the basis ({basis.signature.basis_length} B) is "
                 f"too large for a file of {size} B; sent whole")
    return None


def fetch(m: Migration, rel: str, dest: Path, expect: pb.FileInfo, basis: Basis | None, kind: str,
          item: str, phase: int) -> None:
    basis = usable(m, basis, expect.size, rel)
    meter = m.report.meter(kind, item, 0 if basis else expect.size)
    pull(m, kind, item, phase, lambda: get(m, rel, dest, expect, basis, meter),
         "whole" if basis is None else "delta")


def apply_rootfs(m: Migration, cid: str, layer: Path, changes: bool = False) -> None:
    """What the container wrote to its root filesystem goes into the new container's
    writable layer before the restore (CRIU reopens the files its process held): the
    pre-copy archive when the container is created, then what changed, in place."""
    upper = m.runtime.upper_dir(cid)
    if upper is not None:
        (apply_layer_changes if changes else restore_layer)(layer, upper)
        return
    with tarfile.open(layer) as tar:
        wrote = bool(tar.getmembers())
    if wrote:
        raise FailedPrecondition(f"{m.node}'s storage driver keeps no writable layer "
                                 "that migctl can fill (overlay2 is needed)")


@dataclass
class Basis:
    """A file the destination already holds, and its signature computed before the freeze."""

    path: Path
    signature: Signature
    digest: str = ""  # of the content, as the source reported it (when it did)


def add_transfer(total: DeltaStats, got: int | DeltaStats) -> None:
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
