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
