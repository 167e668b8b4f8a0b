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
import posixpath
from collections.abc import Iterator
from pathlib import Path

from migctl.agent.runtime.criu import images_pb2 as img
from migctl.agent.runtime.criu.imagefile import MNTS_MAGIC, entries, parse
from migctl.common.errors import Refused

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
    """Absolute, and written the one way the kernel would print it: no `..`, `.`, `//` or
    trailing slash (two spellings of one path would not collide below)."""
    return path == "/" or (path.startswith("/") and not path.startswith("//")
                           and posixpath.normpath(path) == path)


def _mountpoint(entry: img.mnt_entry) -> str:
    """The mount point inside the container: CRIU writes it from the namespace's root
    ("/proc/kcore"); older images have a leading dot ("./proc/kcore")."""
    point = entry.mountpoint
    return point[1:] or "/" if point.startswith("./") or point == "." else point


def namespaces(images: Path) -> Iterator[tuple[str, list[img.mnt_entry]]]:
    """Every mount namespace's mounts (mountpoints-<id>.img) in IMAGES."""
    for path in sorted(images.glob("mountpoints-*.img")):
        yield path.name, [parse(img.mnt_entry(), data, path.name)
                          for data in entries(path, MNTS_MAGIC, MAX_MOUNTS)]


def check_mounts(images: Path, masked: tuple[str, ...] = (), readonly: tuple[str, ...] = (),
                 host_root: Path = Path("/")) -> int:
    """Refuses mount images that would mount more than the created container has; returns the
    number of mounts checked. HOST_ROOT: where this node's /proc and /sys are (tests)."""
    found = list(namespaces(images))
    if len(found) != 1:
        # a nested mount namespace takes CAP_SYS_ADMIN; CRIU would build its root anew
        raise Refused(f"checkpoint {images.name} holds {len(found)} mount namespaces "
                      "(mountpoints-*.img), not the container's one")
    name, mounts = found[0]
    return _check_namespace(name, mounts, masked, readonly, host_root)


def _check_namespace(name: str, mounts: list[img.mnt_entry], masked: tuple[str, ...],
                     readonly: tuple[str, ...], host_root: Path) -> int:
    ids = {m.mnt_id for m in mounts}
    roots = [m for m in mounts if m.parent_mnt_id not in ids or m.parent_mnt_id == m.mnt_id]
    if len(roots) != 1:
        raise Refused(f"checkpoint image {name} has {len(roots)} root mounts, not one")
    root = roots[0]
    external = {m.mnt_id for m in mounts if m.ext_mount or m.ext_key}
    ext_devs = {m.root_dev for m in mounts if m.mnt_id in external}
    # CRIU binds a mount from another of the same device, type, source and options (from an
    # external one, of the same device): a mount shows what any mount of its device may be
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
        if not m.HasField("sb_flags"):
            # CRIU then moves the read-only flag to the superblock, which a bind ignores
            raise Refused(f"{where} carries no superblock flags (CRIU would restore it "
                          "writable)")
        if m.mnt_id in external:
            # runc names its mounts by their mount point, and /dev/null, which masks files
            # (another engine masks more files: /dev/null anywhere only hides what it covers)
            if m.ext_key not in (point, "/dev/null"):
                raise Refused(f"{where} names the external mount {m.ext_key!r}: runc gives "
                              "CRIU its mounts under their mount points (and /dev/null over "
                              "masked files)")
            continue  # bound by CRIU from what runc gives it under that name
        if m.root_dev in ext_devs and m.root != "/":
            # CRIU would bind it from an external mount's folder, whose symlinks are the
            # source's (a volume's content), resolved on this host
            raise Refused(f"{where} is a bind of {m.root!r} of an external mount's device: the "
                          "container was given none here")
        if m is root:
            continue  # bound from the root filesystem runc gives CRIU
        if (m.root_dev, m.fstype, m.source, m.options) == (
                root.root_dev, root.fstype, root.source, root.options):
            if m.root != "/":  # a path in the source's root filesystem may be its symlink
                raise Refused(f"{where} binds {m.root!r} of the root filesystem: only its "
                              "root may be bound")
            continue
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
        _placed(m, point, where, readonly)
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


def _placed(m: img.mnt_entry, point: str, where: str, readonly: tuple[str, ...]) -> None:
    """proc, sysfs and cgroup only where the engine puts them: a second /proc elsewhere would
    have none of the first's masks."""
    if m.fstype == PROC and not (point == "/proc" and m.root == "/" or point in readonly and
                                 m.flags & MS_RDONLY and m.root == point.removeprefix("/proc")):
        raise Refused(f"{where} is a proc: the container has one at /proc, and read-only "
                      "parts of it where the engine puts them")
    if m.fstype == SYSFS and point != "/sys":
        raise Refused(f"{where} is a sysfs: the container has one, at /sys")
    if m.fstype in (CGROUP, CGROUP2) and not (point + "/").startswith("/sys/fs/cgroup/"):
        raise Refused(f"{where} is a cgroup filesystem: the container has them under "
                      "/sys/fs/cgroup")
