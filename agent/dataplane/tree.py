"""A folder of a running container (a volume, or its writable layer) as archives a peer can
apply: the whole tree for the first copy, then only what changed since.

The walk records a manifest of every entry's metadata (type and mode, owner, size, mtime,
ctime, inode) before it reads the entry. The final pass, taken while the container is frozen,
walks again with lstat only and archives just the entries whose metadata differs, plus a
deletion mark for each entry that is gone, so its cost follows what changed, not the tree's
size. An entry whose times fall within RACY_NS of the first walk is always taken again, since
a write in the same clock tick as the walk's stat leaves the times equal (git's "racy" entries).

The tree belongs to a running container whose processes may swap a folder for a symlink while
it is read: the walk opens every directory and file relative to its parent with O_NOFOLLOW,
so it never leaves the tree. Entries are sorted and carry lstat metadata, so an unchanged file
yields the same bytes in two archives and travels as matched delta blocks.

Files move exactly: every mode bit (setuid, setgid and sticky included), numeric owners,
mtimes to the nanosecond (MIGCTL.mtime), extended attributes (user.*, security.* and
POSIX ACLs) in pax headers, hard links, symlinks, FIFOs, the tree's own root (entry ".") and
the holes of sparse files (their data extents, MIGCTL.sparse). A process holding a file open is
restored only if its mode is what it was (CRIU checks), and a service's files need their
owners. Devices and sockets are left out: they hold no data, and a device from a peer would be
a door to the node's hardware.

A writable layer (LAYER) carries overlay's whiteouts as image layers do (`.wh.NAME`,
`.wh..wh..opq`).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
XATTR_KEY = "MIGCTL.xattr."  # pax header of an extended attribute, its value in hex
XATTR_SPACES = ("user.", "security.")  # trusted.* would steer overlay itself: never copied
ACLS = ("system.posix_acl_access", "system.posix_acl_default")
SPARSE = "MIGCTL.sparse"  # pax header of a sparse file: its data extents, [[offset, length]...]
SPARSE_SIZE = "MIGCTL.size"  # and its size, holes included (the member holds only the data)
ROOT = "."  # the tree's own folder: its mode, owner, times and attributes
MTIME_NS = "MIGCTL.mtime"  # pax header of an entry's mtime in nanoseconds (tar's is seconds)
DELETED = "MIGCTL.deleted"  # pax header of an entry that is gone since the first archive
RACY_NS = 2_000_000_000
"""Entries modified this close to the first walk are always archived again."""


@dataclass
class Manifest:
    """What the first archive held: arcname -> (st_mode, uid, gid, size, mtime_ns, ctime_ns,
    inode), and when the walk that read it began."""

    taken_ns: int
    entries: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def changed(self, name: str, key: tuple[int, ...]) -> bool:
        if self.entries.get(name) != key:
            return True
        return max(key[4], key[5]) >= self.taken_ns - RACY_NS

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_text(json.dumps({"taken_ns": self.taken_ns, "entries": self.entries}))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        data = json.loads(path.read_text())
        return cls(data["taken_ns"], {k: tuple(v) for k, v in data["entries"].items()})


def copied_xattr(name: str) -> bool:
    return name.startswith(XATTR_SPACES) or name in ACLS


def pack(root: Path, archive: Path, *, layer: bool, since: Manifest | None = None) -> Manifest:
    """Archive ROOT into ARCHIVE: all of it, or with SINCE only what changed since that
    manifest (and deletion marks). Returns the manifest of what ROOT holds now."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(f".{archive.name}.part")
    now = Manifest(time.time_ns())
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        if root.is_dir():
            top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                walk = _Walk(tar, layer, since, now)
                walk.root(top)
                walk.walk(top, "")
            finally:
                os.close(top)
        if since is not None:
            for name in sorted(set(since.entries) - set(now.entries) - {ROOT}):
                gone = _empty(name)
                gone.pax_headers[DELETED] = "1"
                tar.addfile(gone)
    os.replace(tmp, archive)
    return now


