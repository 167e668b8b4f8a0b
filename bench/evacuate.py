"""Evacuating a node: `migctl evacuate` against moving the same containers one by one, and
each container's downtime under concurrency (a benchmark, not a test).

On the lab (`migctl lab up --nodes 3`), nodeA gets the same crowd before every run: busybox
counters and the seed's toy, each counting into its own volume, Redis servers with --redis-mb
of data on `lan`, and one container with a bind mount (it cannot move, and stays). Then:
  one-by-one     `migctl migrate --json` per container as processes, each after the one before,
                 to nodeB and nodeC in turn (the reference, measured in the same run)
  parallel N     `migctl evacuate nodeA --parallel N --json` as one process
Printed per run: the total wall time (the process(es), start-up included), its ratio to
one-by-one, and the median and longest downtime the reports give.

    .venv/bin/python bench/evacuate.py [--counters 12] [--toys 5] [--redis 3]
        [--redis-mb 50] [--parallel 1 --parallel 2 --parallel 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker

from migctl.lab.nodes import LAN_NETWORK, Lab
from migctl.lab.workloads import BASE, CACHE, crowd_volumes, remove_everywhere, run_crowd

ROOT = Path(__file__).resolve().parent.parent
BIND = "evb-bind"


def migctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "migctl.client.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)


def crowd(clients: dict[str, docker.DockerClient], args: argparse.Namespace,
          host_dir: str) -> list[str]:
    counters = [f"evb-count{i}" for i in range(args.counters)]
    toys = [f"evb-toy{i}" for i in range(args.toys)]
    redis = [f"evb-redis{i}" for i in range(args.redis)]
    names = [*counters, *toys, *redis]
    remove_everywhere(clients, [*names, BIND], crowd_volumes(counters, toys))
    a = clients["nodeA"]
    run_crowd(a, CACHE, counters, toys, redis, args.redis_mb, LAN_NETWORK)
    a.containers.run(BASE, ["sh", "-c", "while true; do date >> /host/log; sleep 1; done"],
                     name=BIND, detach=True, volumes={host_dir: {"bind": "/host", "mode": "rw"}})
    time.sleep(2)
    return names


def one_by_one(names: list[str]) -> tuple[float, list[float]]:
    start, downtimes = time.monotonic(), []
    for i, name in enumerate(names):
        out = migctl("migrate", "--json", "--memory-transfer", "delta", "--from", "nodeA",
                     "--to", ("nodeB", "nodeC")[i % 2], name)
        if out.returncode:
            raise SystemExit(f"migrate {name} failed:\n{out.stderr}")
        downtimes.append(json.loads(out.stdout)["downtime_seconds"])
    return time.monotonic() - start, downtimes


def evacuate(parallel: int) -> tuple[float, list[float]]:
    start = time.monotonic()
    out = migctl("evacuate", "nodeA", "--json", "--memory-transfer", "delta", "--parallel",
                 str(parallel))
    took = time.monotonic() - start
    moves = json.loads(out.stdout)
    failed = [m for m in moves if m["state"] not in ("moved", "stays")]
    if failed:
        raise SystemExit(f"evacuate --parallel {parallel}: {failed}")
    return took, [m["report"]["downtime_seconds"] for m in moves if m["state"] == "moved"]


def check(clients: dict[str, docker.DockerClient], names: list[str]) -> None:
    """Every container moved runs once, on nodeB or nodeC; the bind one still on nodeA."""
    for name in [*names, BIND]:
        where = [n for n, c in clients.items()
                 if any(k.name == name for k in c.containers.list(filters={"name": name}))]
        want = ["nodeA"] if name == BIND else None
        if (where != want) if want else (len(where) != 1 or where[0] == "nodeA"):
            raise SystemExit(f"{name} runs on {where} after the run")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counters", type=int, default=12)
    p.add_argument("--toys", type=int, default=5)
    p.add_argument("--redis", type=int, default=3)
    p.add_argument("--redis-mb", type=float, default=50)
    p.add_argument("--parallel", type=int, action="append")
    args = p.parse_args()
    state = Lab().state()
    if len(state.get("nodes", {})) < 3:
        raise SystemExit("the lab is not up with 3 nodes: migctl lab up --nodes 3")
    clients = {n: docker.DockerClient(base_url=v["docker_host"], timeout=300)
               for n, v in state["nodes"].items()}
    runs = [("one-by-one", 0)] + [(f"parallel {n}", n) for n in args.parallel or [1, 2, 4]]
    total = args.counters + args.toys + args.redis
    print(f"# evacuating nodeA: {total} containers ({args.counters} counters, {args.toys} toys, "
          f"{args.redis} Redis of {args.redis_mb:g} MB) + 1 with a bind mount, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'run':<12} {'total s':>8} {'ratio':>6} {'median downtime s':>18} "
          f"{'max downtime s':>15}")
    reference = 0.0
    with tempfile.TemporaryDirectory() as host_dir:
        for label, parallel in runs:
            names = crowd(clients, args, host_dir)
            took, downtimes = one_by_one(names) if not parallel else evacuate(parallel)
            check(clients, names)
            reference = reference or took
            print(f"{label:<12} {took:>8.1f} {took / reference:>6.2f} "
                  f"{statistics.median(downtimes):>18.2f} {max(downtimes):>15.2f}", flush=True)
        remove_everywhere(clients, [*names, BIND], crowd_volumes(
            [n for n in names if "count" in n], [n for n in names if "toy" in n]))


if __name__ == "__main__":
    main()
