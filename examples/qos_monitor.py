"""A QoS monitor built on migctl's public Python client only (migctl.client.api): it watches every
node's load and, when a node passes a threshold, moves one of its movable running containers
to the least loaded other node.

    python examples/qos_monitor.py --threshold 0.8 [--interval 5] [--once]

Load is NodeInfo.load: the one-minute load average per core that each agent reports. Only
running containers the agent says can move (ListContainers: no `unsupported` reason) are
candidates. A failed migration leaves the container running
where it was (migctl's guarantee); the monitor reports it and goes on.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from migctl.client import api


@dataclass(frozen=True)
class Move:
    container: str
    source: str
    destination: str


def decide(loads: dict[str, float], containers: dict[str, list],
           threshold: float) -> Move | None:
    """The move to make now, if any: from the most loaded node over THRESHOLD, its first
    movable running container, to the least loaded other node."""
    over = sorted((n for n, load in loads.items() if load > threshold), key=lambda n: -loads[n])
    for source in over:
        others = sorted((n for n in loads if n != source), key=lambda n: loads[n])
        if not others:
            return None
        for c in containers.get(source, []):
            if c.state == "running" and not c.unsupported:
                return Move(c.name, source, others[0])
    return None


def observe(inventory: api.Inventory) -> tuple[dict[str, float], dict[str, list]]:
    loads, errors = api.each_node(inventory, lambda c: c.info().load)
    for err in errors:
        print(f"qos: {err}", file=sys.stderr)
    containers, errors = api.each_node(inventory, lambda c: c.containers())
    return loads, containers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threshold", type=float, required=True,
                   help="load per core above which a node sheds a container")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between looks")
    p.add_argument("--once", action="store_true", help="look once, move at most once, exit")
    p.add_argument("--inventory", type=Path, default=None)
    args = p.parse_args(argv)
    inventory = api.Inventory.load(args.inventory)
    while True:
        loads, containers = observe(inventory)
        move = decide(loads, containers, args.threshold)
        if move:
            print(f"qos: {move.source} is at load {loads[move.source]:.2f} > "
                  f"{args.threshold}: moving {move.container} to {move.destination}",
                  flush=True)
            try:
                report = api.migrate(inventory, move.container, move.source, move.destination)
                print(f"qos: {move.container} runs on {move.destination} "
                      f"(downtime {report.downtime_seconds:.2f} s)", flush=True)
            except api.MigctlError as err:
                print(f"qos: could not move {move.container}: {err}", file=sys.stderr)
                if args.once:
                    return 1
        if args.once:
            return 0
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
