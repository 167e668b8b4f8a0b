"""The lab driver: what runs one migration of a grid and measures it. The harness calls
`run_one` once per run, in the grid's shuffled order, and writes what it returns.

A driver is anything with this shape; `migctl bench run --driver MODULE:NAME` picks another
(a simulator, a driver for real machines). NAME(grid) is entered as a context manager around
the whole grid (set the lab up and the links back afterwards), then `run_one(run)` per run."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from types import TracebackType
from typing import Protocol

import docker
import psutil

from migctl.common.errors import MigctlError
from migctl.lab import workloads
from migctl.lab.evaluation.columns import MEASURED
from migctl.lab.evaluation.grid import Grid, Run
from migctl.lab.evaluation.runner import Value
from migctl.lab.workloads import CACHE


class Driver(Protocol):
    def __enter__(self) -> Driver: ...

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None: ...

    def run_one(self, run: Run) -> dict[str, Value]: ...


SOURCE, DESTINATION, NEIGHBOUR = "nodeA", "nodeB", "nodeC"
NAME = "bench"  # the container every run migrates
VOLUME = "bench-data"
SAMPLE = 0.5  # seconds between samples of the nodes' memory


class LabDriver:
    """Runs each migration on the lab (`migctl lab up --nodes 3`): nodeA is the source, nodeB
    the destination, nodeC the neighbour, which holds the container's image (the cooperative
    scenario: the service passed through it before).

    Per run: the links are shaped (`lab/net.py`): nodeA-nodeB at the link's source rate,
    nodeC-nodeB at its neighbour rate, both with its loss; the workload starts fresh on nodeA
    (nothing of it left on the other nodes); a client outside the container (Redis INCR, or the
    hit server for the writers) sends a request every 10 ms to whichever node answers; the
    migration runs as a `migctl migrate` process (traditional, cooperative) or as the seed's
    method (`lab/seedmethod.py`, reference). The agents' caches persist between runs: what
    the destination already held is reported as bytes_from_destination, for every mode.
    """

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def __enter__(self) -> LabDriver:
        from migctl.lab.nodes import Lab

        self.state = Lab().state()
        self.found_links = dict(self.state.get("links", {}))  # given back at the end
        missing = [n for n in (SOURCE, DESTINATION, NEIGHBOUR) if n not in
                   self.state.get("nodes", {})]
        if missing:
            raise MigctlError(f"the lab lacks {', '.join(missing)}: run `migctl lab up "
                              "--nodes 3` first")
        if self.grid.compression != "zstd":
            raise MigctlError(f"compression {self.grid.compression!r}: migctl's agents always "
                              "send literals zstd-compressed, so only 'zstd' is measured "
                              "fairly (the reference then uses rsync's zstd)")
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        from migctl.lab import net as labnet

        labnet.reset(self.state)
        for name, spec in self.found_links.items():
            labnet.set_link(self.state, *name.split("|"), labnet.LinkSpec(**spec))
        self._clean()

    # -- one run ------------------------------------------------------------------------------

    def run_one(self, run: Run) -> dict[str, Value]:
        from migctl.lab import net as labnet

        labnet.reset(self.state)
        loss = f"{run.link.loss_pct:g}%" if run.link.loss_pct else ""
        labnet.set_link(self.state, SOURCE, DESTINATION,
                        labnet.LinkSpec(rate=f"{run.link.source_rate_bps}bit", loss=loss))
        if run.link.neighbour_rate_bps:
            labnet.set_link(self.state, NEIGHBOUR, DESTINATION, labnet.LinkSpec(
                rate=f"{run.link.neighbour_rate_bps}bit", loss=loss))
        self._clean()
        client = self._start(run)
        meters = {n: _NodeMeter(n) for n in (SOURCE, DESTINATION, NEIGHBOUR)}
        try:
            if client:
                client.start()
                time.sleep(1.0)
            start = time.monotonic()
            out = self._migrate(run)
            end = time.monotonic()
            if client:
                time.sleep(2.0)
                out["client_gap_s"] = round(client.gap(start, end), 3)
                if client.forgotten():
                    raise MigctlError(f"the container forgot its state: {client.forgotten()} "
                                      "answers were not above the one before")
        finally:
            if client:
                client.stop.set()
                client.join()
            used = {name: meter.stop() for name, meter in meters.items()}
        for name, (cpu, rss) in used.items():
            out[f"cpu_s_{name}"] = round(cpu, 3)
            out[f"peak_rss_mb_{name}"] = round(rss / 1e6, 1)
        return out

    def _migrate(self, run: Run) -> dict[str, Value]:
        if run.mode == "reference":
            from migctl.lab.seedmethod import SeedMethod

            r = SeedMethod(self.state, SOURCE, DESTINATION, compress=True).migrate(NAME)
            return {"total_s": round(r.total, 3), "downtime_s": round(r.downtime, 3),
                    **{f"{k}_s": round(v, 3) for k, v in r.phases.items()},
                    "bytes_total": r.bytes_received, "bytes_from_source": r.bytes_received,
                    "bytes_from_neighbours": 0, "bytes_from_destination": 0,
                    "checkpoint_method": "engine"}
        res = subprocess.run([sys.executable, "-m", "migctl.client.cli", "migrate", "--json",
                              "--mode", run.mode, "--from", SOURCE, "--to", DESTINATION, NAME],
                             capture_output=True, text=True, timeout=1800)
        if res.returncode:
            raise MigctlError(res.stderr.strip().splitlines()[-1] if res.stderr.strip()
                              else f"migctl exited with {res.returncode}")
        report = json.loads(res.stdout)
        phases = {p["phase"].lower(): p["seconds"] for p in report["phases"]}
        origins = {o["node"]: int(o["bytes"]) for o in report.get("origins", [])}
        by_source = origins.pop(SOURCE, 0)
        by_destination = origins.pop(DESTINATION, 0)
        return {"total_s": report["total_seconds"], "downtime_s": report["downtime_seconds"],
                **{f"{k}_s": v for k, v in phases.items() if f"{k}_s" in MEASURED},
                "bytes_total": by_source + by_destination + sum(origins.values()),
                "bytes_from_source": by_source, "bytes_from_neighbours": sum(origins.values()),
                "bytes_from_destination": by_destination,
                "checkpoint_method": report.get("checkpoint_method", "")}

    # -- workloads ------------------------------------------------------------------------------

    def _engine(self, node: str) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.state["nodes"][node]["docker_host"],
                                   timeout=600)

    def _host(self, node: str) -> str:
        return self.state["nodes"][node]["address"].split(":")[0]

    def _clean(self) -> None:
        engines = {n: self._engine(n) for n in (SOURCE, DESTINATION, NEIGHBOUR)}
        workloads.remove_everywhere(engines, [NAME], [VOLUME, "testrw", "testro"])

    def _start(self, run: Run) -> workloads.Client | None:
        """The workload on the source, its image on the neighbour too; its client."""
        src, nb = self._engine(SOURCE), self._engine(NEIGHBOUR)
        hosts = [self._host(n) for n in (SOURCE, DESTINATION)]
        kind, size = run.workload.kind, run.size_mb
        if kind == "toy":
            for engine in (src, nb):
                workloads.ensure_toy_image(engine, CACHE)
            workloads.run_toy(src, name=NAME)
            time.sleep(2)
            return None
        if kind in ("redis", "memory-writer"):
            for engine in (src, nb):
                workloads.ensure_redis_image(engine, CACHE)
            src.containers.run(workloads.REDIS_IMAGE, name=NAME, detach=True,
                               ports={"6379/tcp": 6379})
            workloads.fill_redis(hosts[0], size)
            if kind == "memory-writer":
                return workloads.Client("redis", hosts,
                                        write_rate=run.workload.dirty_rate_mb_s * 1e6)
            return workloads.Client("redis", hosts)
        # volume-writer: SIZE MB in a volume, DIRTY_RATE MB/s appended, and the hit server
        for engine in (src, nb):
            workloads.ensure_base(engine, CACHE)
        src.volumes.create(VOLUME, labels={"rw-guid": f"guid-{time.time_ns()}"})
        src.containers.run(workloads.BASE, ["sh", "-c", f"dd if=/dev/urandom of=/d/data bs=1M "
                                            f"count={max(1, int(size))} 2>/dev/null"],
                           remove=True, volumes={VOLUME: {"bind": "/d", "mode": "rw"}})
        kb = max(1, int(run.workload.dirty_rate_mb_s * 1000 / 10))  # every 0.1 s
        writer = (f"(while true; do dd if=/dev/urandom bs=1K count={kb} 2>/dev/null "
                  f">> /d/log; sleep 0.1; done) & " if run.workload.dirty_rate_mb_s else "")
        src.containers.run(workloads.BASE, ["sh", "-c", writer + workloads.SERVER], name=NAME,
                           detach=True, ports={"8080/tcp": 8080},
                           volumes={VOLUME: {"bind": "/d", "mode": "rw"}})
        return workloads.Client("hits", hosts)


class _NodeMeter(threading.Thread):
    """CPU seconds and peak resident memory of a lab node's own processes (those in its
    network namespace: agent, engine, containerd, shims, CRIU, rsync)."""

    def __init__(self, node: str) -> None:
        super().__init__(daemon=True)
        self.ns = os.stat(f"/run/netns/migctl-{node}").st_ino
        self.cpu0 = self._cpu()
        self.peak = 0
        self.done = threading.Event()
        self.start()

    def _procs(self) -> list[psutil.Process]:
        out = []
        for proc in psutil.process_iter():
            try:
                if os.stat(f"/proc/{proc.pid}/ns/net").st_ino == self.ns:
                    out.append(proc)
            except OSError:
                continue
        return out

    def _cpu(self) -> float:
        total = 0.0
        for proc in self._procs():
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        return total

    def run(self) -> None:
        while not self.done.wait(SAMPLE):
            rss = 0
            for proc in self._procs():
                with contextlib.suppress(psutil.Error):
                    rss += proc.memory_info().rss
            self.peak = max(self.peak, rss)

    def stop(self) -> tuple[float, int]:
        self.done.set()
        self.join()
        return max(0.0, self._cpu() - self.cpu0), self.peak
