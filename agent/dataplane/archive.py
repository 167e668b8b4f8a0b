"""Volume snapshots as tar archives.

Archives are deterministic (sorted entries, metadata from lstat), so an unchanged file yields
the same bytes in two snapshots and the delta engine only sends what changed.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

from agent.errors import InvalidArgument


def snapshot(source_dir: Path, archive: Path) -> None:
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(f".{archive.name}.part")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(os.listdir(source_dir)):
            tar.add(source_dir / entry, arcname=entry, recursive=True)
    os.replace(tmp, archive)


def _refuse_hostile(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """Stricter than the `tar` filter, which silently rewrites absolute names: a snapshot we
    made never holds absolute or `..` names or devices, so one that does is refused whole."""
    if member.name.startswith("/") or ".." in Path(member.name).parts:
        raise tarfile.AbsolutePathError(member)
    if member.ischr() or member.isblk():
        raise tarfile.SpecialFileError(member)
    return tarfile.tar_filter(member, dest)


def restore(archive: Path, target_dir: Path) -> None:
    """Replace TARGET_DIR's content with ARCHIVE's. Every entry is checked before anything is
    touched, so a hostile archive leaves the volume as it was."""
    with tarfile.open(archive) as tar:
        links: set[Path] = set()
        try:
            for member in tar.getmembers():
                _refuse_hostile(member, str(target_dir))
                path = Path(member.name)
                if any(parent in links for parent in path.parents):
                    # our snapshots never put an entry behind a link; one that does may escape
                    raise tarfile.OutsideDestinationError(member, str(target_dir / path))
                if member.issym() or member.islnk():
                    links.add(path)
        except tarfile.FilterError as err:
            raise InvalidArgument(f"volume archive {archive.name} has a hostile entry: {err}") \
                from err
        for entry in os.listdir(target_dir):
            path = target_dir / entry
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        tar.extractall(target_dir, filter=_refuse_hostile)
