"""Pre-copy, while the container runs at the source: its image's layers, its volumes'
snapshots, its root filesystem's changes and a checkpoint left running, from neighbours where
they hold them (cooperative) and from the source; then the new container is created here, and
the signatures of every basis of the final pass go to the source. Its undo (recovery.settle)
removes the created container and the volumes made for it."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from migctl.agent.catalog.registry import checkpoint_keys
from migctl.agent.dataplane import archive
from migctl.agent.dataplane.files import digest, flush_writes
from migctl.agent.dataplane.image import assemble
from migctl.agent.delta import (
    make_signature,
)
from migctl.agent.migration import movers
from migctl.agent.migration.movers import Basis
from migctl.agent.migration.phases import request
from migctl.agent.migration.policy import POST_COPY, Choice
from migctl.agent.migration.source import (
    FINAL_CHECKPOINT,
    PRE_CHECKPOINT,
    ROOTFS,
    ROOTFS_CHANGES,
    changes_path,
    snapshot_path,
)
from migctl.agent.migration.sourcing import Sourcing
from migctl.agent.migration.state import State
from migctl.agent.runtime.base import restarts
from migctl.common.errors import (
    DeltaError,
)
from migctl.proto import migctl_pb2 as pb

if TYPE_CHECKING:
    from migctl.agent.migration.flow import Migration

log = logging.getLogger(__name__)


def run(m: Migration, spec: pb.ContainerSpec) -> dict[str, Basis]:
    with m.enter(State.PRE_COPY):
        bases = transfer(m, spec)
        flush_writes()
        request.check_ports_free(m, spec)  # again: pre-copy takes time
    return bases


def transfer(m: Migration, spec: pb.ContainerSpec) -> dict[str, Basis]:
    """Everything while the container runs; returns the bases for the final deltas, with
    their signatures already computed so the downtime path only does delta + patch.

    Cooperative: layers, read-only volume contents and bases for snapshots and checkpoint
    may come from neighbours (or this node's cache), fetched in parallel; what changed
    since their copies always comes from the source, as deltas."""
    sourcing = Sourcing(m.node, m.request.source_node, m.migration_id,
                        m.request.mode == pb.COOPERATIVE, m.registry,
                        m.links, m.store, m.connect, m.report, pb.PRE_COPY)
    missing = m.runtime.missing_layers(list(spec.diff_ids))
    for diff_id in spec.diff_ids:
        if diff_id not in missing:
            m.report.transfer("layer", diff_id, m.node, pb.PRE_COPY, 0, 0.0, "skipped",
                              "already on this node")
    snaps = {v.name: m.source.call("SnapshotVolume", pb.SnapshotVolumeRequest(
        migration_id=m.migration_id, volume=v.name))
        for v in spec.volumes}
    for v in spec.volumes:
        m.room(snaps[v.name].size, f"the snapshot of volume {v.name}")
    app, svc = checkpoint_keys(spec)
    plan = sourcing.plan(
        [f"layer:{d}" for d in missing]
        + [f"ro:{snaps[v.name].digest}" for v in spec.volumes if v.read_only]
        + [f"rw:{v.volume_id}" for v in spec.volumes if not v.read_only and v.volume_id]
        + [svc, app])
    (m.area / "basis").mkdir(parents=True, exist_ok=True)
    (m.area / "volumes").mkdir(exist_ok=True)
    # each mechanism's pieces from holders other than the source, fetched in parallel; each
    # job returns what it got (nothing is shared between them)
    with ThreadPoolExecutor(max_workers=4) as pool:
        image_ref = pool.submit(image, m, spec, missing, plan, sourcing)
        ckpt_job = pool.submit(checkpoint_basis, m, sourcing, plan[svc] + plan[app], svc)
        held_jobs = {v.name: pool.submit(read_only_content if v.read_only else snapshot_basis,
                                         m, sourcing, plan, v, snaps[v.name])
                     for v in spec.volumes}
        spec.image = image_ref.result()
        ckpt_basis = ckpt_job.result()
        held = {name: job.result() for name, job in held_jobs.items()}

    bases: dict[str, Basis] = {}
    for vol in spec.volumes:
        rel = snapshot_path(vol.name)
        local = m.area / rel
        got = held[vol.name]
        if got != local:  # not the content itself, whole from a holder: from the source
            basis = (movers.Basis(got, make_signature(got)) if got is not None
                     else local_volume_basis(m, vol.name))
            movers.fetch(m, rel, local, snaps[vol.name], basis, "volume snapshot", vol.name,
                         pb.PRE_COPY)
        if not m.runtime.volume_exists(vol.name):
            m.entry.at_destination.created_volumes.append(vol.name)
            m.journal.save(m.entry)
        archive.restore(local, m.runtime.ensure_volume(vol))
        if vol.volume_id:
            m.store.remember_volume_id(vol.name, vol.volume_id)
        if not vol.read_only:
            bases[changes_path(vol.name)] = movers.Basis(local, make_signature(local))
    m.snapshots_at = time.time()

    info = m.source.call("SnapshotRootfs", pb.SnapshotRootfsRequest(
        migration_id=m.migration_id))
    m.room(info.size, "the root filesystem's changes")
    movers.fetch(m, ROOTFS, m.area / ROOTFS, info, None, "root filesystem", spec.name,
                 pb.PRE_COPY)
    bases[ROOTFS_CHANGES] = movers.Basis(m.area / ROOTFS, make_signature(m.area / ROOTFS))

    if m.request.memory_transfer == POST_COPY:
        # no memory before the freeze (its pages come after the restore), and no pause
        create(m, spec)
        offer(m, bases)
        return bases
    ckpt = movers.checkpoint_reply(m, m.source.call("Checkpoint", pb.CheckpointRequest(
        migration_id=m.migration_id, container=spec.id, name=PRE_CHECKPOINT,
        leave_running=True)), PRE_CHECKPOINT)
    m.pre_checkpoint = ckpt
    folder = ckpt_basis or m.area / "basis" / "checkpoint"  # none: no file is plain there
    ckpt_bases = {f.path: movers.Basis(folder / Path(f.path).name,
                                       make_signature(folder / Path(f.path).name))
                  for f in ckpt.files if plain_file(folder / Path(f.path).name)}
    movers.fetch_checkpoint(m, PRE_CHECKPOINT, ckpt, ckpt_bases, pb.PRE_COPY)
    for f in ckpt.files:
        final_rel = f.path.replace(f"/{PRE_CHECKPOINT}/", f"/{FINAL_CHECKPOINT}/", 1)
        local = m.area / f.path
        bases[final_rel] = movers.Basis(local, make_signature(local))
    create(m, spec)
    # the same checks as the final checkpoint's, before the freeze: a hostile source is
    # refused while its container still runs, and the filters' verdict is kept
    m.check_images(PRE_CHECKPOINT)
    offer(m, bases)
    return bases


def image(m: Migration, spec: pb.ContainerSpec, missing: list[str],
          plan: dict[str, list[Choice]], sourcing: Sourcing) -> str:
    """The container's image here (its missing layers from their best holders, its config
    from the source, each checked against the image id); returns the reference to create
    the container from."""
    if not missing and m.runtime.has_image(spec.image_id):
        return m.runtime.ensure_tag(spec.image_id, spec.image)
    (m.area / "layers").mkdir(exist_ok=True)
    files = {d: m.area / "layers" / f"{d[7:]}.tar" for d in missing}
    for d, dest in files.items():
        m.source.guarded(lambda d=d, dest=dest: sourcing.fetch_layer(
            d, plan[f"layer:{d}"], m.source, dest))
    cfg = m.source.call("ImageConfig", pb.ImageRef(image=spec.image_id))
    if "sha256:" + hashlib.sha256(cfg.config).hexdigest() != spec.image_id:
        raise DeltaError("the source sent an image config that is not the image's")
    if json.loads(cfg.config).get("rootfs", {}).get("diff_ids") != list(spec.diff_ids):
        raise DeltaError("the image's config lists other layers than the source said")
    # No tags from the archive: a peer's tags would move this node's own.
    assemble(cfg.config, [], files, m.area / "image.tar")
    m.runtime.load_image(m.area / "image.tar")
    return m.runtime.ensure_tag(spec.image_id, spec.image)


def read_only_content(m: Migration, sourcing: Sourcing, plan: dict[str, list[Choice]],
                      vol: pb.VolumeSpec, snap: pb.FileInfo) -> Path | None:
    """A read-only volume's snapshot whole from a holder, checked against the source's
    digest: its local path, or None (it comes from the source)."""
    local = m.area / snapshot_path(vol.name)
    if sourcing.fetch_held("volume", vol.name, plan[f"ro:{snap.digest}"], local,
                           verify=lambda p: expect_digest(p, snap.digest)):
        return local
    return None


def snapshot_basis(m: Migration, sourcing: Sourcing, plan: dict[str, list[Choice]],
                   vol: pb.VolumeSpec, snap: pb.FileInfo) -> Path | None:
    """A holder's older snapshot of a writable volume, a basis for the source's delta."""
    dest = m.area / "basis" / f"{vol.name}.held.tar"
    if sourcing.fetch_held("volume snapshot basis", vol.name,
                           plan.get(f"rw:{vol.volume_id}", []), dest):
        return dest
    return None


def checkpoint_basis(m: Migration, sourcing: Sourcing, choices: list[Choice],
                     key: str) -> Path | None:
    """A holder's earlier checkpoint of the service (or of its application), unpacked: the
    bases of the pre-copy checkpoint's files."""
    dest = m.area / "basis" / "checkpoint.tar"
    if not sourcing.fetch_held("checkpoint basis", key, choices, dest):
        return None
    folder = m.area / "basis" / "checkpoint"
    folder.mkdir()
    archive.restore(dest, folder)
    return folder


