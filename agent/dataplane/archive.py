"""Volume snapshots as tar archives.

Archives are deterministic (sorted entries, metadata from lstat), so an unchanged file yields
the same bytes in two snapshots and the delta engine only sends what changed.

An archive comes from a peer, and nothing a peer sends is believed: :func:`restore` refuses
anything :func:`snapshot` would never have written before it touches the target directory.
Safety comes from checking the entries (names, links, types, attributes), never from changing
what they carry: what is extracted is exactly what was archived (agent/dataplane/tree.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import tarfile
from pathlib import Path, PurePosixPath

from migctl.agent.dataplane.tree import (
    DELETED,
    MTIME_NS,
    ROOT,
    SPARSE,
    SPARSE_SIZE,
    XATTR_KEY,
    Manifest,
    copied_xattr,
    pack,
)
from migctl.common.errors import Refused

_MTIME = re.compile(r"-?[0-9]{1,20}")  # nanoseconds, before 1970 too
MAX_SPARSE_SIZE = 1 << 44  # ext4's largest file: a sparse entry announcing more is refused
# Python 3.11.4 and later filter what they extract unless told not to; the checks here are
# ours, and 3.11.2 (Debian 12's) has no filters at all
_AS_ARCHIVED = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}


def snapshot(source_dir: Path, archive: Path, since: Manifest | None = None) -> Manifest:
    """Archive SOURCE_DIR exactly (devices and sockets left out: they hold no data, and
    :func:`restore` refuses them); with SINCE only what changed (agent/dataplane/tree.py)."""
    return pack(source_dir, archive, layer=False, since=since)


class _Hostile(Exception):
    def __init__(self, member: tarfile.TarInfo, why: str) -> None:
        super().__init__(f"{member.name!r} {why}")


def _inside(name: str, member: tarfile.TarInfo) -> PurePosixPath:
    """NAME normalised (`a`, `./a` and `a/` are one name); refused if it leaves the volume."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise _Hostile(member, f"names {name!r}, outside the volume")
    if path == PurePosixPath("."):
        raise _Hostile(member, "names the volume itself")
    return path


def _check(members: list[tarfile.TarInfo]) -> None:
    """Refuse, in one pass, every entry our snapshots never hold. The `tar` extraction filter
    alone is not enough: some Python releases (3.11.7 among them) do not check hard-link
    targets, and no filter sees a link followed by a file of the same name, which then writes
    through the link to wherever it points."""
    kinds: dict[PurePosixPath, str] = {}  # normalised name -> "file", "dir" or "link"
    for i, member in enumerate(members):
        _check_headers(member)
        if member.name == ROOT:
            if i or not member.isdir():
                raise _Hostile(member, "names the volume itself, not as its first folder entry")
            kinds[PurePosixPath(ROOT)] = "dir"
            continue
        path = _inside(member.name, member)
        if path in kinds:
            raise _Hostile(member, "repeats an earlier entry (it could write through it)")
        for parent in path.parents:
            if kinds.setdefault(parent, "dir") != "dir":
                raise _Hostile(member, f"is placed below {str(parent)!r}, not a directory")
        if member.islnk():
            if kinds.get(_inside(member.linkname, member)) != "file":
                raise _Hostile(member, f"is a hard link to {member.linkname!r}, "
                                       "not to an earlier regular file of the archive")
        elif not (member.isreg() or member.isdir() or member.issym() or member.isfifo()):
            raise _Hostile(member, "is a device or other special file")
        kinds[path] = "file" if member.isreg() else "dir" if member.isdir() else "link"


def _check_headers(member: tarfile.TarInfo) -> None:
    """Attributes only of the namespaces we copy, in hex; sparse extents that fit the file."""
    for key, value in member.pax_headers.items():
        if key.startswith(XATTR_KEY):
            attr = key[len(XATTR_KEY):]
            if not copied_xattr(attr) or member.issym() or member.islnk():
                raise _Hostile(member, f"carries attribute {attr!r}, which migctl never copies "
                                       "there")
            try:
                bytes.fromhex(value)
            except ValueError:
                raise _Hostile(member, f"carries attribute {attr!r} with a malformed value") \
                    from None
    if SPARSE in member.pax_headers:
        _sparse_extents(member)
    if not _MTIME.fullmatch(member.pax_headers.get(MTIME_NS, "0")):
        raise _Hostile(member, "has a malformed mtime")
    if member.isfifo() and any(k.startswith(XATTR_KEY + "user.") for k in member.pax_headers):
        raise _Hostile(member, "is a FIFO with a user.* attribute, which the kernel refuses")


