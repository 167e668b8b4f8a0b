"""The migration journal: each migration's state, written before each step, on both agents.

A restarted agent reads it and finishes or undoes what was in flight (agent/migration/recovery.py).
The source's entry also holds the commit point: once the destination has committed, only the
destination may ask the source to resume, so two copies can never run.

Every state change goes through `Journal.move`, a compare-and-set checked against `TRANSITIONS`:
which state may follow which, and who may cause it (this agent on its own, or the peer node the
migration is bound to). `save` writes an entry's data and never its state.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import AlreadyExists, FailedPrecondition

# Destination states, in order; the source uses AUTHORIZED, PRE_COPY, FROZEN, COMMITTED,
# RESUMING and the ends.
AUTHORIZED = "authorized"  # source only: an operator allowed this migration; not begun yet
REQUESTED = "requested"
PRE_COPY = "pre-copy"
FROZEN = "frozen"
TRANSFERRING_FINAL = "transferring-final"
RESTORING = "restoring"
PAGING_IN = "paging-in"  # destination, post-copy: it runs here; memory pages still arrive
COMMITTED = "committed"  # source only: the destination owns the container from now on
RESUMING = "resuming"    # source only: the container is being started again here
DONE = "done"
ROLLED_BACK = "rolled-back"
FAILED = "failed"
ENDED = (DONE, ROLLED_BACK, FAILED)

SOURCE, DESTINATION = "source", "destination"
SELF, PEER = "self", "peer"  # who moves an entry: this agent, or the node it is bound to

_BOTH = frozenset({SELF, PEER})
_SELF = frozenset({SELF})
_PEER = frozenset({PEER})

# (role, from state) -> {to state: who may cause it}. Anything not listed is illegal.
TRANSITIONS: dict[tuple[str, str], dict[str, frozenset[str]]] = {
    (SOURCE, AUTHORIZED): {PRE_COPY: _PEER, FAILED: _BOTH},
    (SOURCE, PRE_COPY): {FROZEN: _PEER, FAILED: _BOTH},
    # A frozen container is resumed by the destination's rollback, or by this agent when the
    # destination falls silent (lease, liveness) or this agent restarts; never after COMMITTED
    # unless the destination, which owns it then, asks.
    (SOURCE, FROZEN): {COMMITTED: _PEER, RESUMING: _BOTH},
    (SOURCE, COMMITTED): {DONE: _PEER, RESUMING: _PEER},
    (SOURCE, RESUMING): {ROLLED_BACK: _SELF},
    (DESTINATION, REQUESTED): {PRE_COPY: _SELF, FAILED: _SELF},
    (DESTINATION, PRE_COPY): {FROZEN: _SELF, FAILED: _SELF},
    (DESTINATION, FROZEN): {TRANSFERRING_FINAL: _SELF, ROLLED_BACK: _SELF},
    (DESTINATION, TRANSFERRING_FINAL): {RESTORING: _SELF, ROLLED_BACK: _SELF},
    (DESTINATION, RESTORING): {PAGING_IN: _SELF, DONE: _SELF, ROLLED_BACK: _SELF},
    # Post-copy: until the last page arrived the copy here is incomplete; a failure removes it,
    # and the source (paused since the freeze) goes on from there.
    (DESTINATION, PAGING_IN): {DONE: _SELF, ROLLED_BACK: _SELF},
}


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
    state: str
    peer: str = ""  # the node this migration is bound to (the other end)
    peer_address: str = ""
    data: dict = field(default_factory=dict)
    updated: float = 0.0

    @property
    def ended(self) -> bool:
        return self.state in ENDED


def legal(role: str, state: str, to: str, by: str) -> bool:
    return by in TRANSITIONS.get((role, state), {}).get(to, frozenset())


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
                    (entry.id, entry.role, entry.container, entry.state, entry.peer,
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

    def move(self, migration_id: str, role: str, to: str, by: str = SELF,
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
                (to, json.dumps(entry.data), entry.updated, migration_id, role))
            return entry

    def try_move(self, migration_id: str, role: str, to: str, by: str = SELF) -> Entry | None:
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
        args: list[str] = list(ENDED)
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
        return Entry(id=row[0], role=row[1], container=row[2], state=row[3], peer=row[4],
                     peer_address=row[5], data=json.loads(row[6]), updated=row[7])
