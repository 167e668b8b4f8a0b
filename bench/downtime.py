"""Downtime as a client of the container sees it (a benchmark, not a test).

On the lab (`migctl lab up`), for each workload a client outside the container sends a request
every 10 ms to whichever node answers, and the longest gap between two answers is the
downtime. Each run migrates the container nodeA -> nodeB (or back) with `migctl migrate` as a
process, and the reference, measured in the same run on the same container, is a local
`docker checkpoint create` + `docker start --checkpoint` on the node that holds it (the
engine's own path, what the seed's method pays before it copies anything). Runs alternate.

    .venv/bin/python bench/downtime.py [--runs 3] [--redis-mb 100] [--volume-mb 1024]

Workloads:
  redis   Redis with --redis-mb of data (keys of 1000 random bytes); the client sends INCR,
          and every answer must be above the last (no state lost).
  volume  a busybox server (nc) with a --volume-mb volume that holds one large file and a
          counter file rewritten every 100 ms: only the counter changes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import docker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.lab import Lab  # noqa: E402
from client.workloads import (  # noqa: E402
    BASE,
    REDIS_IMAGE,
    SERVER,
    Client,
    ensure_base,
    ensure_redis_image,
    fill_redis,
    remove_everywhere,
)
from tests.conftest import CACHE  # noqa: E402

NODES = ("nodeA", "nodeB")


def start(kind: str, client: docker.DockerClient, args: argparse.Namespace, host: str) -> None:
    if kind == "redis":
        ensure_redis_image(client, CACHE)
        client.containers.run(REDIS_IMAGE, name="bench-redis", detach=True,
                              ports={"6379/tcp": 6379})
        time.sleep(1)
        fill_redis(host, args.redis_mb)
        return
    ensure_base(client, CACHE)
    client.volumes.create("bench-data")
    client.containers.run(BASE, ["sh", "-c", f"dd if=/dev/urandom of=/d/big bs=1M "
                                 f"count={args.volume_mb} 2>/dev/null"], remove=True,
                          volumes={"bench-data": {"bind": "/d", "mode": "rw"}})
    script = f"(while true; do date > /d/counter; sleep 0.1; done) & {SERVER}"
    client.containers.run(BASE, ["sh", "-c", script], name="bench-volume", detach=True,
                          ports={"8080/tcp": 8080},
                          volumes={"bench-data": {"bind": "/d", "mode": "rw"}})


def local_cycle(client: docker.DockerClient, name: str) -> None:
    """The reference: the engine's checkpoint + restore of the container where it runs."""
    c = client.containers.get(name)
    tag = f"ref{time.time_ns()}"
    client.api._raise_for_status(client.api._post_json(
        client.api._url("/containers/{0}/checkpoints", c.id),
        data={"CheckpointID": tag, "Exit": True}))
    client.api._raise_for_status(client.api._post(
        client.api._url("/containers/{0}/start", c.id), params={"checkpoint": tag}))
    client.api._raise_for_status(client.api._delete(
        client.api._url("/containers/{0}/checkpoints/{1}", c.id, tag)))


def migrate(name: str, src: str, dst: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "client.cli", "migrate", "--json", "--from", src,
                          "--to", dst, name], capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise SystemExit(f"migration failed:\n{out.stderr}")
    return json.loads(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--redis-mb", type=int, default=100)
    p.add_argument("--volume-mb", type=int, default=1024)
    p.add_argument("--workload", choices=["redis", "volume"], action="append")
    args = p.parse_args()
    nodes = Lab().state()["nodes"]
    engines = {n: docker.DockerClient(base_url=nodes[n]["docker_host"], timeout=900)
               for n in NODES}
    hosts = [nodes[n]["address"].split(":")[0] for n in NODES]
    print(f"{'workload':<8} {'run':>3} {'migctl gap':>11} {'local ref':>10} {'ratio':>6} "
          f"{'agents':>7} {'freeze':>7} {'final':>6} {'restore':>8} {'forgot':>6}")
    for kind in args.workload or ["redis", "volume"]:
        name = f"bench-{kind}"
        remove_everywhere(engines, [name], ["bench-data"])
        start(kind, engines["nodeA"], args, hosts[0])
        client = Client("redis" if kind == "redis" else "hits", hosts)
        client.start()
        time.sleep(2)
        ratios = []
        here = 0
        for run in range(args.runs):
            t0 = time.monotonic()
            local_cycle(engines[NODES[here]], name)
            t1 = time.monotonic()
            time.sleep(2)
            t2 = time.monotonic()
            report = migrate(name, NODES[here], NODES[1 - here])
            t3 = time.monotonic()
            here = 1 - here
            time.sleep(2)
            ref, gap = client.gap(t0, t1), client.gap(t2, t3)
            ratios.append(gap / ref if ref else float("nan"))
            phase = {ph["phase"]: ph["seconds"] for ph in report["phases"]}
            print(f"{kind:<8} {run:>3} {gap:>10.2f}s {ref:>9.2f}s {ratios[-1]:>6.2f} "
                  f"{report['downtime_seconds']:>6.2f}s {phase.get('FREEZE', 0):>6.2f}s "
                  f"{phase.get('FINAL_SYNC', 0):>5.2f}s {phase.get('RESTORE', 0):>7.2f}s "
                  f"{client.forgotten():>5}", flush=True)
        client.stop.set()
        client.join()
        print(f"{kind}: median client-seen gap / local engine checkpoint+restore = "
              f"{statistics.median(ratios):.2f} over {args.runs} runs "
              f"({report['checkpoint_method']} checkpoint, {report['restore_method']} restore)")
        remove_everywhere(engines, [name], ["bench-data"])


if __name__ == "__main__":
    main()
