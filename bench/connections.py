"""The client's longest stall against the reported downtime, with connections kept and closed
(a benchmark, not a test).

On the lab (`migctl lab up`, whose nodes share the macvlan network `lan`), a workload runs on
nodeA with an address on `lan`, and a client on the host holds one connection to it, sending a
request every 10 ms; when its connection fails it reconnects to the same address (which moves
with the container either way). Each run moves the container nodeA -> nodeB with `migctl
migrate --json --connections keep|close --memory-transfer MEMORY` as a process; the client's
longest gap between two answers is the stall it saw, given against the downtime the report
says (the freeze until the container runs), as a ratio, in the same run. Every answer must be
the one before plus one on a kept connection; a closed one starts its count again (toy) or
goes on (Redis, whose INCR counts in the server).

    .venv/bin/python bench/connections.py [--runs 3] [--redis-mb 115] [--workload toy
        --workload toytsm --workload redis] [--memory-transfer delta]

Workloads:
  toytsm the seed's toy (its image, its two volumes, its counter writing one every second),
         serving with busybox `nc -ll -e`: every connection gets its own shell, which answers
         each line with the next integer (its state is the connection's own)
  redis  Redis with --redis-mb of data (keys of 1000 random bytes); the request is INCR
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import docker

from migctl.lab.nodes import LAN_NETWORK, Lab
from migctl.lab.workloads import (
    CACHE,
    COUNTER,
    REDIS_IMAGE,
    TOY_IMAGE,
    ensure_redis_image,
    ensure_toy_image,
    fill_redis,
    on_segment,
    remove_everywhere,
    wait_for_redis,
)

TICK = 0.01
NAME = "connbench"
TOY = ("printf '%s\\n' 'i=0; while read l; do i=$((i+1)); echo $i; done' >/srv.sh; "
       f"nc -ll -p 8080 -e sh /srv.sh & {COUNTER}")
VOLUMES = [f"{NAME}-rw", f"{NAME}-ro"]
PORTS = {"toytsm": 8080, "redis": 6379}
REQUEST = {"toytsm": b"x\n", "redis": b"*2\r\n$4\r\nINCR\r\n$1\r\nn\r\n"}


class Client(threading.Thread):
    """One connection at a time, a request every TICK: (answered at, value) of every answer,
    and how many times the connection failed."""

    def __init__(self, kind: str, address: str) -> None:
        super().__init__(daemon=True)
        self.kind, self.address = kind, address
        self.answers: list[tuple[float, int]] = []
        self.failures = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with socket.create_connection((self.address, PORTS[self.kind]),
                                              timeout=5) as s:
                    s.settimeout(30)
                    buf = b""
                    while not self.stop.wait(TICK):
                        s.sendall(REQUEST[self.kind])
                        while b"\n" not in buf:
                            chunk = s.recv(4096)
                            if not chunk:
                                raise ConnectionError("closed")
                            buf += chunk
                        line, _, buf = buf.partition(b"\n")
                        self.answers.append((time.monotonic(), int(line.strip(b":\r"))))
            except (OSError, ValueError):
                self.failures += 1
                time.sleep(TICK)

    def longest_stall(self, after: float) -> float:
        times = [t for t, _ in self.answers if t >= after]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)

    def lost(self) -> int:
        """Answers that did not follow the one before (a kept connection must have none)."""
        values = [v for _, v in self.answers]
        return sum(1 for a, b in zip(values, values[1:], strict=False) if b != a + 1)


def start(kind: str, client: docker.DockerClient, redis_mb: int) -> str:
    """The workload on nodeA's `lan`: its address."""
    if kind == "redis":
        ensure_redis_image(client, CACHE)
        c = client.containers.run(REDIS_IMAGE, name=NAME, detach=True, network=LAN_NETWORK)
    else:
        ensure_toy_image(client, CACHE)
        rw, ro = VOLUMES
        client.volumes.create(rw, labels={"rw-guid": f"guid-{rw}-{time.time_ns()}"})
        client.volumes.create(ro)
        c = client.containers.run(TOY_IMAGE, ["sh", "-c", TOY], name=NAME, detach=True,
                                  network=LAN_NETWORK,
                                  volumes={rw: {"bind": "/testrw", "mode": "rw"},
                                           ro: {"bind": "/testro", "mode": "ro"}})
    address = on_segment(c, LAN_NETWORK)
    if kind == "redis":
        fill_redis(address, redis_mb)
        wait_for_redis(address)
    else:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection((address, 8080), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    return address


def one_run(kind: str, connections: str, memory: str, clients: dict[str, docker.DockerClient],
            redis_mb: int) -> dict:
    remove_everywhere(clients, [NAME], VOLUMES)
    address = start(kind, clients["nodeA"], redis_mb)
    client = Client(kind, address)
    client.start()
    time.sleep(1.0)
    begun = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "migctl.client.cli", "migrate", "--json",
                          "--connections", connections, "--memory-transfer", memory, "--from",
                          "nodeA", "--to", "nodeB", NAME], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, timeout=900)
    if out.returncode:
        raise SystemExit(f"migrate failed:\n{out.stderr}")
    report = json.loads(out.stdout)
    time.sleep(3.0)
    client.stop.set()
    client.join(60)
    remove_everywhere(clients, [NAME], VOLUMES)
    return {"downtime": report["downtime_seconds"], "stall": client.longest_stall(begun),
            "failures": client.failures, "lost": client.lost(),
            "connections": report.get("connections", "")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--redis-mb", type=int, default=115)
    p.add_argument("--workload", action="append", choices=list(PORTS))
    p.add_argument("--memory-transfer", default="delta",
                   choices=["delta", "page-server", "post-copy"])
    args = p.parse_args()
    state = Lab().state()
    if not state.get("nodes"):
        raise SystemExit("the lab is not up: migctl lab up")
    clients = {n: docker.DockerClient(base_url=v["docker_host"], timeout=300)
               for n, v in state["nodes"].items()}
    print(f"# connections kept vs closed, memory by {args.memory_transfer}, {args.runs} runs, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'workload':<12} {'connections':<11} {'downtime s':>10} {'stall s':>8} "
          f"{'stall/downtime':>14} {'client failures':>15} {'lost':>5}")
    for kind in args.workload or ["toytsm", "redis"]:
        label = f"redis {args.redis_mb}MB" if kind == "redis" else kind
        for connections in ("keep", "close"):
            runs = [one_run(kind, connections, args.memory_transfer, clients, args.redis_mb)
                    for _ in range(args.runs)]
            said = {r["connections"] for r in runs}
            down = statistics.median(r["downtime"] for r in runs)
            stall = statistics.median(r["stall"] for r in runs)
            print(f"{label:<12} {'/'.join(sorted(said)):<11} {down:>10.3f} {stall:>8.3f} "
                  f"{stall / down if down else 0:>14.2f} "
                  f"{statistics.median(r['failures'] for r in runs):>15.0f} "
                  f"{statistics.median(r['lost'] for r in runs):>5.0f}", flush=True)


if __name__ == "__main__":
    main()
