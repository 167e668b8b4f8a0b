"""The migration journal: each migration's state, written before each step, on both agents.

A restarted agent reads it and finishes or undoes what was in flight (agent/migration/recovery.py).
The source's entry also holds the commit point: once the destination has committed, only the
destination may ask the source to resume, so two copies can never run.

Every state change goes through `Journal.move`, a compare-and-set checked against the one table
of moves (`TRANSITIONS`, agent/migration/state.py): which state may follow which, and who may
cause it (this agent on its own, or the peer node the migration is bound to). `save` writes an
entry's data and never its state.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import AlreadyExists, FailedPrecondition
from agent.migration.state import DESTINATION, ENDED, PEER, SELF, State, legal


class IllegalTransition(FailedPrecondition):
    """A state change the table does not allow: a replay, a race lost, or a hostile call."""


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
    state: State
    peer: str = ""  # the node this migration is bound to (the other end)
    peer_address: str = ""
    data: dict = field(default_factory=dict)
    updated: float = 0.0

    @property
    def ended(self) -> bool:
        return self.state.ended


class Journal:
    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(state_dir / "journal.db", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a state must survive a crash
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()

    def create(self, entry: Entry) -> None:
        """A new migration; an id seen before (in any state) is refused: no replays."""
        entry.updated = time.time()
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO migrations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (entry.id, entry.role, entry.container, entry.state.value, entry.peer,
                     entry.peer_address, json.dumps(entry.data), entry.updated))
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"migration id {entry.id} was used before on this node; "
                                    "every migration needs a new id") from None

    def save(self, entry: Entry) -> None:
        """Write ENTRY's data (container, peer address, data); its state only moves by `move`."""
        entry.updated = time.time()
        with self._lock:
            self._db.execute(
                "UPDATE migrations SET container = ?, peer_address = ?, data = ?, updated = ? "
                "WHERE id = ? AND role = ?",
                (entry.container, entry.peer_address, json.dumps(entry.data), entry.updated,
                 entry.id, entry.role))

    def move(self, migration_id: str, role: str, to: State, by: str = SELF,
             data: dict | None = None) -> Entry:
        """Compare-and-set: move the entry to TO if the table allows it from where it is now,
        for BY; otherwise IllegalTransition (and nothing is written)."""
        with self._lock:
            entry = self.get(migration_id, role)
            if entry is None:
                raise IllegalTransition(f"no migration {migration_id} here")
            if not legal(role, entry.state, to, by):
                raise IllegalTransition(
                    f"migration {migration_id} is {entry.state} here; "
                    f"{'its peer' if by == PEER else 'this agent'} may not move it to {to}")
            entry.state = to
            entry.data.update(data or {})
            entry.updated = time.time()
            self._db.execute(
                "UPDATE migrations SET state = ?, data = ?, updated = ? WHERE id = ? AND role = ?",
                (to.value, json.dumps(entry.data), entry.updated, migration_id, role))
            return entry

    def try_move(self, migration_id: str, role: str, to: State, by: str = SELF
                 ) -> Entry | None:
        """`move`, or None when the entry was elsewhere (e.g. a commit racing a lease expiry:
        exactly one of them wins)."""
        try:
            return self.move(migration_id, role, to, by)
        except IllegalTransition:
            return None

    def get(self, migration_id: str, role: str) -> Entry | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM migrations WHERE id = ? AND role = ?",
                                   (migration_id, role)).fetchone()
        return self._entry(row) if row else None

    def known(self, migration_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM migrations WHERE id = ?",
                                    (migration_id,)).fetchone() is not None

    def in_flight(self, role: str | None = None) -> list[Entry]:
        marks = ",".join("?" * len(ENDED))
        query = f"SELECT * FROM migrations WHERE state NOT IN ({marks})"
        args: list[str] = [s.value for s in ENDED]
        if role:
            query += " AND role = ?"
            args.append(role)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY updated", args).fetchall()
        return [self._entry(r) for r in rows]

    def history(self, limit: int) -> list[Entry]:
        """The LIMIT entries changed last, newest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM migrations ORDER BY updated DESC LIMIT ?",
                                    (limit,)).fetchall()
        return [self._entry(r) for r in rows]

    def strays(self) -> list[Entry]:
        """Ended destination entries that left a created, never started container behind
        (its engine did not answer during the rollback)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM migrations WHERE role = ? AND "
                "json_extract(data, '$.stray_container') != ''", (DESTINATION,)).fetchall()
        return [self._entry(r) for r in rows]

    @staticmethod
    def _entry(row: tuple) -> Entry:
        return Entry(id=row[0], role=row[1], container=row[2], state=State(row[3]), peer=row[4],
                     peer_address=row[5], data=json.loads(row[6]), updated=row[7])
