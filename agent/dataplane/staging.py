"""Per-migration staging areas: the only files an agent serves.

An area exists only for a migration the journal knows: it is made when the migration is
authorized (source) or started (destination), never because a peer named an id. Every path a
peer names is resolved here, relative to one migration's folder; anything that would leave it
(absolute paths, `..`, symlinks pointing out) is refused. Areas are 0700: they hold memory
images and volume contents.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from migctl.common.errors import InvalidArgument, NotFound

_MIGRATION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def valid_migration_id(migration_id: str) -> str:
    if not _MIGRATION_ID.match(migration_id or ""):
        raise InvalidArgument(f"invalid migration id {migration_id!r}")
    return migration_id


def private_dir(path: Path) -> Path:
    """PATH as a folder only root can read (created if missing, tightened if it was not)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


class Staging:
    def __init__(self, state_dir: Path) -> None:
        private_dir(state_dir)
        # absolute: CRIU's processes are told these paths, and found again by them
        self.root = private_dir(state_dir.resolve() / "staging")

    def create(self, migration_id: str) -> Path:
        path = self.root / valid_migration_id(migration_id)
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    def area(self, migration_id: str) -> Path:
        """The existing area of MIGRATION_ID; NotFound when there is none."""
        path = self.root / valid_migration_id(migration_id)
        if not path.is_dir():
            raise NotFound(f"no staging area for migration {migration_id} on this node")
        return path

    def resolve(self, migration_id: str, relative: str) -> Path:
        area = self.area(migration_id)
        rel = Path(relative)
        if not relative or rel.is_absolute() or ".." in rel.parts:
            raise InvalidArgument(f"path {relative!r} is not inside the staging area")
        path = (area / rel).resolve()
        if not path.is_relative_to(area.resolve()):
            raise InvalidArgument(f"path {relative!r} leads out of the staging area")
        return path

    def drop(self, migration_id: str) -> None:
        shutil.rmtree(self.root / valid_migration_id(migration_id), ignore_errors=True)
