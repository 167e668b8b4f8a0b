"""The tmpfs contents a checkpoint carries, checked and written anew before the restore.

CRIU restores a tmpfs's files (the container's /dev, /dev/shm, a --tmpfs) from
tmpfs-dev-<device>.tar.gz.img, or tmpfs-<mount id>.tar.gz.img, by piping it into GNU
`tar --extract --gzip` as root in its restore yard (criu/filesystems.c, tmpfs_restore). The
archive comes from the source, which is not trusted. GNU tar keeps members inside the mount
(no `..`, leading `/` stripped, links to outside made last: tests/test_criu_tmpfs.py runs it),
but not their size: a few KB of gzip unpack to gigabytes of the host's memory, under a mount
whose size option the source wrote too. And it would make any device node the archive names.

So the destination reads every archive CRIU would read, with a limit on what it unpacks, and
writes it anew with only what it checked: plain relative names, nothing written through a
link, hard links only to a file before them, device nodes only those the container may make
(any, with CAP_MKNOD; else the engine's and its own), owners as numbers, no extended
attributes. tar then reads what was checked: no two parsers of one hostile archive to disagree.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import posixpath
import stat
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from migctl.agent.runtime.criu.mounts import TMPFS, namespaces
from migctl.common.errors import Refused

MAX_TMPFS_BYTES = 1 << 30
"""The most one checkpoint's tmpfs archives may unpack to (files, plus a mount's own size
option where it is smaller): a container with more in its tmpfs is refused with this reason."""
MAX_MEMBERS = 1 << 16
HEADER_ROOM = 512 * 4 * MAX_MEMBERS
"""Unpacked bytes allowed beyond the files' own: tar headers (a long name takes a few)."""
DEFAULT_DEVICES = frozenset({("c", 1, 3), ("c", 1, 5), ("c", 1, 7), ("c", 1, 8), ("c", 1, 9),
                             ("c", 5, 0)})
"""The device nodes runc makes in every container's /dev: null, zero, full, random, urandom,
tty (libcontainer's DefaultSimpleDevices)."""
_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def size_option(options: str) -> int | None:
    """A tmpfs's size= option in bytes (None when absent, or relative to memory)."""
    for opt in options.split(","):
        if opt.startswith("size="):
            value = opt[5:].lower()
            scale = _UNITS.get(value[-1:], 1)
            digits = value[:-1] if value[-1:] in _UNITS else value
            return int(digits) * scale if digits.isdigit() else None
    return None


def archives(images: Path) -> Iterator[tuple[Path, str, int | None]]:
    """Every tmpfs archive CRIU would unpack from IMAGES, as (file, mount point, the mount's
    size option): the device's, else the mount's (CRIU's order); external mounts are runc's."""
    seen: set[Path] = set()
    for _, mounts in namespaces(images):
        for m in mounts:
            if m.fstype != TMPFS or m.ext_key or m.ext_mount:
                continue
            path = images / f"tmpfs-dev-{m.root_dev}.tar.gz.img"
            if not path.exists():
                path = images / f"tmpfs-{m.mnt_id}.tar.gz.img"
            if path.exists() and path not in seen:
                seen.add(path)
                yield path, m.mountpoint, size_option(m.options)


class _Bounded:
    """A reader that refuses to unpack more than LIMIT bytes (tarfile reads a long name's
    header whole, and the gzip stream to its end)."""

    def __init__(self, inner: IO[bytes], limit: int, name: str) -> None:
        self.inner, self.left, self.name = inner, limit, name

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(min(size, self.left + 1) if size >= 0 else self.left + 1)
        self.left -= len(data)
        if self.left < 0:
            raise Refused(f"checkpoint image {self.name} unpacks to more than a tmpfs may hold "
                          f"here ({MAX_TMPFS_BYTES} bytes, or its mount's size)")
        return data


def _plain(name: str, what: str, where: str) -> str:
    """NAME relative to the mount, in its one spelling ("." for the mount itself)."""
    rel = name
    while rel.startswith("./"):
        rel = rel[2:]
    rel = rel.rstrip("/") or "."
    if "\0" in rel or rel.startswith("/") or posixpath.normpath(rel) != rel or \
            ".." in rel.split("/"):
        raise Refused(f"{where} names {what} {name!r}, not a plain path inside the tmpfs")
    return rel


