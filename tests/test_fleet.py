"""Placement of an evacuation (client/fleet.py), on plans as the destinations' agents give them:
the largest first, each where it would be done soonest counting what that node already took,
within its memory and disk; what no destination can take stays, with every reason."""

from __future__ import annotations

from migctl.client import fleet
from migctl.proto import migctl_pb2 as pb

MiB = 1 << 20


def reply(seconds: float, memory: int = 10 * MiB, disk: int = 0,
          problems: tuple[str, ...] = ()) -> pb.PlanReply:
    return pb.PlanReply(items=[pb.PlanItem(kind="checkpoint", item="memory", bytes=memory),
                               pb.PlanItem(kind="volume snapshot", item="v", bytes=disk)],
                        bytes=memory + disk, seconds=seconds, problems=list(problems))


def rooms(**load: float) -> dict[str, fleet._Room]:
    return {n: fleet._Room(n, memory=1 << 40, disk=1 << 40, load=v) for n, v in load.items()}


def test_the_work_is_spread_by_when_each_destination_would_be_done() -> None:
    r = rooms(nodeB=0.0, nodeC=0.0)
    moves = [fleet.Move(n) for n in ("big", "mid", "small")]
    plans = {"big": {"nodeB": reply(10), "nodeC": reply(10)},
             "mid": {"nodeB": reply(6), "nodeC": reply(6)},
             "small": {"nodeB": reply(5), "nodeC": reply(5)}}
    for m in moves:  # plan() sorts the largest first; here they come in that order
        fleet._place(m, plans[m.container], r)
    assert [(m.container, m.destination) for m in moves] == [
        ("big", "nodeB"), ("mid", "nodeC"), ("small", "nodeC")]
    assert fleet.default_parallel(moves) == 2 * fleet.PARALLEL_PER_DESTINATION


def test_a_loaded_destination_counts_its_plans_longer() -> None:
    r = rooms(nodeB=1.0, nodeC=0.0)
    m = fleet.Move("app")
    fleet._place(m, {"nodeB": reply(4), "nodeC": reply(6)}, r)
    assert m.destination == "nodeC"  # 4 s at load 1.0 counts as 8


def test_memory_and_disk_are_booked_and_a_full_destination_is_skipped() -> None:
    r = rooms(nodeB=0.0, nodeC=0.0)
    r["nodeB"].memory = 150 * MiB
    first, second = fleet.Move("a"), fleet.Move("b")
    fleet._place(first, {"nodeB": reply(1, memory=100 * MiB), "nodeC": reply(9)}, r)
    assert first.destination == "nodeB" and r["nodeB"].memory == 50 * MiB
    fleet._place(second, {"nodeB": reply(1, memory=100 * MiB), "nodeC": reply(9)}, r)
    assert second.destination == "nodeC"
    r["nodeC"].disk = 10 * MiB
    third = fleet.Move("c")
    fleet._place(third, {"nodeB": reply(1, memory=100 * MiB),
                         "nodeC": reply(1, disk=20 * MiB)}, r)
    assert third.state == "stays" and third.destination == ""
    assert "nodeB: 100 MiB of memory, 50 MiB left" in third.reason
    assert "nodeC: 20 MiB of disk, 10 MiB left" in third.reason


def test_a_container_every_destination_refuses_stays_with_each_reason() -> None:
    m = fleet.Move("web")
    fleet._place(m, {"nodeB": reply(1, problems=("host port 8080/tcp is taken",)),
                     "nodeC": reply(1, problems=("no CRIU",))}, rooms(nodeB=0, nodeC=0))
    assert m.state == "stays"
    assert "nodeB: host port 8080/tcp is taken" in m.reason and "nodeC: no CRIU" in m.reason


def test_nothing_planned_still_runs_one_at_a_time() -> None:
    assert fleet.default_parallel([fleet.Move("x", state="stays")]) == 1


