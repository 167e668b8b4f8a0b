"""Unit tests of the catalog, the journal and the policy: no engine needed."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from migctl.agent.catalog.registry import Holding
from migctl.agent.catalog.store import Store
from migctl.agent.migration import journal as j
from migctl.agent.migration.policy import LOCAL, Link, rank
from migctl.agent.migration.state import PEER, SELF, SOURCE, State


def blob(tmp: Path, name: str, size: int) -> Path:
    p = tmp / name
    p.write_bytes(os.urandom(size))
    return p


def test_cache_evicts_least_recently_used_and_says_what(tmp_path: Path) -> None:
    evicted: list[str] = []
    store = Store(tmp_path / "state", cache_bytes=250_000,
                  on_evict=lambda items: evicted.extend(i.key for i in items))
    store.put("rw:a", 1.0, blob(tmp_path, "a", 100_000), "da")
    store.put("rw:b", 2.0, blob(tmp_path, "b", 100_000), "db")
    assert store.get("rw:a", 1.0) is not None  # a is now more recently used than b
    store.put("rw:c", 3.0, blob(tmp_path, "c", 100_000), "dc")
    assert evicted == ["rw:b"]
    assert store.find("rw:b") == [] and store.find("rw:a") and store.find("rw:c")
    total = sum(f.stat().st_size for f in store.cache_dir.iterdir())
    assert total <= 250_000


def test_catalog_survives_a_restart_and_orders_newest_first(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    store.put("rw:v", 10.0, blob(tmp_path, "old", 10), "d1")
    store.put("rw:v", 20.0, blob(tmp_path, "new", 10), "d2")
    vid = store.volume_id("data")
    assert store.volume_id("data") == vid  # assigned once
    assert store.volume_id("tagged", label="guid-1") == "guid-1"  # the label wins
    again = Store(tmp_path / "state")
    assert [i.ts for i in again.find("rw:v")] == [20.0, 10.0]
    assert again.volume_id("data") == vid
    again.remember_volume_id("arrived", "guid-9")
    assert Store(tmp_path / "state").volume_id("arrived") == "guid-9"


def test_only_one_of_commit_and_lease_resume_wins(tmp_path: Path) -> None:
    journal = j.Journal(tmp_path)
    journal.create(j.Entry("m1", SOURCE, "cid", State.FROZEN))
    wins = []
    barrier = threading.Barrier(8)

    def race(state: str, by: str) -> None:
        barrier.wait()
        if journal.try_move("m1", SOURCE, state, by) is not None:
            wins.append(state)

    threads = [threading.Thread(target=race, args=s)
               for s in [(State.COMMITTED, PEER), (State.RESUMING, SELF)] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert journal.get("m1", SOURCE).state == wins[0]
    assert j.Journal(tmp_path).get("m1", SOURCE).state == wins[0]  # on disk


def test_policy_prefers_fresh_snapshots_and_fast_holders() -> None:
    fast = Link(rtt=0.001, throughput=100e6, load=0.1)
    slow = Link(rtt=0.05, throughput=1e6, load=0.1)
    busy = Link(rtt=0.001, throughput=100e6, load=3.0)
    links = {"me": LOCAL, "nodeC": fast, "nodeD": slow, "nodeE": busy}
    snaps = [Holding("rw:v", "nodeC", 100.0, 10_000_000, "x"),
             Holding("rw:v", "nodeD", 200.0, 10_000_000, "y"),
             Holding("rw:v", "nodeZ", 300.0, 10_000_000, "z")]  # unreachable: no link
    ranked = rank(snaps, links, freshness=True, now=260.0)
    assert [c.holding.node for c in ranked] == ["nodeD", "nodeC"]
    assert ranked[0].reason.startswith("60 s old, 10.0 MB on nodeD; link 8 Mbit/s")
    layers = [Holding("layer:l", n, 0.0, 10_000_000, "l") for n in ("nodeD", "nodeE", "nodeC")]
    assert [c.holding.node for c in rank(layers, links, freshness=False)] == \
        ["nodeC", "nodeE", "nodeD"]
    cached = rank([Holding("ro:r", "me", 0.0, 5, "r")], links, freshness=False)
    assert "this node's cache" in cached[0].reason


def test_a_cached_item_serves_only_migrations_from_the_nodes_that_held_it(
        tmp_path: Path) -> None:
    """Cache keys follow from a description its source writes: a hostile source naming another
    container's image must not get that container's checkpoint (second red team, 2)."""
    store = Store(tmp_path)
    src = tmp_path / "ckpt"
    src.write_bytes(b"memory of the victim")
    store.put("app:toytsm:1", 1.0, src, "d1", entitled=("nodeA", "nodeB"))
    assert [i.entitled for i in store.find("app:toytsm:1")] == [frozenset({"nodeA", "nodeB"})]
    assert store.find("app:toytsm:1", for_source="nodeA")
    assert store.find("app:toytsm:1", for_source="nodeC") == []
    assert store.get("app:toytsm:1", 1.0, for_source="nodeC") is None
    store.entitle("app:toytsm:1", 1.0, ["nodeC"])  # the same content came from nodeC too
    assert store.get("app:toytsm:1", 1.0, for_source="nodeC") is not None
    reopened = Store(tmp_path)  # the entitlement is on disk
    assert reopened.find("app:toytsm:1", for_source="nodeC")


def test_items_of_an_older_catalog_serve_nobody(tmp_path: Path) -> None:
    import sqlite3

    db = sqlite3.connect(tmp_path / "catalog.db")
    db.execute("CREATE TABLE items (key TEXT NOT NULL, ts REAL NOT NULL, size INTEGER NOT NULL, "
               "digest TEXT NOT NULL, file TEXT NOT NULL, used REAL NOT NULL, "
               "PRIMARY KEY (key, ts))")
    db.execute("INSERT INTO items VALUES ('rw:v', 1.0, 4, 'd', 'old', 1.0)")
    db.commit()
    db.close()
    store = Store(tmp_path)
    (store.cache_dir / "old").write_bytes(b"data")
    assert [i.entitled for i in store.find("rw:v")] == [frozenset()]
    assert store.find("rw:v", for_source="nodeA") == []