def offer(m: Migration, bases: dict[str, Basis]) -> None:
    """The signatures of the final pass's bases go to the source now, not in the
    downtime."""
    def offers() -> Iterator[pb.BaseOffer]:
        for rel, basis in bases.items():
            for i, part in enumerate(basis.signature.to_chunks()):
                yield pb.BaseOffer(migration_id=m.migration_id,
                                   path=rel if i == 0 else "", signature=part)

    size = sum(b.signature.wire_size for b in bases.values())
    m.source.call("OfferBases", offers(), timeout=m.deadline(size))


def local_volume_basis(m: Migration, name: str) -> Basis | None:
    """A volume this node already holds (a stale copy) is a good basis for its snapshot,
    when the container that left it here went to this migration's source: a basis is read
    by the delta the source sends, and a source naming another container's volume must
    not read it (check_volume_free lets it replace a stale copy, not read it)."""
    if not m.runtime.volume_exists(name):
        return None
    if request.departed_to(m, name) != m.source_name:
        m.report.log(f"volume {name}: the copy here left with a container that went to "
                     f"another node than {m.source_name}; not used as a basis")
        return None
    path = m.area / "basis" / f"{name}.tar"
    archive.snapshot(m.runtime.volume_path(name), path)
    return movers.Basis(path, make_signature(path))


