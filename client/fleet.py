"""Fleet operations over the agents' API: `migctl evacuate NODE` moves every container that can
move off NODE. Placement asks each candidate destination for its plan of each container (what
it would fetch, from where, over its measured link: the cooperative catalog and the link are
the agent's to know), then assigns the largest first, each to the destination where it would
be done soonest, counting what that destination already took and its room. Each move is one
`api.migrate`: a failed one leaves the container running on NODE, as any migration does.

Running it again after an interruption moves what still runs on NODE: a migration already
under way goes on in its destination's agent, and its source refuses a second one meanwhile.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from migctl.client.api import (
    AgentClient,
    Inventory,
    Node,
    each_node,
    migrate,
    without_secrets,
)
from migctl.common.errors import MigctlError, Unavailable
from migctl.proto import migctl_pb2 as pb

# --parallel's default: this many migrations at once per destination the plan uses (each keeps
# its link busy; the source's disk, CPU and uplink are shared). Measured with
# bench/evacuate.py: docs/benchmarks.md, "Evacuation".
PARALLEL_PER_DESTINATION = 1
HISTORY = 200  # the source's latest migrations, where an earlier run's are found
ENDED = ("done", "rolled-back", "failed")  # a source's migration in these is not going on
WAIT_S = 1800.0  # the longest an earlier run's migration is waited for
LOAD_WEIGHT = 1.0  # a destination at load 1.0 per core counts its plans twice as long
ROOM_MARGIN = 1.25  # a destination keeps this much more memory and disk free than it takes


@dataclass
class Move:
    """One container of the evacuated node: where it goes, or why it stays."""

    container: str
    destination: str = ""  # empty: it stays
    seconds: float = 0.0   # the destination's estimate
    bytes: int = 0
    reason: str = ""       # why it stays, or why it failed
    state: str = "planned"  # planned, stays, under way (an earlier run's), moving, moved, failed
    migration_id: str = ""
    phase: str = ""
    report: pb.MigrationReport | None = None

    @property
    def moved(self) -> bool:
        return self.state == "moved"


@dataclass
class _Room:
    node: str
    memory: int
    disk: int
    load: float
    taken_seconds: float = 0.0


def plan(inventory: Inventory, node: str, to: Iterable[str] = ()) -> list[Move]:
    """Where each container running on NODE would go (TO: only those nodes; default, every
    other node of the inventory that answers and can restore checkpoints)."""
    source = inventory.node(node)
    wanted = [inventory.node(n).name for n in to] or [n for n in inventory.nodes if n != node]
    if source.name in wanted:
        raise MigctlError(f"{node} cannot be a destination of its own evacuation")
    infos, errors = each_node(inventory, AgentClient.info)
    rooms = {n: _Room(n, infos[n].memory_available_bytes, infos[n].engine_free_bytes,
                      infos[n].load)
             for n in wanted if n in infos and infos[n].checkpoints_enabled}
    if not rooms:
        down = ", ".join(f"{e.node}: {e.message}" for e in errors) or "none can restore"
        raise MigctlError(f"no destination for {node}'s containers ({down})")
    tls = inventory.tls()
    with AgentClient(source, tls) as client:
        listed = [c for c in client.containers() if c.state == "running"]
        under_way = {e.container: e for e in client.history(HISTORY)
                     if e.role == "source" and e.state not in ENDED}
        # an earlier run's, going on in its destination's agent: followed, whether the
        # container still runs here, is paused or was stopped by its final checkpoint
        moves = [Move(e.container, destination=e.peer, state="under way",
                      migration_id=e.migration_id,
                      reason=f"being moved by an earlier run ({e.migration_id})")
                 for e in under_way.values()]
        specs = {}
        for c in listed:
            if c.name in under_way:
                continue
            if c.unsupported:
                moves.append(Move(c.name, reason="; ".join(c.unsupported), state="stays"))
                continue
            specs[c.name] = without_secrets(client.describe(c.name))
            moves.append(Move(c.name))
    plans = _plans(inventory, source, rooms, specs)
    todo = sorted((m for m in moves if m.state == "planned"),
                  key=lambda m: -max((p.seconds for p in plans[m.container].values()),
                                     default=0.0))
    for move in todo:
        _place(move, plans[move.container], rooms)
    return moves


def _plans(inventory: Inventory, source: Node, rooms: dict[str, _Room],
           specs: dict[str, pb.ContainerSpec]) -> dict[str, dict[str, pb.PlanReply]]:
    """Each destination's plan of each container, by container then destination (a
    destination that cannot plan one is left out of that container's, with its reason)."""
    out: dict[str, dict[str, pb.PlanReply]] = {name: {} for name in specs}
    failures: dict[str, dict[str, str]] = {name: {} for name in specs}
    tls = inventory.tls()

    def ask(dest: str) -> None:
        with AgentClient(inventory.node(dest), tls, timeout=60) as client:
            silent = ""  # a destination that stopped answering is not asked again
            for name, spec in specs.items():
                if silent:
                    failures[name][dest] = silent
                    continue
                try:
                    out[name][dest] = client.plan(spec, source)
                except Unavailable as err:
                    failures[name][dest] = silent = err.message
                except MigctlError as err:
                    failures[name][dest] = err.message

    with ThreadPoolExecutor(max_workers=len(rooms)) as pool:
        for done in [pool.submit(ask, d) for d in rooms]:
            try:
                done.result()
            except MigctlError as err:  # that destination stopped answering
                for name in specs:
                    failures[name].setdefault(err.node or "?", err.message)
    for name, why in failures.items():
        for dest, message in why.items():
            out[name].setdefault(dest, pb.PlanReply(problems=[message]))
    return out