def _sparse_extents(member: tarfile.TarInfo) -> tuple[list[tuple[int, int]], int]:
    """A sparse member's extents and size, as checked: in order, apart, inside the size, and
    adding up to the data the member holds."""
    try:
        extents = [(int(o), int(n)) for o, n in json.loads(member.pax_headers[SPARSE])]
        size = int(member.pax_headers[SPARSE_SIZE])
    except (KeyError, ValueError, TypeError, RecursionError):
        raise _Hostile(member, "has malformed sparse extents") from None
    end = 0
    for offset, length in extents:
        if offset < end or length < 0:
            raise _Hostile(member, "has sparse extents out of order or overlapping")
        end = offset + length
    if not member.isreg() or end > size or size > MAX_SPARSE_SIZE or \
            sum(n for _, n in extents) != member.size:
        raise _Hostile(member, "has sparse extents that do not fit the file")
    return extents, size


def open_plain(archive: Path) -> tarfile.TarFile:
    """ARCHIVE as the plain tar our snapshots are. tarfile.open alone inflates gzip, bzip2 and
    xz on the fly, past every size limit counted in the bytes that came over the wire (1.6 KB
    wrote 2 GiB); and the archive must carry every byte it extracts, so a sparse entry cannot
    announce more than it holds either."""
    try:
        tar = tarfile.open(archive, "r:")  # noqa: SIM115 - the caller closes it
    except tarfile.ReadError as err:
        raise Refused(f"archive {archive.name} is not a plain tar archive ({err}); migctl's "
                      "snapshots are never compressed") from None
    try:
        members = tar.getmembers()
    except tarfile.TarError as err:
        tar.close()
        raise Refused(f"archive {archive.name} is malformed: {err}") from None
    declared = sum(m.size for m in members if m.isreg())
    if declared > archive.stat().st_size:
        tar.close()
        raise Refused(f"archive {archive.name} announces {declared} bytes of files in "
                      f"{archive.stat().st_size} bytes: it would extract more than it holds")
    return tar


def restore(archive: Path, target_dir: Path) -> list[tarfile.TarInfo]:
    """Replace TARGET_DIR's content with ARCHIVE's, exactly. Every entry is checked before
    anything is touched, so a hostile archive leaves the volume as it was. Returns the entries
    extracted."""
    with open_plain(archive) as tar:
        members = tar.getmembers()
        try:
            _check(members)
        except _Hostile as err:
            raise Refused(f"archive {archive.name} has a hostile entry: {err}") from None
        for entry in os.listdir(target_dir):
            remove_entry(target_dir / entry, target_dir)
        _extract(tar, target_dir, members)  # paths and links were checked above, whole
        return members


def apply_changes(archive: Path, target_dir: Path) -> list[tarfile.TarInfo]:
    """Apply a changes archive (tree.pack with `since`) to TARGET_DIR in place: deletions
    first, then the changed entries over what is there. Checked whole before anything is
    touched, and every entry's parents in TARGET_DIR must be real folders (a symlink the
    container left there could otherwise carry a write out of it). Returns the entries
    extracted. A deletion names what is here, so its parents must be folders here: a folder
    of the archive replaces a link only after the deletions (a link `esc -> /` plus a folder
    `esc` and a deletion `esc/etc` once removed the host's /etc)."""
    with open_plain(archive) as tar:
        members = tar.getmembers()
        gone = [m for m in members if DELETED in m.pax_headers]
        rest = [m for m in members if DELETED not in m.pax_headers]
        try:
            _check(rest)
            for m in gone:
                _inside(m.name, m)
                _real_parents(target_dir, m, set())
            folders = {PurePosixPath(m.name) for m in rest if m.isdir()}
            for m in rest:
                _real_parents(target_dir, m, folders)
        except _Hostile as err:
            raise Refused(f"archive {archive.name} has a hostile entry: {err}") from None
        for m in gone:
            remove_entry(target_dir / m.name, target_dir)
        for m in rest:
            path = target_dir / m.name
            if m.name == ROOT:
                continue
            with contextlib.suppress(FileNotFoundError):
                st = path.lstat()
                if not (m.isdir() and stat.S_ISDIR(st.st_mode)):
                    remove_entry(path, target_dir)  # replaced, never written through
        _extract(tar, target_dir, rest)  # paths, links and parents were checked above
        return rest


