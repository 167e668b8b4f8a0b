"""Per-migration staging areas: the only files an agent serves.

Every path a peer names is resolved here, relative to one migration's folder; anything that
would leave it (absolute paths, `..`, symlinks pointing out) is refused.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from agent.errors import InvalidArgument

_MIGRATION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Staging:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "staging"
        self.root.mkdir(parents=True, exist_ok=True)

    def area(self, migration_id: str) -> Path:
        if not _MIGRATION_ID.match(migration_id):
            raise InvalidArgument(f"invalid migration id {migration_id!r}")
        path = self.root / migration_id
        path.mkdir(exist_ok=True)
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
        shutil.rmtree(self.area(migration_id), ignore_errors=True)