def test_each_destination_takes_its_share_of_the_parallel_moves(monkeypatch) -> None:
    """--parallel 2 over two destinations: never two at once to one of them, though three of
    the four go to nodeB (one queue for all sent two there while nodeC idled)."""
    import threading
    import time

    lock, now, most = threading.Lock(), {"nodeB": 0, "nodeC": 0}, {"nodeB": 0, "nodeC": 0}

    def migrate(inventory, container, source, destination, **kwargs):
        with lock:
            now[destination] += 1
            most[destination] = max(most[destination], now[destination])
        time.sleep(0.1)
        with lock:
            now[destination] -= 1
        return pb.MigrationReport(downtime_seconds=0.1)

    monkeypatch.setattr(fleet, "migrate", migrate)
    moves = [fleet.Move(n, destination=d) for n, d in
             (("a", "nodeB"), ("b", "nodeB"), ("c", "nodeB"), ("d", "nodeC"))]
    fleet.run(None, "nodeA", moves, parallel=2)  # type: ignore[arg-type]
    assert all(m.moved for m in moves)
    assert most == {"nodeB": 1, "nodeC": 1}


def test_an_earlier_runs_migration_is_followed_whatever_its_containers_state(
        monkeypatch) -> None:
    """A re-run during the earlier run's freeze: the container no longer runs here (its final
    checkpoint stopped it), and is still followed to its end, not forgotten."""
    from migctl.client import api

    inv = api.Inventory({"nodeA": api.Node("nodeA", "a:1"), "nodeB": api.Node("nodeB", "b:1")})
    monkeypatch.setattr(api.Inventory, "tls", lambda self: None)
    monkeypatch.setattr(fleet, "each_node", lambda inv, ask: (
        {n: pb.NodeInfo(memory_available_bytes=1 << 40, engine_free_bytes=1 << 40,
                        checkpoints_enabled=True) for n in inv.nodes}, []))

    class Source:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def __enter__(self) -> Source:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        info = None  # each_node is replaced above

        def containers(self) -> list[pb.ContainerSummary]:
            return [pb.ContainerSummary(name="web", state="exited")]

        def history(self, limit: int) -> list[pb.HistoryEntry]:
            return [pb.HistoryEntry(migration_id="0123456789abcdef", role="source",
                                    container="web", peer="nodeB", state="frozen")]

    monkeypatch.setattr(fleet, "AgentClient", Source)
    moves = fleet.plan(inv, "nodeA")
    assert [(m.container, m.state, m.destination) for m in moves] == [
        ("web", "under way", "nodeB")]


def test_a_destination_that_stops_answering_is_asked_once(monkeypatch) -> None:
    """Its first plan times out: the other containers are not each given another minute."""
    from migctl.client import api
    from migctl.common.errors import Unavailable

    asked: list[str] = []

    class Dest:
        def __init__(self, node: api.Node, *args: object, **kwargs: object) -> None:
            self.node = node

        def __enter__(self) -> Dest:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def plan(self, spec: pb.ContainerSpec, source: api.Node) -> pb.PlanReply:
            asked.append(f"{self.node.name} {spec.name}")
            if self.node.name == "nodeC":
                raise Unavailable("nodeC: cannot reach the agent of nodeC")
            return reply(1)

    inv = api.Inventory({n: api.Node(n, f"{n}:1") for n in ("nodeA", "nodeB", "nodeC")})
    monkeypatch.setattr(api.Inventory, "tls", lambda self: None)
    monkeypatch.setattr(fleet, "AgentClient", Dest)
    specs = {n: pb.ContainerSpec(name=n) for n in ("a", "b", "c")}
    plans = fleet._plans(inv, inv.node("nodeA"), rooms(nodeB=0, nodeC=0), specs)
    assert sorted(a for a in asked if a.startswith("nodeC")) == ["nodeC a"]
    assert all(plans[n]["nodeC"].problems for n in specs)
    assert all(not plans[n]["nodeB"].problems for n in specs)
