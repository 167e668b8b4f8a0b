"""The node's catalog (SQLite in the state directory, so it survives restarts).

It records what this node keeps for later migrations: volume snapshots (`rw:<volume id>`,
timestamped), read-only volume contents (`ro:<digest>`), checkpoints (`app:<image tag>`,
`svc:<image tag>:<user>`, timestamped) and saved images (`image:<id>`). Their files live in a
cache folder bounded in size; the least recently used go first.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from migctl.agent.dataplane.staging import private_dir

_SCHEMA = """
CREATE TABLE IF NOT EXISTS departed (
    container_id TEXT PRIMARY KEY,
    migration_id TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    key TEXT NOT NULL,
    ts REAL NOT NULL,
    size INTEGER NOT NULL,
    digest TEXT NOT NULL,
    file TEXT NOT NULL,
    used REAL NOT NULL,
    PRIMARY KEY (key, ts)
);
CREATE TABLE IF NOT EXISTS departed_volumes (
    volume TEXT PRIMARY KEY,
    container_id TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS volume_ids (
    volume TEXT PRIMARY KEY,
    id TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Item:
    key: str
    ts: float
    size: int
    digest: str
    path: Path
    entitled: frozenset[str] = frozenset()
    """The nodes that held what this item holds (the two ends of the migration that made it):
    only a migration from one of them may use it, as a basis here or fetched from here. Cache
    keys follow from a container's description, which its source writes; a hostile source
    naming another container's keys must not get its memory or volumes."""


class Store:
    def __init__(self, state_dir: Path, cache_bytes: int = 2 << 30,
                 on_evict: Callable[[list[Item]], None] = lambda _: None) -> None:
        self.on_evict = on_evict
        # cached volume snapshots and checkpoints: only root may read them
        self.cache_dir = private_dir(private_dir(state_dir) / "cache")
        self.cache_bytes = cache_bytes
        self._db = sqlite3.connect(state_dir / "catalog.db", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(items)")}
        if "entitled" not in columns:  # a catalog of an older agent: its items serve nobody
            self._db.execute("ALTER TABLE items ADD COLUMN entitled TEXT NOT NULL DEFAULT ''")
        self._lock = threading.RLock()

    # -- departed containers ----------------------------------------------------------------

    def mark_departed(self, container_id: str, migration_id: str) -> None:
        """The container migrated away: the stopped copy left here may be replaced later."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO departed VALUES (?, ?, ?)",
                             (container_id, migration_id, time.time()))

    def mark_volumes_departed(self, container_id: str, volumes: list[str]) -> None:
        """The departed CONTAINER_ID is removed here (a migration back replaces it): its
        VOLUMES stay, used by no container, and may be replaced by a later migration too."""
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO departed_volumes VALUES (?, ?, ?)",
                                 [(v, container_id, time.time()) for v in volumes])

    def is_departed_volume(self, volume: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM departed_volumes WHERE volume = ?",
                                   (volume,)).fetchone()
        return row is not None

    def forget_departed_volumes(self, volumes: list[str]) -> None:
        """VOLUMES belong to a running container again."""
        with self._lock:
            self._db.executemany("DELETE FROM departed_volumes WHERE volume = ?",
                                 [(v,) for v in volumes])

    def departure(self, container_id: str = "", volume: str = "") -> str:
        """The migration that took CONTAINER_ID (or the departed container that left VOLUME)
        away from here; "" when none did."""
        with self._lock:
            if volume:
                row = self._db.execute("SELECT container_id FROM departed_volumes WHERE "
                                       "volume = ?", (volume,)).fetchone()
                container_id = row[0] if row else ""
            row = self._db.execute("SELECT migration_id FROM departed WHERE container_id = ?",
                                   (container_id,)).fetchone()
        return row[0] if row else ""

    def is_departed(self, container_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM departed WHERE container_id = ?",
                                   (container_id,)).fetchone()
        return row is not None

    # -- volume ids -------------------------------------------------------------------------

    def volume_id(self, volume: str, label: str = "") -> str:
        """A writable volume's cluster-wide id: its `rw-guid` label when it has one, else the
        id recorded for it here, assigned on first use."""
        with self._lock:
            if label:
                self._db.execute("INSERT OR REPLACE INTO volume_ids VALUES (?, ?)",
                                 (volume, label))
                return label
            row = self._db.execute("SELECT id FROM volume_ids WHERE volume = ?",
                                   (volume,)).fetchone()
            if row:
                return row[0]
            vid = str(uuid.uuid4())
            self._db.execute("INSERT INTO volume_ids VALUES (?, ?)", (volume, vid))
            return vid

    def remember_volume_id(self, volume: str, vid: str) -> None:
        """A volume that arrived here keeps the id it had at the source."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO volume_ids VALUES (?, ?)", (volume, vid))

    # -- cached items -----------------------------------------------------------------------

    def put(self, key: str, ts: float, source: Path, digest: str, move: bool = False,
            entitled: Iterable[str] = ()) -> Item:
        """Keep SOURCE under KEY (a copy, or the file itself with MOVE) for the ENTITLED nodes'
        migrations (Item.entitled); evict as needed."""
        nodes = frozenset(n for n in entitled if n)
        name = f"{abs(hash((key, ts))):x}-{uuid.uuid4().hex[:8]}"
        target = self.cache_dir / name
        if move:
            shutil.move(source, target)
        else:
            shutil.copyfile(source, target)
        size = target.stat().st_size
        with self._lock:
            old = self._db.execute("SELECT file FROM items WHERE key = ? AND ts = ?",
                                   (key, ts)).fetchone()
            self._db.execute("INSERT OR REPLACE INTO items (key, ts, size, digest, file, used, "
                             "entitled) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (key, ts, size, digest, name, time.time(), _nodes(nodes)))
            if old:
                (self.cache_dir / old[0]).unlink(missing_ok=True)
            evicted = self._evict(keep=name)
        self.on_evict(evicted)
        return Item(key, ts, size, digest, target, nodes)

    def entitle(self, key: str, ts: float, nodes: Iterable[str]) -> None:
        """NODES may use the item too: content-addressed items (`ro:<digest>`) are kept once,
        whichever migrations brought the same content."""
        with self._lock:
            row = self._db.execute("SELECT entitled FROM items WHERE key = ? AND ts = ?",
                                   (key, ts)).fetchone()
            if row:
                merged = set(filter(None, row[0].split(","))) | {n for n in nodes if n}
                self._db.execute("UPDATE items SET entitled = ? WHERE key = ? AND ts = ?",
                                 (_nodes(merged), key, ts))

    def find(self, key: str, for_source: str | None = None) -> list[Item]:
        """Copies held under KEY, newest first (only those whose file is still there); with
        FOR_SOURCE only those a migration from that node may use."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, ts, size, digest, file, entitled FROM items WHERE key = ? "
                "ORDER BY ts DESC", (key,)).fetchall()
        items = [Item(k, ts, size, dg, self.cache_dir / f,
                      frozenset(filter(None, e.split(","))))
                 for k, ts, size, dg, f, e in rows if (self.cache_dir / f).exists()]
        return [i for i in items if for_source is None or for_source in i.entitled]

    def get(self, key: str, ts: float, for_source: str | None = None) -> Item | None:
        for item in self.find(key, for_source):
            if item.ts == ts:
                with self._lock:
                    self._db.execute("UPDATE items SET used = ? WHERE key = ? AND ts = ?",
                                     (time.time(), key, ts))
                return item
        return None

    def size(self) -> int:
        """Bytes the cache holds now."""
        with self._lock:
            return self._db.execute("SELECT COALESCE(SUM(size), 0) FROM items").fetchone()[0]

    def _evict(self, keep: str) -> list[Item]:
        """Least recently used first, until the cache fits (never the item just added)."""
        rows = self._db.execute("SELECT key, ts, size, file, digest FROM items ORDER BY used"
                                ).fetchall()
        total = sum(r[2] for r in rows)
        evicted = []
        for key, ts, size, name, dg in rows:
            if total <= self.cache_bytes:
                break
            if name == keep:
                continue
            self._db.execute("DELETE FROM items WHERE key = ? AND ts = ?", (key, ts))
            with_file = self.cache_dir / name
            if with_file.exists():
                os.unlink(with_file)
            total -= size
            evicted.append(Item(key, ts, size, dg, with_file))
        return evicted


def _nodes(nodes: Iterable[str]) -> str:
    return ",".join(sorted(nodes))
