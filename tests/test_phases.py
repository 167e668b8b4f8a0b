"""The destination's phases, driven end to end in one process: two real agents (the service,
its role gate and mutual TLS) over fake engines (tests/fake_runtime.py), so that the flow's
pre-copy, freeze, final sync and restore, a failed restore and its undo, and a rollback after
the hold broke are tested without a lab. The lab's tests drive real engines and CRIU."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Protocol

import pytest

from migctl.agent.migration import flow
from migctl.agent.migration.source import HOLD_SILENCE
from migctl.agent.migration.state import DESTINATION, SOURCE, State
from migctl.agent.runtime import netns
from migctl.agent.runtime.base import Network
from migctl.client import api
from migctl.proto import migctl_pb2 as pb
from tests.fake_runtime import FakeNode
from tests.inprocess import agents

MEMORY = {"count": 41, "note": "in memory only"}
DELTA = "delta"  # the fakes have no page server: named, never left to the measured link


@pytest.fixture
def cluster(pki: Path, tmp_path: Path):
    with agents(pki, tmp_path, runtime=lambda name: FakeNode(tmp_path / name / "engine")) as c:
        a: FakeNode = c.runtimes["nodeA"]
        a.run("toy", MEMORY, {"data.txt": b"volume bytes"}, {"written.txt": b"layer bytes"})
        yield c


def _states(cluster, role_node: tuple[str, str]) -> list[State]:
    node, role = role_node
    return [e.state for e in cluster.services[node].journal.history(10) if e.role == role]


def test_every_phase_runs_and_moves_memory_volume_and_layer(cluster) -> None:
    a, b = cluster.runtimes["nodeA"], cluster.runtimes["nodeB"]
    events: list[pb.MigrationEvent] = []
    report = api.migrate(cluster.inventory, "toy", "nodeA", "nodeB", on_event=events.append)
    moved = b.by_name("toy")
    assert moved.running and moved.memory == MEMORY
    assert (b.volume_path("data") / "data.txt").read_bytes() == b"volume bytes"
    assert (moved.upper / "written.txt").read_bytes() == b"layer bytes"
    assert not a.by_name("toy").running  # stopped at its final checkpoint, and released
    assert [p.phase for p in report.phases] == [pb.REQUEST, pb.PRE_COPY, pb.FREEZE,
                                                 pb.FINAL_SYNC, pb.RESTORE]
    assert a.calls == ["checkpoint pre", "checkpoint final"]
    assert b.calls == ["create toy", "restore toy"]
    assert _states(cluster, ("nodeB", DESTINATION)) == [State.DONE]
    assert _states(cluster, ("nodeA", SOURCE)) == [State.DONE]


def test_a_failed_restore_is_undone_here_and_the_source_resumes(cluster) -> None:
    a, b = cluster.runtimes["nodeA"], cluster.runtimes["nodeB"]
    b.fail_restore = "criu failed: type RESTORE errno 0"
    with pytest.raises(api.RuntimeFailure, match="criu failed"):
        api.migrate(cluster.inventory, "toy", "nodeA", "nodeB")
    # the undo: the created container and the volume made for it are gone here...
    assert b.gone("toy") and not b.volume_exists("data")
    assert b.calls == ["create toy", "restore toy", "remove toy", "remove volume data"]
    # ...and the source runs its copy again, from its final checkpoint: one copy, its memory
    back = a.by_name("toy")
    assert back.running and back.memory == MEMORY
    assert _states(cluster, ("nodeB", DESTINATION)) == [State.ROLLED_BACK]
    assert _states(cluster, ("nodeA", SOURCE)) == [State.ROLLED_BACK]


def test_a_hold_that_breaks_before_the_commit_rolls_back(cluster, monkeypatch) -> None:
    """The destination's beats stop after the first (HOLD_BEAT), and its engine stalls before
    the commit: the source, silent-held for longer than HOLD_SILENCE, resumes its copy; the
    commit is then refused (the migration ended there) and the destination removes its own."""
    a, b = cluster.runtimes["nodeA"], cluster.runtimes["nodeB"]
    monkeypatch.setattr(flow, "HOLD_BEAT", 60.0)
    b.stall_ping = HOLD_SILENCE + 3.0  # the source's own rule, with room for a slow machine
    with pytest.raises(api.FailedPrecondition, match=r"has ended \(rolled-back\)"):
        api.migrate(cluster.inventory, "toy", "nodeA", "nodeB")
    assert b.gone("toy") and "restore toy" not in b.calls
    assert a.by_name("toy").running and a.by_name("toy").memory == MEMORY
    assert _states(cluster, ("nodeB", DESTINATION)) == [State.ROLLED_BACK]
    assert _states(cluster, ("nodeA", SOURCE)) == [State.ROLLED_BACK]


def test_a_migration_is_journaled_only_when_opened(pki: Path, tmp_path: Path) -> None:
    """Constructing the context does nothing (a unit test may build one); `open` journals."""
    from migctl.agent import certs
    from migctl.agent.catalog.store import Store
    from migctl.agent.dataplane.staging import Staging
    from migctl.agent.migration import journal as j
    from migctl.agent.migration.policy import Links
    from migctl.common.tls import TLSFiles

    journal = j.Journal(tmp_path)
    m = flow.Migration("nodeB", FakeNode(tmp_path / "e"), Staging(tmp_path),  # type: ignore[arg-type]
                       pb.MigrateRequest(migration_id="0123456789abcdef", container="toy",
                                         source_node="nodeA"),
                       "127.0.0.1:1", lambda e: None, lambda c: False, journal, pb.NodeInfo,
                       TLSFiles.from_dir(certs.node_dir(pki, "nodeB"), "nodeB"),
                       Store(tmp_path / "s"), None, Links(lambda *a: None), lambda k: None)  # type: ignore[arg-type]
    assert journal.history(5) == [] and m.migration_id == "0123456789abcdef"
    m.open()
    assert [e.state for e in journal.history(5)] == [State.REQUESTED]
    m.source.close()


def test_the_fake_engine_implements_the_whole_runtime() -> None:
    """A method added to the runtime's protocol must be added to the fake the phases run on
    (with the same parameters), or these tests would stop testing what the agent calls."""
    import inspect

    from migctl.agent.runtime import base

    concerns = [c for c in base.Runtime.__bases__ if c is not Protocol]
    assert base.Networks in concerns  # every concern the runtime is made of
    for concern in concerns:
        for name, member in vars(concern).items():
            if name.startswith("_") or not callable(member):
                continue
            fake = getattr(FakeNode, name, None)
            assert fake is not None, f"FakeNode lacks {concern.__name__}.{name}"
            assert list(inspect.signature(fake).parameters) == \
                list(inspect.signature(member).parameters), name


LAN = Network("lan", "macvlan", ("10.9.0.0/24",), ("10.9.0.128/25",), ("10.9.0.1",),
              ("10.9.0.200",))
ADDRESS, MAC = "10.9.0.130", "02:42:0a:09:00:82"


def _on_lan(cluster, ipv4: str = ADDRESS, mac: str = MAC) -> None:
    """Both nodes have the segment's network `lan`; the toy has ADDRESS on it (the source's
    description says so: a hostile source may say anything)."""
    for node in ("nodeA", "nodeB"):
        cluster.runtimes[node].networks["lan"] = LAN
    spec = cluster.runtimes["nodeA"].by_name("toy").spec
    spec.networks[:] = ["lan"]
    spec.engine_config_json = json.dumps({"Config": {}, "HostConfig": {"NetworkMode": "lan"}})
    spec.endpoints.add(network="lan", driver="macvlan", subnet="10.9.0.0/24", ipv4=ipv4,
                       mac=mac)


def test_a_container_keeps_its_address_on_a_network_whose_addresses_move(cluster) -> None:
    _on_lan(cluster)  # the engine's checkpoints: the address moves, its connections close
    api.migrate(cluster.inventory, "toy", "nodeA", "nodeB", connections="close")
    moved = cluster.runtimes["nodeB"].by_name("toy")
    assert moved.running and list(moved.spec.networks) == ["lan"]
    assert [(e.network, e.ipv4, e.mac) for e in moved.spec.endpoints] == [("lan", ADDRESS, MAC)]


@pytest.mark.parametrize("change, said", [
    (lambda b: b.networks.pop("lan"), "nodeB has no network of that name; create it as the "
     "source's, on the same segment (docker network create -d macvlan --subnet 10.9.0.0/24"),
    (lambda b: b.networks.update(lan=Network("lan", "bridge", ("10.9.0.0/24",))),
     "is a bridge network on nodeB"),
    (lambda b: b.networks.update(lan=Network("lan", "macvlan", ("10.7.0.0/24",))),
     "is macvlan 10.7.0.0/24 on nodeB, macvlan 10.9.0.0/24 at the source"),
    (lambda b: b.run("other", {}, {}, {}).spec.endpoints.add(network="lan", ipv4=ADDRESS),
     f"{ADDRESS} is already used by a container on nodeB"),
])
def test_an_address_the_destination_cannot_give_is_refused_before_anything_moves(
        cluster, change, said) -> None:
    _on_lan(cluster)
    b = cluster.runtimes["nodeB"]
    change(b)
    b.calls.clear()
    with pytest.raises(api.FailedPrecondition, match="cannot keep its addresses on nodeB") as err:
        api.migrate(cluster.inventory, "toy", "nodeA", "nodeB")
    assert said in str(err.value)
    assert b.calls == [] and cluster.runtimes["nodeA"].by_name("toy").running
    assert cluster.runtimes["nodeA"].calls == []  # not even a pre-copy checkpoint


@pytest.mark.parametrize("ipv4, mac, said", [
    ("10.9.0.1", MAC, "is the segment's gateway or an address nodeB's engine keeps reserved"),
    ("10.9.0.200", MAC, "is the segment's gateway or an address nodeB's engine keeps reserved"),
    ("10.9.0.12", MAC, "outside the range nodeB gives containers (10.9.0.128/25)"),  # a node's
    ("10.8.0.130", MAC, "10.8.0.130 is outside its subnet on nodeB"),
    ("10.9.0.300", MAC, "'10.9.0.300' is not an IPv4 address"),
    (ADDRESS, "03:42:0a:09:00:82", "is not a unicast MAC address"),
    (ADDRESS, "02:42:0a:09:00:82; rm", "is not a unicast MAC address"),
])
def test_a_hostile_source_cannot_take_an_address_of_the_segment(cluster, ipv4, mac,
                                                                 said) -> None:
    """The source describes its container with an address of the segment's gateway, of another
    node, or of nothing it may have: refused, whatever the source says of its own network."""
    _on_lan(cluster, ipv4, mac)
    b = cluster.runtimes["nodeB"]
    with pytest.raises(api.FailedPrecondition, match="cannot keep its addresses on nodeB") as err:
        api.migrate(cluster.inventory, "toy", "nodeA", "nodeB")
    assert said in str(err.value)
    assert b.calls == [] and cluster.runtimes["nodeA"].by_name("toy").running


def _move(cluster, **options) -> pb.MigrationReport:
    return api.migrate(cluster.inventory, "toy", "nodeA", "nodeB", memory_transfer=DELTA,
                       **options)


def test_connections_are_kept_when_the_address_moves_and_both_nodes_can(cluster) -> None:
    a, b = cluster.runtimes["nodeA"], cluster.runtimes["nodeB"]
    _on_lan(cluster)
    a.method = b.method = "direct"
    report = _move(cluster)
    assert report.connections == "kept"
    # cut off before its final checkpoint: its network namespace outlives it a moment
    assert a.calls == ["checkpoint pre", "isolate toy", "checkpoint final keeping connections"]
    assert b.calls == ["create toy", "restore toy keeping connections"]


def test_a_container_on_a_bridge_closes_them_as_before(cluster) -> None:
    a, b = cluster.runtimes["nodeA"], cluster.runtimes["nodeB"]
    a.method = b.method = "direct"  # the nodes could; its address cannot move (a bridge)
    events: list[pb.MigrationEvent] = []
    report = _move(cluster, on_event=events.append)
    assert report.connections == "closed"
    assert "connections: closed (its addresses are its node's own: bridge networks)" \
        in "\n".join(e.log for e in events)
    assert a.calls == ["checkpoint pre", "checkpoint final"]
    assert b.calls == ["create toy", "restore toy"]


def test_connections_close_when_asked_even_where_they_could_be_kept(cluster) -> None:
    a, b = cluster.runtimes["nodeA"], cluster.runtimes["nodeB"]
    _on_lan(cluster)
    a.method = b.method = "direct"
    report = _move(cluster, connections="close")
    assert report.connections == "closed"
    # its address moves all the same: the source's copy is cut off before its checkpoint
    assert a.calls == ["checkpoint pre", "isolate toy", "checkpoint final"]
    assert b.calls[-1] == "restore toy"
    assert b.by_name("toy").spec.endpoints[0].ipv4 == ADDRESS


@pytest.mark.parametrize("asked", ["keep", ""])  # "": a container whose address moves
@pytest.mark.parametrize("setup, said", [
    (lambda a, b: None, "it is on network 'bridge', whose addresses are nodeA's own"),
    (lambda a, b: setattr(b, "no_kept_connections", "the kernel refuses TCP repair mode"),
     "nodeB: the kernel refuses TCP repair mode"),
    (lambda a, b: setattr(a, "no_kept_connections", "/etc/criu/runc.conf has tcp-close"),
     "nodeA: /etc/criu/runc.conf has tcp-close"),
])
def test_keeping_what_cannot_be_kept_is_refused_before_anything_moves(cluster, setup,
                                                                      said, asked) -> None:
    """Never a silent fall back to closing them: only `--connections close` closes them."""
    a, b = cluster.runtimes["nodeA"], cluster.runtimes["nodeB"]
    _on_lan(cluster)
    if "bridge" in said:  # on the segment and on a bridge: the bridge's address stays
        spec = a.by_name("toy").spec
        spec.networks[:] = ["lan", "bridge"]
    a.method = b.method = "direct"
    setup(a, b)
    with pytest.raises(api.FailedPrecondition, match="cannot be kept") as err:
        _move(cluster, connections=asked)
    assert said in str(err.value) and "with connections 'close' it moves" in str(err.value)
    assert a.calls == [] and b.calls == [] and a.by_name("toy").running


def test_a_source_that_checkpoints_through_its_engine_refuses_before_the_freeze(
        cluster) -> None:
    """Known only from the pre-copy checkpoint: plain runc at the source (the machine's CRIU
    options); keeping is refused before the freeze, and the source was never stopped."""
    a, b = cluster.runtimes["nodeA"], cluster.runtimes["nodeB"]
    _on_lan(cluster)
    b.method = "direct"  # nodeA: "engine"
    with pytest.raises(api.FailedPrecondition, match="nodeA checkpoints it through its engine"):
        _move(cluster)
    assert a.calls == ["checkpoint pre"] and a.by_name("toy").running and b.gone("toy")
    report = _move(cluster, connections="close")
    assert report.connections == "closed" and a.calls[-1] == "checkpoint final"


def test_a_rollback_after_the_freeze_restores_the_source_with_its_connections(cluster) -> None:
    a, b = cluster.runtimes["nodeA"], cluster.runtimes["nodeB"]
    _on_lan(cluster)
    a.method = b.method = "direct"
    b.fail_restore = "criu failed: type RESTORE errno 0"
    with pytest.raises(api.RuntimeFailure, match="criu failed"):
        _move(cluster)
    # stopped by its checkpoint: restored into a new network namespace, with its connections
    assert a.calls == ["checkpoint pre", "isolate toy", "checkpoint final keeping connections",
                       "restore toy keeping connections"]
    assert a.by_name("toy").running and b.gone("toy")


def test_an_address_another_host_answers_for_after_the_freeze_is_not_taken(
        cluster, monkeypatch) -> None:
    """A source may describe its container with a neighbour's address: once the source's copy
    is stopped, the segment is probed, and an answer rolls the migration back."""
    a, b = cluster.runtimes["nodeA"], cluster.runtimes["nodeB"]
    _on_lan(cluster)
    b.networks["lan"] = dataclasses.replace(LAN, parent="eth0")
    asked: list[tuple[str, str]] = []

    def answers(interface: str, address: str, timeout: float) -> str:
        asked.append((interface, address))
        return "02:00:00:00:00:99"

    monkeypatch.setattr(netns, "probe", answers)
    with pytest.raises(api.FailedPrecondition, match="another host on the segment holds an "
                       f"address the container would take here: {ADDRESS} answers from "
                       "02:00:00:00:00:99 on eth0"):
        _move(cluster, connections="close")
    assert asked == [("eth0", ADDRESS)]
    assert "restore toy" not in b.calls and b.gone("toy")
    assert a.by_name("toy").running  # rolled back
    assert _states(cluster, ("nodeB", DESTINATION)) == [State.ROLLED_BACK]


def _cancel_at(cluster, node: str, call: str) -> dict:
    """Cancel the migration under way when NODE's engine is asked for CALL (as an operator
    would, through the API: its destination is found from the journals)."""
    said: dict = {}

    def hook(seen: str) -> None:
        if seen != call or said:
            return
        [entry] = cluster.services["nodeB"].journal.in_flight(DESTINATION)
        try:
            said["node"], said["reply"] = api.cancel(cluster.inventory, entry.id)
        except api.MigctlError as err:
            said["error"] = err

    cluster.runtimes[node].hook = hook
    return said


def test_a_cancel_before_the_freeze_aborts_with_nothing_left_at_the_destination(
        cluster) -> None:
    a, b = cluster.runtimes["nodeA"], cluster.runtimes["nodeB"]
    said = _cancel_at(cluster, "nodeA", "checkpoint pre")
    with pytest.raises(api.Cancelled, match="cancelled by the operator"):
        _move(cluster)
    assert said["node"] == "nodeB" and said["reply"].outcome == "aborted"
    assert b.gone("toy") and not b.volume_exists("data")
    assert a.calls == ["checkpoint pre"]  # never frozen
    assert a.by_name("toy").running and a.by_name("toy").memory == MEMORY
    assert _states(cluster, ("nodeB", DESTINATION)) == [State.FAILED]


def test_a_cancel_after_the_freeze_rolls_back_and_the_source_resumes(cluster) -> None:
    a, b = cluster.runtimes["nodeA"], cluster.runtimes["nodeB"]
    said = _cancel_at(cluster, "nodeA", "checkpoint final")
    with pytest.raises(api.Cancelled):
        _move(cluster)
    assert said["reply"].outcome == "rolling back"
    assert b.gone("toy") and "restore toy" not in b.calls
    back = a.by_name("toy")
    assert back.running and back.memory == MEMORY  # one copy, its memory
    assert _states(cluster, ("nodeB", DESTINATION)) == [State.ROLLED_BACK]
    assert _states(cluster, ("nodeA", SOURCE)) == [State.ROLLED_BACK]


def test_a_cancel_after_the_commit_is_refused_and_the_migration_completes(cluster) -> None:
    said = _cancel_at(cluster, "nodeB", "restore toy")
    report = _move(cluster)
    assert isinstance(said["error"], api.FailedPrecondition)
    assert "has committed" in str(said["error"])
    assert report.downtime_seconds > 0 and cluster.runtimes["nodeB"].by_name("toy").running
    assert _states(cluster, ("nodeB", DESTINATION)) == [State.DONE]


def test_a_cancel_of_what_is_not_running_here_is_named(cluster) -> None:
    report = _move(cluster)
    with pytest.raises(api.FailedPrecondition, match="has ended \\(done\\)"):
        api.cancel(cluster.inventory, report.migration_id)
    with pytest.raises(api.NotFound, match="no node of the inventory knows"):
        api.cancel(cluster.inventory, "0123456789abcdef")
    with api.AgentClient(cluster.inventory.node("nodeA"), cluster.inventory.tls()) as a, \
            pytest.raises(api.NotFound, match="cancel it at its destination"):
        a.cancel(report.migration_id)  # the source: the flow runs at the destination


def test_a_cancel_during_a_step_answers_for_the_state_after_it() -> None:
    """A cancel that arrives while the flow journals its freeze waits for that step, so that
    it never answers "aborted" (the source untouched) for a source about to be frozen."""
    import threading
    import time

    from migctl.agent.migration import journal as j

    m = object.__new__(flow.Migration)
    m._cancelled, m._commit_lock, m.committing = threading.Event(), threading.Lock(), False
    m.request = pb.MigrateRequest(migration_id="0123456789abcdef")
    m.entry = j.Entry("0123456789abcdef", DESTINATION, "toy", State.PRE_COPY)
    writing, written = threading.Event(), threading.Event()

    class Journal:
        def move(self, mid: str, role: str, to: State, data: dict | None = None) -> j.Entry:
            writing.set()
            written.wait(5)
            return j.Entry(mid, role, "toy", to)

    m.journal = Journal()  # type: ignore[assignment]
    stepping = threading.Thread(target=m.step, args=(State.FROZEN,))
    stepping.start()
    assert writing.wait(5)
    said: list[str] = []
    cancelling = threading.Thread(target=lambda: said.append(m.cancel()))
    cancelling.start()
    time.sleep(0.2)
    assert said == []  # it waits for the step being journaled
    written.set()
    stepping.join(5)
    cancelling.join(5)
    assert said == ["rolling back"]
    with pytest.raises(flow.Cancelled):
        m.step(State.TRANSFERRING_FINAL)