def _real_parents(target_dir: Path, member: tarfile.TarInfo,
                  folders: set[PurePosixPath]) -> None:
    """MEMBER's parents are folders here, or folders of the archive (which replace whatever
    holds their name here before anything is extracted)."""
    if member.name == ROOT:
        return
    here = target_dir
    for parent in reversed(_inside(member.name, member).parents[:-1]):
        if parent in folders:
            continue
        here = target_dir / parent
        try:
            st = here.lstat()
        except FileNotFoundError:
            return  # created from the archive, whose own entries _check has checked
        if not stat.S_ISDIR(st.st_mode):
            raise _Hostile(member, f"is placed below {str(here.relative_to(target_dir))!r}, "
                                   "which is not a folder here")


def remove_entry(path: Path, root: Path) -> None:
    """Remove PATH (a folder with its content), which must lie in ROOT as the kernel resolves
    its parents now: the last guard, after the checks, against a link in the way."""
    real_root = os.path.realpath(root)
    parent = os.path.realpath(path.parent)
    if os.path.commonpath([real_root, parent]) != real_root:
        raise Refused(f"{path} resolves to {parent}, outside {root}: not removed")
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(path.lstat().st_mode):
            shutil.rmtree(path)
        else:
            path.unlink()


def _extract(tar: tarfile.TarFile, target_dir: Path, members: list[tarfile.TarInfo]) -> None:
    """MEMBERS (checked) into TARGET_DIR as archived; what the kernel still refuses (an
    attribute value it finds invalid) is a refusal too, the migration's to roll back."""
    try:
        _extract_checked(tar, target_dir, members)
    except (OSError, ValueError, tarfile.TarError) as err:
        raise Refused(f"an entry of the archive could not be extracted as archived: {err}") \
            from None


def _extract_checked(tar: tarfile.TarFile, target_dir: Path,
                     members: list[tarfile.TarInfo]) -> None:
    """MEMBERS into TARGET_DIR as archived: modes, numeric owners, times, attributes, sparse
    files with their holes, and the tree's own folder."""
    sparse = {m.name for m in members if SPARSE in m.pax_headers}
    later = [m for m in members if m.name == ROOT or m.name in sparse
             or (m.islnk() and m.linkname in sparse)]
    tar.extractall(target_dir, members=[m for m in members if m not in later],
                   numeric_owner=True, **_AS_ARCHIVED)
    for m in later:
        path = target_dir if m.name == ROOT else target_dir / m.name
        if m.name in sparse:
            _write_sparse(tar, m, path)
        elif m.islnk():
            os.link(target_dir / m.linkname, path)
            continue
        os.chown(path, m.uid, m.gid)
        os.chmod(path, m.mode)
    for m in members:
        for key, value in m.pax_headers.items():
            if key.startswith(XATTR_KEY):
                path = target_dir if m.name == ROOT else target_dir / m.name
                os.setxattr(path, key[len(XATTR_KEY):], bytes.fromhex(value),
                            follow_symlinks=False)
    # times last, deepest first: writing into a folder moves the folder's own
    for m in sorted(members, key=lambda m: m.name, reverse=True):
        path = target_dir if m.name == ROOT else target_dir / m.name
        ns = int(m.pax_headers.get(MTIME_NS) or int(m.mtime) * 10**9)
        os.utime(path, ns=(ns, ns), follow_symlinks=False)


def _write_sparse(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> None:
    extents, size = _sparse_extents(member)
    data = tar.extractfile(member)
    assert data is not None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        for offset, length in extents:
            os.lseek(fd, offset, os.SEEK_SET)
            left = length
            while left:
                chunk = data.read(min(left, 1 << 20))
                if not chunk:
                    raise Refused(f"{member.name!r} holds less data than its extents say")
                os.write(fd, chunk)
                left -= len(chunk)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
