"""A container's writable layer (its root filesystem changes) as an archive a peer can rebuild.

Overlay keeps what a container wrote in an upper directory: added and changed files as they
are, deleted ones as whiteouts (0/0 character devices), replaced directories marked opaque (an
xattr). The archive carries whiteouts as image layers do (`.wh.NAME`, `.wh..wh..opq`), and
owners, modes and extended attributes (user.* and security.*) as they are, so that the
destination rebuilds the same upper directory under its new container before the restore.

The upper directory belongs to a running container whose processes may swap a folder for a
symlink while it is read: the walk opens every directory and file relative to its parent with
O_NOFOLLOW, so it never leaves the layer. Entries are sorted and carry lstat metadata, so an
unchanged file yields the same bytes in two snapshots and travels as matched delta blocks.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
from pathlib import Path

from agent.dataplane.archive import restore
from agent.errors import Refused

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
XATTR_KEY = "MIGCTL.xattr."  # pax header of an extended attribute, its value in hex
XATTR_SPACES = ("user.", "security.")  # trusted.* would steer overlay itself: never copied


def snapshot_layer(upper: Path, archive: Path) -> None:
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(f".{archive.name}.part")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        if upper.is_dir():
            top = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                _walk(tar, top, "", {})
            finally:
                os.close(top)
    os.replace(tmp, archive)


def _walk(tar: tarfile.TarFile, dir_fd: int, prefix: str,
          links: dict[tuple[int, int], str]) -> None:
    for name in sorted(os.listdir(dir_fd)):
        arcname = f"{prefix}{name}"
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue  # removed while we read: the final pass, taken frozen, has the truth
        info = tarfile.TarInfo(arcname)
        info.mode, info.uid, info.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
        info.mtime = int(st.st_mtime)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            tar.addfile(_empty(f"{prefix}{WHITEOUT}{name}"))  # deleted from the image
        elif stat.S_ISLNK(st.st_mode):
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(name, dir_fd=dir_fd)
            tar.addfile(info)
        elif stat.S_ISDIR(st.st_mode):
            fd = _open(name, dir_fd, os.O_DIRECTORY)
            if fd is None:
                continue
            try:
                info.type = tarfile.DIRTYPE
                opaque = _xattrs(fd, info)
                tar.addfile(info)
                if opaque:
                    tar.addfile(_empty(f"{arcname}/{OPAQUE}"))
                _walk(tar, fd, f"{arcname}/", links)
            finally:
                os.close(fd)
        elif stat.S_ISREG(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in links:
                info.type, info.linkname = tarfile.LNKTYPE, links[key]
                tar.addfile(info)
                continue
            fd = _open(name, dir_fd, 0)
            if fd is None:
                continue
            with os.fdopen(fd, "rb") as f:
                info.size = os.fstat(fd).st_size
                _xattrs(fd, info)
                tar.addfile(info, f)
            links[key] = arcname
        # sockets, FIFOs and real devices hold no data and cannot be restored: left out


def _open(name: str, dir_fd: int, flags: int) -> int | None:
    with contextlib.suppress(FileNotFoundError, NotADirectoryError, OSError):
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | flags, dir_fd=dir_fd)
    return None


def _empty(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = 0o600
    return info


def _xattrs(fd: int, info: tarfile.TarInfo) -> bool:
    """Copy FD's user.* and security.* attributes into INFO; True if it is an opaque dir."""
    opaque = False
    for attr in os.listxattr(fd):
        if attr == OPAQUE_XATTR:
            opaque = os.getxattr(fd, attr) == b"y"
        elif attr.startswith(XATTR_SPACES):
            info.pax_headers[XATTR_KEY + attr] = os.getxattr(fd, attr).hex()
    return opaque


def restore_layer(archive: Path, upper: Path) -> None:
    """Rebuild UPPER (a new container's empty upper directory) from ARCHIVE: checked whole
    first, like every archive from a peer, then whiteouts and attributes put back."""
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            _check_layer_entry(archive, m)
    for m in restore(archive, upper, keep_modes=True):
        path = upper / m.name
        base = os.path.basename(m.name)
        if base == OPAQUE:
            path.unlink()
            os.setxattr(path.parent, OPAQUE_XATTR, b"y")
        elif base.startswith(WHITEOUT):
            path.unlink()
            os.mknod(path.parent / base[len(WHITEOUT):], stat.S_IFCHR, os.makedev(0, 0))
        for key, value in m.pax_headers.items():
            if key.startswith(XATTR_KEY):
                os.setxattr(path, key[len(XATTR_KEY):], bytes.fromhex(value),
                            follow_symlinks=False)


def _check_layer_entry(archive: Path, m: tarfile.TarInfo) -> None:
    """What only a layer archive holds: whiteout markers (empty regular files naming a plain
    entry) and attributes of the two copied namespaces, in hex."""
    base = os.path.basename(m.name)
    why = ""
    if base.startswith(WHITEOUT) and base != OPAQUE:
        hidden = base[len(WHITEOUT):]
        if not m.isreg() or m.size or hidden in ("", ".", "..") or hidden.startswith(WHITEOUT):
            why = "is not a whiteout marker of a plain name"
    elif base == OPAQUE and (not m.isreg() or m.size):
        why = "is not an opaque-directory marker"
    for key, value in m.pax_headers.items():
        if not key.startswith(XATTR_KEY):
            continue
        attr = key[len(XATTR_KEY):]
        try:
            bytes.fromhex(value)
        except ValueError:
            why = f"carries attribute {attr!r} with a malformed value"
        if not attr.startswith(XATTR_SPACES) or m.issym() or m.islnk():
            why = f"carries attribute {attr!r}, which a layer does not"
    if why:
        raise Refused(f"archive {archive.name}: {m.name!r} {why}")