def _needs(p: pb.PlanReply) -> tuple[int, int]:
    """(memory, disk) a plan takes at its destination: its checkpoint, and the rest."""
    memory = sum(i.bytes for i in p.items if i.kind == "checkpoint")
    return memory, p.bytes - memory


def _place(move: Move, plans: dict[str, pb.PlanReply], rooms: dict[str, _Room]) -> None:
    """The destination where MOVE would be done soonest, counting what it already took; its
    memory and disk are booked there. Otherwise it stays, with every destination's reason."""
    best, score, why = None, 0.0, []
    for dest, p in plans.items():
        room = rooms[dest]
        memory, disk = _needs(p)
        if p.problems:
            why.append(f"{dest}: {'; '.join(p.problems)}")
        elif memory * ROOM_MARGIN > room.memory:
            why.append(f"{dest}: {memory >> 20} MiB of memory, {room.memory >> 20} MiB left")
        elif disk * ROOM_MARGIN > room.disk:
            why.append(f"{dest}: {disk >> 20} MiB of disk, {room.disk >> 20} MiB left")
        else:
            s = room.taken_seconds + p.seconds * (1 + LOAD_WEIGHT * room.load)
            if best is None or s < score:
                best, score = dest, s
    if best is None:
        move.state, move.reason = "stays", "no destination can take it: " + " | ".join(why)
        return
    p, room = plans[best], rooms[best]
    memory, disk = _needs(p)
    room.memory -= memory
    room.disk -= disk
    room.taken_seconds = score
    move.destination, move.seconds, move.bytes = best, p.seconds, p.bytes
    move.reason = f"done soonest there (plan {p.seconds:.1f} s, {p.bytes >> 20} MiB)"


