"""The node's embedded database (SQLite): survives agent restarts, safe across threads."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS departed (
    container_id TEXT PRIMARY KEY,
    migration_id TEXT NOT NULL,
    at REAL NOT NULL
);
"""


class Store:
    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(state_dir / "catalog.db", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def mark_departed(self, container_id: str, migration_id: str) -> None:
        """The container migrated away: the stopped copy left here may be replaced later."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO departed VALUES (?, ?, ?)",
                             (container_id, migration_id, time.time()))

    def is_departed(self, container_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM departed WHERE container_id = ?",
                                   (container_id,)).fetchone()
        return row is not None