def create(m: Migration, spec: pb.ContainerSpec) -> None:
    """Create the new container before the freeze, so that the restore only starts it;
    until it runs, a rollback removes it (agent/migration/recovery.py)."""
    stale = request.existing_container(m, spec.name)
    if stale:  # departed (request_phase): its volumes stay replaceable once it is gone
        m.store.mark_volumes_departed(stale.id, list(stale.volumes))
        m.runtime.remove(stale.id)
    new = m.entry.at_destination.new_container = m.runtime.create_like(
        spec, m.request.allow_privileged)
    m.confine()  # here, before the freeze: the engine is asked outside the downtime
    if m.request.memory_transfer == POST_COPY:
        # until every page arrived, a restart (after the kill of a copy whose pages cannot
        # come) would run it afresh, without its memory: its policy comes at the end
        policy = m.runtime.restart_policy(new)
        if restarts(policy):
            m.runtime.set_restart_policy(new, {"Name": "no"})
            m.entry.at_destination.restart_policy = policy
    m.journal.save(m.entry)
    movers.apply_rootfs(m, m.new_container, m.area / ROOTFS)


def plain_file(path: Path) -> bool:
    """A neighbour's archive may hold symlinks: a basis is only ever a regular file of its own
    (a link could point at /proc/kcore, or at a secret whose block hashes would leave)."""
    return path.is_file() and not path.is_symlink()


def expect_digest(path: Path, want: str) -> None:
    if digest(path) != want:
        raise DeltaError(f"{path.name}: not the content the source holds")
