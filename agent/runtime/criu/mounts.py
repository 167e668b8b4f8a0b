"""What a checkpoint's mount images would mount in the restored container, checked before the
restore.

CRIU rebuilds the container's mount namespace from mountpoints-*.img, as the dump wrote it,
with root's powers: runc gives it only the root filesystem and the bind mounts of the
container's configuration (as external mounts). A source that is not trusted could ask for a
devtmpfs (every host disk), an overlay whose options name the host's folders, a writable
/sys, or a /proc without the engine's masks (/proc/sysrq-trigger writable reboots the host).
So, unless the container may mount what it likes itself (privileged, or CAP_SYS_ADMIN with
the operator's leave):

- a mount is the namespace's root (bound from the root filesystem), a bind of it (the same
  device, type and source: CRIU binds it from there), an external one (runc's), or a new
  instance of a filesystem that holds nothing of the host's (SAFE_TYPES); sysfs and cgroup
  read-only;
- paths are absolute and plain (no `..`, which CRIU would follow out of its yard), and no two
  mounts share a mount point (a later one would hide a mask);
- every path the engine masks or makes read-only in the created container (its HostConfig's
  MaskedPaths and ReadonlyPaths) that exists on this node is covered: masked by a mount that is
  not proc or sysfs itself, read-only by a read-only mount.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from agent.errors import Refused
from agent.runtime.criu import images_pb2 as img
from agent.runtime.criu.imagefile import MNTS_MAGIC, entries, parse

PROC, SYSFS, DEVTMPFS, TMPFS, DEVPTS, CGROUP, MQUEUE, CGROUP2 = 1, 2, 3, 5, 6, 12, 14, 23
SAFE_TYPES = {PROC: "proc", SYSFS: "sysfs", TMPFS: "tmpfs", DEVPTS: "devpts",
              MQUEUE: "mqueue", CGROUP: "cgroup", CGROUP2: "cgroup2"}
"""Filesystems CRIU may mount anew: each mount is a fresh instance, or the container's own
view (proc of its pid namespace, cgroup of its cgroup namespace)."""
READ_ONLY_TYPES = {SYSFS, CGROUP, CGROUP2}
FSTYPE_NAMES = {0: "unsupported", 3: "devtmpfs", 4: "binfmt_misc", 7: "simfs", 8: "pstore",
                9: "securityfs", 10: "fusectl", 11: "debugfs", 13: "aufs", 15: "fuse",
                16: "auto", 17: "overlay", 18: "autofs", 19: "tracefs"}
ENGINE_MASKED = ("/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys",
                 "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                 "/proc/sched_debug", "/proc/scsi", "/sys/firmware")
ENGINE_READONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
"""What the engine masks and makes read-only in a container by default (moby's oci defaults
of 20.10; later engines mask more, which is not required of a checkpoint)."""
MS_RDONLY = 1
MAX_MOUNTS = 4096


def _plain(path: str) -> bool:
    p = PurePosixPath(path)
    return p.is_absolute() and ".." not in p.parts and str(p) == path.rstrip("/") or path == "/"


def _mountpoint(entry: img.mnt_entry) -> str:
    """The mount point inside the container: CRIU writes it relative to the namespace's root,
    with a leading dot ("./proc/kcore")."""
    point = entry.mountpoint
    return "/" + point.removeprefix(".").lstrip("/") if point.startswith(".") else point


def namespaces(images: Path) -> Iterator[tuple[str, list[img.mnt_entry]]]:
    """Every mount namespace's mounts (mountpoints-<id>.img) in IMAGES."""
    for path in sorted(images.glob("mountpoints-*.img")):
        yield path.name, [parse(img.mnt_entry(), data, path.name)
                          for data in entries(path, MNTS_MAGIC, MAX_MOUNTS)]


def check_mounts(images: Path, masked: tuple[str, ...] = (), readonly: tuple[str, ...] = (),
                 host_root: Path = Path("/")) -> int:
    """Refuses mount images that would mount more than the created container has; returns the
    number of mounts checked. HOST_ROOT: where this node's /proc and /sys are (tests)."""
    checked = 0
    found = False
    for name, mounts in namespaces(images):
        found = True
        checked += _check_namespace(name, mounts, masked, readonly, host_root)
    if not found:
        raise Refused(f"checkpoint {images.name} holds no mount image (mountpoints-*.img)")
    return checked


def _check_namespace(name: str, mounts: list[img.mnt_entry], masked: tuple[str, ...],
                     readonly: tuple[str, ...], host_root: Path) -> int:
    ids = {m.mnt_id for m in mounts}
    roots = [m for m in mounts if m.parent_mnt_id not in ids or m.parent_mnt_id == m.mnt_id]
    if len(roots) != 1:
        raise Refused(f"checkpoint image {name} has {len(roots)} root mounts, not one")
    root = roots[0]
    # CRIU binds a mount from another of the same device, type and source (from an external
    # one, of the same device): a mount shows what any mount of its device may be
    types: dict[int, set[int]] = {}
    for m in mounts:
        types.setdefault(m.root_dev, set()).add(m.fstype)
    at: dict[str, img.mnt_entry] = {}
    for m in mounts:
        point = _mountpoint(m)
        where = f"checkpoint image {name}: the mount at {point!r}"
        if not _plain(point) or not _plain(m.root or "/"):
            raise Refused(f"{where} (root {m.root!r}) is not a plain absolute path")
        if point in at:
            raise Refused(f"{where} is mounted twice (the second would hide the first)")
        at[point] = m
        if m is root or m.ext_mount or m.ext_key or (m.root_dev, m.fstype, m.source) == (
                root.root_dev, root.fstype, root.source):
            continue  # bound by CRIU from the root filesystem, or runc's own mounts
        for fstype in sorted(types[m.root_dev]):
            if fstype not in SAFE_TYPES:
                kind = FSTYPE_NAMES.get(fstype, f"type {fstype}")
                raise Refused(f"{where} is a {kind} mount"
                              f"{' of ' + m.fsname if m.fsname else ''} from {m.source!r}: "
                              "the container was given none here (a source cannot add one)")
        shown = types[m.root_dev] & READ_ONLY_TYPES
        if shown and not m.flags & MS_RDONLY:
            raise Refused(f"{where} is a writable {SAFE_TYPES[min(shown)]}: the engine gives it "
                          "read-only (a source cannot lift that)")
    for path in masked:
        if os.path.lexists(host_root / path.lstrip("/")):
            m = at.get(path)
            if m is None or types[m.root_dev] & {PROC, SYSFS}:
                raise Refused(f"checkpoint image {name} leaves {path} unmasked: the engine "
                              "masks it in the container here (a source cannot lift that)")
    for path in readonly:
        if os.path.lexists(host_root / path.lstrip("/")):
            m = at.get(path)
            if m is None or not m.flags & MS_RDONLY:
                raise Refused(f"checkpoint image {name} leaves {path} writable: the engine "
                              "makes it read-only in the container here (a source cannot lift "
                              "that)")
    return len(mounts)
