"""Volume snapshots as tar archives.

Archives are deterministic (sorted entries, metadata from lstat), so an unchanged file yields
the same bytes in two snapshots and the delta engine only sends what changed.

An archive comes from a peer, and nothing a peer sends is believed: :func:`restore` refuses
anything :func:`snapshot` would never have written before it touches the target directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tarfile
from pathlib import Path, PurePosixPath

from agent.dataplane.tree import DELETED, Manifest, pack
from agent.errors import Refused


def snapshot(source_dir: Path, archive: Path, since: Manifest | None = None) -> Manifest:
    """Archive SOURCE_DIR (devices, FIFOs and sockets left out: they hold no data, and
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
    for member in members:
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
        elif not (member.isreg() or member.isdir() or member.issym()):
            raise _Hostile(member, "is a device, FIFO or other special file")
        kinds[path] = "file" if member.isreg() else "dir" if member.isdir() else "link"


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


def restore(archive: Path, target_dir: Path, *, keep_modes: bool = False) -> list[tarfile.TarInfo]:
    """Replace TARGET_DIR's content with ARCHIVE's. Every entry is checked before anything is
    touched, so a hostile archive leaves the volume as it was. KEEP_MODES keeps setuid bits
    and numeric owners as they are (a container's root filesystem needs them); otherwise the
    `tar` filter drops them. Returns the entries extracted."""
    with open_plain(archive) as tar:
        members = tar.getmembers()
        try:
            _check(members)
        except _Hostile as err:
            raise Refused(f"archive {archive.name} has a hostile entry: {err}") from None
        for entry in os.listdir(target_dir):
            remove_entry(target_dir / entry, target_dir)
        if keep_modes:  # paths and links were checked above, whole
            tar.extractall(target_dir, filter="fully_trusted", numeric_owner=True)
        else:
            tar.extractall(target_dir, filter="tar")  # and still drop setuid bits, check paths
        return members


def apply_changes(archive: Path, target_dir: Path, *,
                  keep_modes: bool = False) -> list[tarfile.TarInfo]:
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
            with contextlib.suppress(FileNotFoundError):
                st = path.lstat()
                if not (m.isdir() and stat.S_ISDIR(st.st_mode)):
                    remove_entry(path, target_dir)  # replaced, never written through
        if keep_modes:  # paths, links and parents were checked above
            tar.extractall(target_dir, members=rest, filter="fully_trusted", numeric_owner=True)
        else:
            tar.extractall(target_dir, members=rest, filter="tar")
        return rest


def _real_parents(target_dir: Path, member: tarfile.TarInfo,
                  folders: set[PurePosixPath]) -> None:
    """MEMBER's parents are folders here, or folders of the archive (which replace whatever
    holds their name here before anything is extracted)."""
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