def rewrite(path: Path, point: str, limit: int,
            devices: frozenset[tuple[str, int, int]] | None, write: bool = True) -> int:
    """Checks the archive at PATH (of the tmpfs at POINT) and, with WRITE, writes it anew in
    its place; returns the bytes of its files. DEVICES: the nodes it may make (None: any)."""
    where = f"checkpoint image {path.name} (the tmpfs at {point})"
    fresh = path.with_name(path.name + ".checked")
    total, count = 0, 0
    dirs: set[str] = {"."}
    others: set[str] = set()  # every name that is not a folder: nothing goes below it
    files: set[str] = set()
    try:
        with contextlib.ExitStack() as stack:
            raw = stack.enter_context(gzip.open(path, "rb"))
            src = stack.enter_context(tarfile.open(
                fileobj=_Bounded(raw, limit + HEADER_ROOM, path.name),  # type: ignore[arg-type]
                mode="r|"))
            out = stack.enter_context(tarfile.open(
                fresh, "w:gz", compresslevel=1, format=tarfile.GNU_FORMAT)) if write else None
            for m in src:
                count += 1
                if count > MAX_MEMBERS:
                    raise Refused(f"{where} holds more than {MAX_MEMBERS} entries")
                rel = _plain(m.name, "the entry", where)
                parts = rel.split("/")
                for i in range(1, len(parts)):
                    up = "/".join(parts[:i])
                    if up in others:
                        raise Refused(f"{where} writes {rel!r} below {up!r}, which is not a "
                                      "folder (a link would take it out of the tmpfs)")
                    dirs.add(up)
                if rel != "." and (rel in dirs or rel in others):
                    raise Refused(f"{where} lists {rel!r} twice")
                info = tarfile.TarInfo(rel)
                info.mode, info.uid, info.gid = m.mode & 0o7777, m.uid, m.gid
                info.mtime = int(m.mtime) if 0 <= m.mtime < 1 << 33 else 0
                data: IO[bytes] | None = None
                if m.isdir():
                    info.type = tarfile.DIRTYPE
                    dirs.add(rel)
                elif m.isreg():
                    total += m.size
                    if total > limit:
                        raise Refused(f"{where} unpacks to more than {limit} bytes, the most "
                                      "that tmpfs may hold here")
                    info.size = m.size
                    data = src.extractfile(m) if write else None
                    files.add(rel)
                elif m.issym():
                    if "\0" in m.linkname or len(m.linkname) > 4096:
                        raise Refused(f"{where} has a link {rel!r} to no plain path")
                    info.type, info.linkname = tarfile.SYMTYPE, m.linkname
                elif m.islnk():
                    target = _plain(m.linkname, "the hard link target", where)
                    if target not in files:
                        raise Refused(f"{where} hard links {rel!r} to {m.linkname!r}, not a "
                                      "file before it in the tmpfs")
                    info.type, info.linkname = tarfile.LNKTYPE, target
                elif m.ischr() or m.isblk():
                    node = ("c" if m.ischr() else "b", m.devmajor, m.devminor)
                    if devices is not None and node not in devices:
                        raise Refused(f"{where} makes the device node {rel!r} "
                                      f"({node[0]} {node[1]}:{node[2]}), which its container "
                                      "may not make here (a source cannot give it devices)")
                    info.type = tarfile.CHRTYPE if m.ischr() else tarfile.BLKTYPE
                    info.devmajor, info.devminor = m.devmajor, m.devminor
                elif m.isfifo():
                    info.type = tarfile.FIFOTYPE
                else:
                    raise Refused(f"{where} has {rel!r} of tar type {m.type!r}")
                if not m.isdir():
                    others.add(rel)
                if out is not None:
                    out.addfile(info, data)
    except Refused:
        fresh.unlink(missing_ok=True)
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as err:
        fresh.unlink(missing_ok=True)
        raise Refused(f"{where} is not a tar archive that can be checked: {err}") from None
    if write:
        os.chmod(fresh, stat.S_IMODE(path.stat().st_mode))
        os.replace(fresh, path)
    return total


def rewrite_archives(images: Path, devices: frozenset[tuple[str, int, int]] | None,
                     write: bool = True) -> int:
    """Checks every tmpfs archive CRIU would unpack from IMAGES and, with WRITE, writes it
    anew; returns the bytes of their files (at most MAX_TMPFS_BYTES in all). A pre-copy
    checkpoint is only checked: the source makes its delta against its own copy."""
    total = 0
    for path, point, size in archives(images):
        limit = MAX_TMPFS_BYTES - total
        total += rewrite(path, point, limit if size is None else min(size, limit), devices,
                         write)
    return total


def device_nodes(paths: list[str]) -> frozenset[tuple[str, int, int]]:
    """The device nodes of PATHS on this node (a container's HostConfig.Devices), as
    (kind, major, minor); paths that are not devices here give none."""
    out = set()
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            out.add(("c" if stat.S_ISCHR(st.st_mode) else "b", os.major(st.st_rdev),
                     os.minor(st.st_rdev)))
    return frozenset(out)