def run(inventory: Inventory, node: str, moves: list[Move], parallel: int,
        on_change: Callable[[Move], None] = lambda m: None, memory_transfer: str = "",
        connections: str = "") -> list[Move]:
    """Carry out the planned MOVES, PARALLEL at once, and follow an earlier run's; ON_CHANGE
    sees each state and phase. Interrupted (KeyboardInterrupt), it starts no more: the
    migrations under way go on in their destinations' agents, for the next run to follow."""
    if parallel < 1:
        raise MigctlError(f"--parallel {parallel}: at least 1")
    lock, stop = threading.Lock(), threading.Event()

    def one(move: Move) -> None:
        def event(e: pb.MigrationEvent) -> None:
            if e.HasField("phase_started"):
                with lock:
                    move.phase = pb.Phase.Name(e.phase_started.phase).lower().replace("_", "-")
                on_change(move)

        with lock:
            move.state, move.reason = "moving", ""
        on_change(move)
        try:
            move.report = migrate(inventory, move.container, node, move.destination,
                                  on_event=event, memory_transfer=memory_transfer,
                                  connections=connections)
            move.state, move.phase = "moved", ""
        except MigctlError as err:
            move.state, move.reason = "failed", str(err)
        on_change(move)

    # each destination takes at most its share of PARALLEL at once: one queue for all would
    # send two to one destination while another idles
    destinations = sorted({m.destination for m in moves if m.state == "planned"})
    share = max(1, -(-parallel // max(1, len(destinations))))  # ceil
    pending = [m for m in moves if m.state == "planned"]
    busy = dict.fromkeys(destinations, 0)
    turn = threading.Condition()

    def take() -> Move | None:
        with turn:
            while pending and not stop.is_set():
                move = next((m for m in pending if busy[m.destination] < share), None)
                if move is not None:
                    pending.remove(move)
                    busy[move.destination] += 1
                    return move
                turn.wait(0.5)
            return None

    def worker() -> None:
        while (move := take()) is not None:
            try:
                one(move)
            finally:
                with turn:
                    busy[move.destination] -= 1
                    turn.notify_all()

    earlier = [m for m in moves if m.state == "under way"]
    # daemon threads: an interrupted run ends now, not after the migrations under way
    threads = [threading.Thread(target=worker, daemon=True, name=f"move-{i}")
               for i in range(parallel)]
    threads.append(threading.Thread(target=_wait_earlier, daemon=True, name="earlier",
                                    args=(inventory, node, earlier, on_change, one, stop)))
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    except KeyboardInterrupt:
        stop.set()
        raise
    return moves


def _wait_earlier(inventory: Inventory, node: str, moves: list[Move],
                  on_change: Callable[[Move], None], again: Callable[[Move], None],
                  stop: threading.Event) -> None:
    """Follow an earlier run's migrations in the source's journal until they end: moved
    (with the destination's report), or moved again now (AGAIN) when it ended without
    moving the container (an authorization never begun expires)."""
    if not moves:
        return
    deadline = time.monotonic() + WAIT_S
    tls = inventory.tls()
    pending = list(moves)
    while pending and time.monotonic() < deadline and not stop.is_set():
        time.sleep(1.0)
        try:
            with AgentClient(inventory.node(node), tls) as client:
                states = {e.migration_id: e for e in client.history(HISTORY)}
        except MigctlError:
            continue
        for move in list(pending):
            entry = states.get(move.migration_id)
            if entry is None or entry.state not in ENDED:
                continue
            pending.remove(move)
            if entry.state == "done":
                move.state, move.reason = "moved", ""
                with contextlib.suppress(MigctlError), \
                        AgentClient(inventory.node(move.destination), tls) as dest:
                    move.report = next((e.report for e in dest.history(HISTORY)
                                        if e.migration_id == move.migration_id), None)
                on_change(move)
            else:  # it still runs here: this run moves it, where the earlier one meant to
                again(move)
    for move in pending:
        move.state, move.reason = "failed", f"still under way after {WAIT_S:.0f} s"


def default_parallel(moves: list[Move]) -> int:
    """PARALLEL_PER_DESTINATION for each destination the plan uses (at least 1)."""
    return max(1, PARALLEL_PER_DESTINATION * len({m.destination for m in moves
                                                   if m.destination}))