@dataclass
class _Walk:
    tar: tarfile.TarFile
    layer: bool
    since: Manifest | None
    now: Manifest
    links: dict[tuple[int, int], str] = field(default_factory=dict)

    def root(self, fd: int) -> None:
        """The tree's own folder, first: its mode and owner matter (a database's data folder
        belongs to the database's user)."""
        st = os.fstat(fd)
        key = (st.st_mode, st.st_uid, st.st_gid, 0, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        self.now.entries[ROOT] = key
        if self.since is None or self.since.changed(ROOT, key):
            info = _info(ROOT, st)
            info.type = tarfile.DIRTYPE
            if not self.layer:  # a layer's root is the engine's
                _xattrs(fd, info)
                self.tar.addfile(info)

    def walk(self, dir_fd: int, prefix: str) -> None:
        for name in sorted(os.listdir(dir_fd)):
            arcname = f"{prefix}{name}"
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while we read: the final pass, taken frozen, has the truth
            key = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                   st.st_ctime_ns, st.st_ino)
            kept = stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or \
                stat.S_ISLNK(st.st_mode) or stat.S_ISFIFO(st.st_mode) or \
                (self.layer and _is_whiteout(st))
            if not kept:
                continue  # sockets and devices hold no data, and a device is the node's
            self.now.entries[arcname] = key
            write = self.since is None or self.since.changed(arcname, key)
            self.entry(dir_fd, name, arcname, st, write)

    def entry(self, dir_fd: int, name: str, arcname: str, st: os.stat_result,
              write: bool) -> None:
        info = _info(arcname, st)
        tar = self.tar
        if _is_whiteout(st):
            if write:
                prefix = arcname[: len(arcname) - len(name)]
                tar.addfile(_empty(f"{prefix}{WHITEOUT}{name}"))  # deleted from the image
        elif stat.S_ISLNK(st.st_mode):
            if write:
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(name, dir_fd=dir_fd)
                tar.addfile(info)
        elif stat.S_ISFIFO(st.st_mode):
            if write:  # opened, a FIFO would block: its attributes stay behind
                info.type = tarfile.FIFOTYPE
                tar.addfile(info)
        elif stat.S_ISDIR(st.st_mode):
            fd = _open(name, dir_fd, os.O_DIRECTORY)
            if fd is None:
                return
            try:
                if write:
                    info.type = tarfile.DIRTYPE
                    opaque = _xattrs(fd, info)
                    tar.addfile(info)
                    if opaque:
                        tar.addfile(_empty(f"{arcname}/{OPAQUE}"))
                self.walk(fd, f"{arcname}/")  # changes may lie deeper in an unchanged folder
            finally:
                os.close(fd)
        elif write:
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self.links:
                info.type, info.linkname = tarfile.LNKTYPE, self.links[key]
                tar.addfile(info)
                return
            fd = _open(name, dir_fd, 0)
            if fd is None:
                return
            with os.fdopen(fd, "rb") as f:
                info.size = os.fstat(fd).st_size
                _xattrs(fd, info)
                extents = _extents(fd, info.size) if st.st_blocks * 512 < info.size else None
                if extents is None:
                    tar.addfile(info, f)
                else:
                    info.pax_headers[SPARSE] = json.dumps(extents, separators=(",", ":"))
                    info.pax_headers[SPARSE_SIZE] = str(info.size)
                    info.size = sum(length for _, length in extents)
                    tar.addfile(info, _Extents(fd, extents))
            self.links[key] = arcname


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _open(name: str, dir_fd: int, flags: int) -> int | None:
    with contextlib.suppress(FileNotFoundError, NotADirectoryError, OSError):
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | flags, dir_fd=dir_fd)
    return None


def _info(name: str, st: os.stat_result) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode, info.uid, info.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    info.mtime = st.st_mtime // 1
    info.pax_headers[MTIME_NS] = str(st.st_mtime_ns)
    return info


def _extents(fd: int, size: int) -> list[list[int]] | None:
    """The data extents of a file with holes ([offset, length]...); None without holes."""
    extents, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # no data after POS: a hole to the end
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append([start, end - start])
        pos = end
    os.lseek(fd, 0, os.SEEK_SET)
    if extents == [[0, size]]:
        return None
    return extents


class _Extents:
    """A sparse file's data extents, read one after another (what the member holds)."""

    def __init__(self, fd: int, extents: list[list[int]]) -> None:
        self.fd = fd
        self.parts = [(o, n) for o, n in extents if n]

    def read(self, size: int = -1) -> bytes:
        """SIZE bytes (all with -1), across extents: tarfile wants full reads."""
        out = bytearray()
        while self.parts and (size < 0 or len(out) < size):
            offset, length = self.parts[0]
            want = length if size < 0 else min(size - len(out), length)
            data = os.pread(self.fd, want, offset)
            out += data + bytes(want - len(data))  # truncated meanwhile: the final pass corrects
            if want == length:
                self.parts.pop(0)
            else:
                self.parts[0] = (offset + want, length - want)
        return bytes(out)


def _empty(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = 0o600
    return info


def _xattrs(fd: int, info: tarfile.TarInfo) -> bool:
    """Copy FD's attributes that move (copied_xattr) into INFO; True if it is an opaque
    folder of a layer."""
    opaque = False
    for attr in sorted(os.listxattr(fd)):
        if attr == OPAQUE_XATTR:
            opaque = os.getxattr(fd, attr) == b"y"
        elif copied_xattr(attr):
            info.pax_headers[XATTR_KEY + attr] = os.getxattr(fd, attr).hex()
    return opaque
