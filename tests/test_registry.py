"""RedisRegistry against a real redis-server that these tests start, own and stop themselves."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import redis

from migctl.agent.catalog.redis_registry import RedisRegistry
from migctl.agent.catalog.registry import Holding, open_registry

REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS_SERVER is None,
                                reason="redis-server missing (scripts/setup.sh installs it)")

DB = 3  # not 0, so the URL's database number is exercised

LAYER = "layer:sha256:" + "ab" * 32
RO = "ro:sha256:" + "cd" * 32
RW = "rw:3f2a9c0e-volume"
APP = "app:registry.example:5000/shop/web:1.2"
SVC = "svc:registry.example:5000/shop/web:1.2:alice"
ODD = "rw:weird|key:with|separators"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def redis_server() -> Iterator[int]:
    """A private redis-server on a free port; only this process is stopped afterwards."""
    assert REDIS_SERVER
    port = free_port()
    proc = subprocess.Popen(
        [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
         "--appendonly", "no", "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        probe = redis.Redis(port=port, socket_connect_timeout=1, socket_timeout=1)
        deadline = time.monotonic() + 15
        while True:
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {proc.returncode}") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        probe.close()
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with redis_server() as p:
        yield p


@pytest.fixture
def raw(port: int) -> Iterator[redis.Redis]:
    """Direct access to the database, emptied before each test."""
    r = redis.Redis(port=port, db=DB, decode_responses=True)
    r.flushdb()
    yield r
    r.close()


@pytest.fixture
def reg(port: int, raw: redis.Redis) -> Iterator[RedisRegistry]:
    r = RedisRegistry(f"redis://127.0.0.1:{port}/{DB}")
    yield r
    r.close()


def h(key: str, node: str, ts: float = 0, size: int = 100, digest: str = "") -> Holding:
    return Holding(key, node, ts, size, digest or f"sha256:{key}@{node}@{ts}")


def test_round_trip_all_key_kinds(reg: RedisRegistry) -> None:
    a = [h(LAYER, "edge-1.lab", size=4096), h(RO, "edge-1.lab", size=1 << 40),
         h(RW, "edge-1.lab", 1718000000.123456), h(APP, "edge-1.lab"), h(SVC, "edge-1.lab"),
         h(ODD, "edge-1.lab", 7.5)]
    b = [h(LAYER, "node_2"), h(SVC, "node_2", size=0, digest="")]
    reg.publish("edge-1.lab", "10.0.0.1:7000", a)
    reg.publish("node_2", "10.0.0.2:7000", b)

    found = reg.lookup([LAYER, RO, RW, APP, SVC, ODD])
    assert set(found) == {LAYER, RO, RW, APP, SVC, ODD}
    assert set(found[LAYER]) == {a[0], b[0]}
    assert found[RO] == [a[1]]
    assert found[RW] == [a[2]]  # float timestamp survives exactly
    assert found[APP] == [a[3]]
    assert set(found[SVC]) == {a[4], b[1]}
    assert found[ODD] == [a[5]]
    assert reg.address("edge-1.lab") == "10.0.0.1:7000"
    assert reg.address("node_2") == "10.0.0.2:7000"


def test_key_layout(reg: RedisRegistry, raw: redis.Redis) -> None:
    """Other tools read this layout, so it is part of the contract."""
    reg.publish("n1", "10.0.0.1:7000", [h(LAYER, "n1", size=5, digest="sha256:x"),
                                        h(RW, "n1", 1718000000.5, size=9, digest="sha256:y")])
    assert raw.zrange(f"migctl:holders:{LAYER}", 0, -1, withscores=True) == [("n1|0", 0.0)]
    assert raw.hgetall(f"migctl:holding:{LAYER}:n1|0") == {"size": "5", "digest": "sha256:x"}
    assert raw.zrange(f"migctl:holders:{RW}", 0, -1, withscores=True) == [
        ("n1|1718000000.5", 1718000000.5)]
    assert raw.hgetall(f"migctl:holding:{RW}:n1|1718000000.5") == {"size": "9",
                                                                   "digest": "sha256:y"}
    assert raw.hgetall("migctl:nodes") == {"n1": "10.0.0.1:7000"}
    assert sorted(raw.keys("*")) == sorted([
        f"migctl:holders:{LAYER}", f"migctl:holding:{LAYER}:n1|0",
        f"migctl:holders:{RW}", f"migctl:holding:{RW}:n1|1718000000.5", "migctl:nodes"])


def test_newest_first_across_nodes_and_snapshots(reg: RedisRegistry) -> None:
    reg.publish("a", "a:1", [h(RW, "a", 100), h(RW, "a", 300.25)])
    reg.publish("b", "b:1", [h(RW, "b", 200), h(RW, "b", 50)])
    reg.publish("c", "c:1", [h(RW, "c", 250)])
    got = [(x.node, x.timestamp) for x in reg.lookup([RW])[RW]]
    assert got == [("a", 300.25), ("c", 250), ("b", 200), ("a", 100), ("b", 50)]


def test_republish_updates_without_duplicating(reg: RedisRegistry) -> None:
    reg.publish("a", "a:1", [h(RW, "a", 10, size=1, digest="old")])
    reg.publish("a", "a:2", [h(RW, "a", 10, size=2, digest="new")])
    assert reg.lookup([RW])[RW] == [h(RW, "a", 10, size=2, digest="new")]
    assert reg.address("a") == "a:2"  # publish refreshes the address


def test_withdraw_removes_exactly_the_given_copies(reg: RedisRegistry, raw: redis.Redis) -> None:
    reg.publish("a", "a:1", [h(RW, "a", 100), h(RW, "a", 200), h(LAYER, "a")])
    reg.publish("b", "b:1", [h(RW, "b", 200), h(RW, "b", 150), h(LAYER, "b")])

    reg.withdraw("a", [h(RW, "a", 200), h(LAYER, "a")])
    found = reg.lookup([RW, LAYER])
    assert [(x.node, x.timestamp) for x in found[RW]] == [("b", 200), ("b", 150), ("a", 100)]
    assert found[LAYER] == [h(LAYER, "b")]
    assert not raw.exists(f"migctl:holding:{RW}:a|200", f"migctl:holding:{LAYER}:a|0")
    assert reg.address("a") == "a:1"

    reg.withdraw("a", [h(RW, "a", 999)])  # never held: nothing happens
    reg.withdraw("a", [])
    reg.withdraw("a", [h(RW, "a", 100)])
    reg.withdraw("b", [h(RW, "b", 200), h(RW, "b", 150), h(LAYER, "b")])
    assert reg.lookup([RW, LAYER]) == {RW: [], LAYER: []}
    assert raw.keys("*") == ["migctl:nodes"]  # no leftover sets or hashes


def test_unknown_keys_and_nodes(reg: RedisRegistry) -> None:
    reg.publish("a", "a:1", [h(LAYER, "a")])
    assert reg.lookup([]) == {}
    assert reg.lookup(["layer:sha256:none", "rw:none", LAYER, "rw:none"]) == {
        "layer:sha256:none": [], "rw:none": [], LAYER: [h(LAYER, "a")]}
    with pytest.raises(KeyError):
        reg.address("nobody")


def test_member_without_its_hash_is_skipped(reg: RedisRegistry, raw: redis.Redis) -> None:
    """A copy without size and digest cannot be verified, so it is not offered."""
    reg.publish("a", "a:1", [h(RW, "a", 1), h(RW, "a", 2)])
    raw.delete(f"migctl:holding:{RW}:a|2")
    assert reg.lookup([RW])[RW] == [h(RW, "a", 1)]


def test_bad_calls_write_nothing(reg: RedisRegistry, raw: redis.Redis) -> None:
    with pytest.raises(ValueError):
        reg.publish("a", "a:1", [h(LAYER, "a"), h(RO, "b")])
    with pytest.raises(ValueError):
        reg.publish("bad|name", "x:1", [])
    with pytest.raises(ValueError):
        reg.publish("a", "a:1", [h(RW, "a", float("nan"))])
    assert raw.keys("*") == []


def test_lookup_script_survives_script_flush(reg: RedisRegistry, raw: redis.Redis) -> None:
    """After a Redis restart the cached Lua script is gone; lookup must reload it."""
    reg.publish("a", "a:1", [h(LAYER, "a")])
    assert reg.lookup([LAYER])[LAYER] == [h(LAYER, "a")]
    raw.script_flush()
    assert reg.lookup([LAYER])[LAYER] == [h(LAYER, "a")]


def test_open_registry_gives_redis_backend(port: int, raw: redis.Redis) -> None:
    reg = open_registry(f"redis://127.0.0.1:{port}/{DB}", Path("/nonexistent/inventory.json"),
                        "me", grpc.insecure_channel)
    assert isinstance(reg, RedisRegistry)
    reg.publish("me", "me:1", [h(APP, "me")])
    assert reg.lookup([APP]) == {APP: [h(APP, "me")]}
    reg.close()


def assert_degrades(reg: RedisRegistry, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="migctl.agent.catalog.redis_registry"):
        assert reg.lookup([LAYER, RW]) == {LAYER: [], RW: []}
        reg.publish("a", "a:1", [h(LAYER, "a")])
        reg.withdraw("a", [h(LAYER, "a")])
        with pytest.raises(KeyError):
            reg.address("a")
    assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 4


def test_redis_never_there(caplog: pytest.LogCaptureFixture) -> None:
    reg = RedisRegistry(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    assert_degrades(reg, caplog)


def test_redis_goes_away(caplog: pytest.LogCaptureFixture) -> None:
    """The pooled connection of a registry that worked breaks when its server stops."""
    with redis_server() as p:
        reg = RedisRegistry(f"redis://127.0.0.1:{p}/0")
        reg.publish("a", "a:1", [h(LAYER, "a")])
        assert reg.lookup([LAYER])[LAYER] == [h(LAYER, "a")]
    assert_degrades(reg, caplog)
    reg.close()


def _inventory(tmp_path: Path, nodes: dict) -> Path:
    import json

    path = tmp_path / "inventory.json"
    path.write_text(json.dumps({"nodes": nodes}))
    return path


@pytest.mark.parametrize(("listen", "nodes", "published"), [
    # an agent listening on every address publishes where its inventory says peers reach it
    ("0.0.0.0:50051", {"nodeA": {"address": "10.1.1.11:50051", "peer_address": "nodeA:50051"}},
     "nodeA:50051"),
    ("0.0.0.0:50051", {"nodeA": {"address": "10.1.1.11:50051"}}, "10.1.1.11:50051"),
    ("10.1.1.11:50051", {}, "10.1.1.11:50051"),
    # nowhere a peer could dial: nothing is published
    ("0.0.0.0:50051", {"nodeB": {"address": "10.1.1.12:50051"}}, ""),
    ("[::]:50051", {}, ""),
])
def test_an_agent_publishes_an_address_its_peers_can_dial(tmp_path: Path, listen: str,
                                                          nodes: dict, published: str) -> None:
    from migctl.agent.catalog.registry import InventoryRegistry
    from migctl.agent.service import advertised_address

    inventory = InventoryRegistry(_inventory(tmp_path, nodes), "nodeA", connect=None)  # type: ignore[arg-type]
    assert advertised_address(listen, inventory, "nodeA") == published


def test_nodes_announce_themselves_and_one_that_stops_drops_out(
        reg: RedisRegistry, raw: redis.Redis, port: int, tmp_path: Path) -> None:
    """The inventory the CLI reads from the registry: each announced node, until its card
    expires (the agent announces every ANNOUNCE_S, for NODE_TTL_S)."""
    import json

    from migctl.client import api

    reg.announce("nodeA", {"address": "10.0.0.11:50051", "version": "0.1.0"}, ttl=60)
    reg.announce("nodeB", {"address": "10.0.0.12:50051", "version": "0.1.0"}, ttl=1)
    raw.set("migctl:node:junk", "not json")  # a shared database: not a node
    for name in ("migctl", "", "evil\x1b[2J"):  # every node's certificate carries "migctl";
        raw.set(f"migctl:node:{name}", '{"address": "10.0.0.66:50051"}')  # "" pins none
    inventory = tmp_path / "inventory.json"
    inventory.write_text(json.dumps({"registry": f"redis://127.0.0.1:{port}/{DB}",
                                     "tls_dir": "tls"}))
    nodes = api.Inventory.load(inventory).nodes
    assert {n: v.address for n, v in nodes.items()} == {"nodeA": "10.0.0.11:50051",
                                                        "nodeB": "10.0.0.12:50051"}
    time.sleep(2.1)  # nodeB stopped announcing: its card expired
    assert list(api.Inventory.load(inventory).nodes) == ["nodeA"]


def test_an_agent_announces_its_address_version_and_room(port: int, tmp_path: Path) -> None:
    from migctl.agent import certs
    from migctl.agent.service import NODE_TTL_S, AgentService
    from migctl.common.tls import TLSFiles
    from tests.inprocess import FakeRuntime

    certs.init(tmp_path / "pki", ["nodeA"])
    tls = TLSFiles.from_dir(certs.node_dir(tmp_path / "pki", "nodeA"), "nodeA")
    url = f"redis://127.0.0.1:{port}/{DB}"
    service = AgentService("nodeA", FakeRuntime(), tmp_path / "state", tls,  # type: ignore[arg-type]
                           registry=url, inventory=tmp_path / "none.json")
    service.address = "10.0.0.11:50051"
    service.announce()
    card = RedisRegistry(url).cards()["nodeA"]
    assert card["address"] == "10.0.0.11:50051" and card["protocol_version"] > 0
    assert card["checkpoints_enabled"] is True and card["engine_free_bytes"] > 0
    ttl = redis.Redis(port=port, db=DB).ttl("migctl:node:nodeA")
    assert 0 < ttl <= NODE_TTL_S
