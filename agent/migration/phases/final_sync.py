"""The final sync, while the source is frozen: one stream of the final checkpoint's files
and of what changed in each writable volume and the writable layer since pre-copy, as deltas
against the bases offered before the freeze, each applied here as it arrives."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from migctl.agent.dataplane import archive
from migctl.agent.dataplane import final as final_pass
from migctl.agent.delta import (
    DELTA_FORMAT,
    DeltaStats,
)
from migctl.agent.migration import movers
from migctl.agent.migration.movers import Basis
from migctl.agent.migration.source import (
    FINAL_CHECKPOINT,
    ROOTFS_CHANGES,
    changes_path,
)
from migctl.agent.migration.state import State
from migctl.agent.runtime.spec import checkpoint_path
from migctl.common.errors import (
    Refused,
)
from migctl.proto import migctl_pb2 as pb

if TYPE_CHECKING:
    from migctl.agent.migration.flow import Migration

log = logging.getLogger(__name__)


def run(m: Migration, spec: pb.ContainerSpec, final: pb.CheckpointReply,
        bases: dict[str, Basis]) -> None:
    with m.enter(State.TRANSFERRING_FINAL):
        receive(m, spec, final, bases)


def receive(m: Migration, spec: pb.ContainerSpec, final: pb.CheckpointReply,
            bases: dict[str, Basis]) -> None:
    """One stream while frozen: the final checkpoint's files and what changed in each
    writable volume and the writable layer, applied here as each arrives."""
    final = movers.checkpoint_reply(m, final, FINAL_CHECKPOINT)
    volumes = {changes_path(v.name): v for v in spec.volumes if not v.read_only}
    expected = {f.path for f in final.files} | set(volumes) | {ROOTFS_CHANGES}

    def dest_of(item: pb.FinalItem) -> Path:
        if item.path not in volumes and item.path != ROOTFS_CHANGES:
            checkpoint_path(item.path, FINAL_CHECKPOINT)  # or refused
        m.room(item.size, item.path)
        return m.area / item.path

    def basis_of(rel: str) -> Path | None:
        return bases[rel].path if rel in bases else None

    def meter_of(item: pb.FinalItem) -> Callable[[int], None]:
        kind, name = (("volume snapshot", volumes[item.path].name) if item.path in volumes
                      else ("root filesystem", spec.name) if item.path == ROOTFS_CHANGES
                      else ("checkpoint", f"{FINAL_CHECKPOINT}: {Path(item.path).name}"))
        return m.report.meter(kind, name, item.size if item.method == "whole" else 0)

    bound = sum(f.size for f in final.files) + sum(v.size_bytes for v in volumes.values())
    ckpt = DeltaStats(literal_bytes=0, matched_bytes=0, wire_bytes=0, new_size=0)
    ckpt_seconds = 0.0

    def stream_all() -> set[str]:
        nonlocal ckpt_seconds
        stream = m.source.stub.FinalSync(pb.FinalSyncRequest(
            migration_id=m.migration_id, delta_format=DELTA_FORMAT),
            timeout=m.deadline(bound))
        got: set[str] = set()
        for r in final_pass.receive(stream, dest_of, basis_of, meter_of):
            got.add(r.path)
            local = m.area / r.path
            if r.path in volumes:
                name = volumes[r.path].name
                m.report.transfer("volume snapshot", name, m.source_name,
                                  pb.FINAL_SYNC, r.result, r.seconds, r.method,
                                  "what changed since pre-copy")
                archive.apply_changes(local, m.runtime.volume_path(name))
            elif r.path == ROOTFS_CHANGES:
                m.report.transfer("root filesystem", spec.name, m.source_name,
                                  pb.FINAL_SYNC, r.result, r.seconds, r.method,
                                  "what changed since pre-copy")
                movers.apply_rootfs(m, m.new_container, local, changes=True)
            else:
                movers.add_transfer(ckpt, r.result)
                ckpt_seconds += r.seconds
        return got

    got = m.source.guarded(stream_all)
    if expected - got:
        raise Refused("the final pass left out " + ", ".join(sorted(expected - got)))
    m.report.transfer("checkpoint", f"{FINAL_CHECKPOINT} ({len(final.files)} files)",
                      m.source_name, pb.FINAL_SYNC, ckpt, ckpt_seconds, "delta")
