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


def restore(archive: Path, target_dir: Path) -> None:
    """Replace TARGET_DIR's content with ARCHIVE's; hostile entries are refused."""
    for entry in os.listdir(target_dir):
        path = target_dir / entry
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    with tarfile.open(archive) as tar:
        try:
            tar.extractall(target_dir, filter="tar")
        except tarfile.FilterError as err:
            raise InvalidArgument(f"volume archive {archive.name} has a hostile entry: {err}") \
                from err
