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

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from migctl.agent.migration.state import DESTINATION, ENDED, PEER, SELF, SOURCE, State, legal
from migctl.common.errors import AlreadyExists, FailedPrecondition


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
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    id TEXT NOT NULL,
    role TEXT NOT NULL,
    state TEXT NOT NULL
);
"""
MAX_EVENTS = 100_000  # the events kept for consumers that resume (the oldest go first)


@dataclass(frozen=True)
class Event:
    """One journaled state of one migration, numbered in the order this node wrote them."""

    seq: int
    at: float
    id: str
    role: str
    state: State



@dataclass
class SourceData:
    """What the source journals of a migration besides its state."""

    name: str = ""  # the container's name (a destination may ask by name)
    authorized_at: float = 0.0  # wall clock: the operator's consent expires
    keys: list[str] = field(default_factory=list)  # its checkpoints' cache keys
    volumes: dict[str, dict[str, Any]] = field(default_factory=dict)  # name: read_only, guid
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)  # path: volume, ...
    restart_policy: dict[str, Any] = field(default_factory=dict)  # put back by a resume
    paused: bool = False  # frozen by a pause (page server): its memory never left it
    lazy: bool = False  # post-copy: its lazy checkpoint serves the pages
    keep_connections: bool = False  # its final checkpoint carries its TCP connections
    moves_address: bool = False  # it has an address that moves (macvlan, ipvlan)
    resume: str = ""  # what the resume did

    @property
    def isolated(self) -> bool:
        """Cut off its network from before its final checkpoint: the destination takes its
        address over, or carries its connections."""
        return self.keep_connections or self.moves_address


@dataclass
class DestinationData:
    """What the destination journals of a migration besides its state."""

    name: str = ""  # the container's name, as its source described it
    new_container: str = ""  # created here; a rollback removes it
    created_volumes: list[str] = field(default_factory=list)  # made here; a rollback too
    stray_container: str = ""  # never started, left by a rollback whose engine was silent
    lazy: bool = False  # restored lazily (post-copy): complete once every page came
    restart_policy: dict[str, Any] = field(default_factory=dict)  # set once complete
    remove_source: bool = False  # the operator asked that the source's copy go
    error: str = ""  # why it failed
    rollback: str = ""  # a rollback pending, and why
    report: dict[str, Any] = field(default_factory=dict)  # for `migctl history`


DATA = {SOURCE: SourceData, DESTINATION: DestinationData}


def _data(role: str, raw: dict[str, Any]) -> SourceData | DestinationData:
    """ROLE's data read back (keys of another version ignored)."""
    kind = DATA[role]
    known = {f.name for f in fields(kind)}
    return kind(**{k: v for k, v in raw.items() if k in known})


@dataclass
class Entry:
    id: str
    role: str
    container: str
    state: State
    peer: str = ""  # the node this migration is bound to (the other end)
    peer_address: str = ""
    data: SourceData | DestinationData | None = None  # the role's; made blank when None
    updated: float = 0.0

    def __post_init__(self) -> None:
        if self.data is None:
            self.data = DATA[self.role]()
        if not isinstance(self.data, DATA[self.role]):
            raise TypeError(f"a {self.role} entry holds {DATA[self.role].__name__}")

    @property
    def ended(self) -> bool:
        return self.state.ended

    @property
    def at_source(self) -> SourceData:
        assert isinstance(self.data, SourceData), self.role
        return self.data

    @property
    def at_destination(self) -> DestinationData:
        assert isinstance(self.data, DestinationData), self.role
        return self.data

    def dumps(self) -> str:
        return json.dumps(asdict(self.data))  # type: ignore[call-overload]

    def update(self, changes: dict[str, Any]) -> None:
        """Set fields of the data by name; a name the role does not journal is a bug."""
        for key, value in changes.items():
            if not hasattr(self.data, key):
                raise TypeError(f"a {self.role} entry journals no {key!r}")
            setattr(self.data, key, value)


class Journal:
    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(state_dir / "journal.db", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a state must survive a crash
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()
        self._written = threading.Condition(self._lock)  # an event was written

    def create(self, entry: Entry) -> None:
        """A new migration; an id seen before (in any state) is refused: no replays."""
        entry.updated = time.time()
        with self._lock, self._transaction():
            try:
                self._db.execute(
                    "INSERT INTO migrations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (entry.id, entry.role, entry.container, entry.state.value, entry.peer,
                     entry.peer_address, entry.dumps(), entry.updated))
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"migration id {entry.id} was used before on this node; "
                                    "every migration needs a new id") from None
            self._event(entry)

    def save(self, entry: Entry) -> None:
        """Write ENTRY's data (container, peer address, data); its state only moves by `move`."""
        entry.updated = time.time()
        with self._lock:
            self._db.execute(
                "UPDATE migrations SET container = ?, peer_address = ?, data = ?, updated = ? "
                "WHERE id = ? AND role = ?",
                (entry.container, entry.peer_address, entry.dumps(), entry.updated,
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
            entry.update(data or {})
            entry.updated = time.time()
            with self._transaction():
                self._db.execute(
                    "UPDATE migrations SET state = ?, data = ?, updated = ? "
                    "WHERE id = ? AND role = ?",
                    (to.value, entry.dumps(), entry.updated, migration_id, role))
                self._event(entry)
            return entry

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """A state and its event are written together, or neither."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _event(self, entry: Entry) -> None:
        seq = self._db.execute(
            "INSERT INTO events (at, id, role, state) VALUES (?, ?, ?, ?)",
            (entry.updated, entry.id, entry.role, entry.state.value)).lastrowid or 0
        if seq % 1000 == 0:
            self._db.execute("DELETE FROM events WHERE seq <= ?", (seq - MAX_EVENTS,))
        self._written.notify_all()

    def events(self, after: int, limit: int = 500) -> list[Event]:
        """The events written after the one numbered AFTER, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                                    (after, limit)).fetchall()
        return [Event(r[0], r[1], r[2], r[3], State(r[4])) for r in rows]

    def last_event(self) -> int:
        """The number of the newest event ever written here (0: none)."""
        with self._lock:
            row = self._db.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        return row[0] if row else 0

    def oldest_event(self) -> int:
        """The number of the oldest event kept (0: none yet)."""
        with self._lock:
            row = self._db.execute("SELECT MIN(seq) FROM events").fetchone()
        return row[0] or 0

    def wait_for_event(self, after: int, timeout: float) -> None:
        """Return when an event after AFTER was written, or after TIMEOUT seconds."""
        with self._written:
            if not self.events(after, 1):
                self._written.wait(timeout)

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
                     peer_address=row[5], data=_data(row[1], json.loads(row[6])),
                     updated=row[7])
