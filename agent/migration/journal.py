"""The migration journal: each migration's state, written before each step, on both agents.

A restarted agent reads it and finishes or undoes what was in flight (agent/migration/recovery.py).
The source's entry also holds the commit point: once the destination has committed, only the
destination may ask the source to resume, so two copies can never run.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# Destination states, in order; the source uses FROZEN, COMMITTED and the two ends.
REQUESTED = "requested"
PRE_COPY = "pre-copy"
FROZEN = "frozen"
TRANSFERRING_FINAL = "transferring-final"
RESTORING = "restoring"
DONE = "done"
ROLLED_BACK = "rolled-back"
FAILED = "failed"
COMMITTED = "committed"  # source only: the destination owns the container from now on
ENDED = (DONE, ROLLED_BACK, FAILED)

SOURCE, DESTINATION = "source", "destination"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS migrations (
    id TEXT NOT NULL,
    role TEXT NOT NULL,
    container TEXT NOT NULL,
    state TEXT NOT NULL,
    peer TEXT NOT NULL DEFAULT '',
    peer_address TEXT NOT NULL DEFAULT '',
    data TEXT NOT NULL DEFAULT '{}',
    updated REAL NOT NULL,
    PRIMARY KEY (id, role)
);
"""


@dataclass
class Entry:
    id: str
    role: str
    container: str
    state: str
    peer: str = ""
    peer_address: str = ""
    data: dict = field(default_factory=dict)
    updated: float = 0.0

    @property
    def ended(self) -> bool:
        return self.state in ENDED


class Journal:
    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(state_dir / "journal.db", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a state must survive a crash
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()

    def record(self, entry: Entry) -> None:
        entry.updated = time.time()
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO migrations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (entry.id, entry.role, entry.container, entry.state, entry.peer,
                 entry.peer_address, json.dumps(entry.data), entry.updated))

    def get(self, migration_id: str, role: str) -> Entry | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM migrations WHERE id = ? AND role = ?",
                                   (migration_id, role)).fetchone()
        return self._entry(row) if row else None

    def in_flight(self, role: str | None = None) -> list[Entry]:
        marks = ",".join("?" * len(ENDED))
        query = f"SELECT * FROM migrations WHERE state NOT IN ({marks})"
        args: list[str] = list(ENDED)
        if role:
            query += " AND role = ?"
            args.append(role)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY updated", args).fetchall()
        return [self._entry(r) for r in rows]

    def transition(self, migration_id: str, role: str, expect: tuple[str, ...],
                   state: str) -> Entry | None:
        """Move to STATE only from one of EXPECT, atomically; None when the entry was elsewhere
        (e.g. a commit racing a lease expiry: exactly one of them wins)."""
        with self._lock:
            entry = self.get(migration_id, role)
            if entry is None or entry.state not in expect:
                return None
            entry.state = state
            self.record(entry)
            return entry

    @staticmethod
    def _entry(row: tuple) -> Entry:
        return Entry(id=row[0], role=row[1], container=row[2], state=row[3], peer=row[4],
                     peer_address=row[5], data=json.loads(row[6]), updated=row[7])
