"""Runs a grid: one CSV row per finished run, written at once, so that an interruption loses
only the run under way and `--resume` goes on from there."""

from __future__ import annotations

import csv
import os
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from migctl.common.errors import MigctlError
from migctl.lab.evaluation.columns import COLUMNS, MEASURED, STATUS_FAILED, STATUS_OK, read_runs
from migctl.lab.evaluation.grid import Grid, Run

RUNS_CSV = "runs.csv"
# Runs failing one after another mean the lab, not the runs, is broken: stop rather than
# record the rest of the grid as failed.
MAX_CONSECUTIVE_FAILURES = 3

Value = float | int | str | None
RunOne = Callable[[Run], Mapping[str, Value]]


class GridAborted(MigctlError):
    """The grid stopped before its end; the finished runs are in the CSV."""


def run_grid(grid: Grid, run_one: RunOne, out: Path, *, resume: bool = False,
             progress: TextIO | None = None,
             clock: Callable[[], float] = time.monotonic) -> int:
    """Runs GRID's runs that OUT/runs.csv does not hold as done; returns how many it ran.

    A run that raises is recorded as failed and the grid goes on (it runs again on --resume);
    NotImplementedError (no driver) and KeyboardInterrupt end the grid at once."""
    progress = progress or sys.stderr
    path = out / RUNS_CSV
    runs = grid.runs()
    done = _done_ids(path, grid, runs, resume, progress)
    todo = [r for r in runs if r.run_id not in done]
    print(f"bench {grid.name}: {len(runs)} runs, {len(runs) - len(todo)} done before, "
          f"{len(todo)} to go -> {path}", file=progress, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    durations: list[float] = []
    failures_in_a_row = 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        if new:
            writer.writeheader()
        for i, run in enumerate(todo):
            row = _measure(run, run_one, clock)
            writer.writerow(row)
            f.flush()
            os.fsync(f.fileno())
            durations.append(float(row["wall_s"]))
            failures_in_a_row = failures_in_a_row + 1 if row["status"] == STATUS_FAILED else 0
            _report(progress, grid, run, row, len(runs) - len(todo) + i + 1, len(runs),
                    durations, len(todo) - i - 1)
            if failures_in_a_row >= MAX_CONSECUTIVE_FAILURES:
                raise GridAborted(f"{failures_in_a_row} runs failed in a row, the last: "
                                  f"{row['error']}; fix the lab and go on with --resume "
                                  f"(finished runs are in {path})")
    return len(todo)


def _done_ids(path: Path, grid: Grid, runs: list[Run], resume: bool,
              progress: TextIO) -> set[str]:
    """Run ids with an ok row in the CSV; failed runs are not done and run again."""
    if not path.exists():
        return set()
    if not resume:
        raise MigctlError(f"{path} exists: go on with --resume, or choose another --out")
    _drop_torn_row(path)
    rows = read_runs(path)
    others = {r["grid"] for r in rows} - {grid.name}
    if others:
        raise MigctlError(f"{path} holds runs of grid {', '.join(sorted(others))}, not "
                          f"{grid.name}: choose another --out")
    ids = {r.run_id for r in runs}
    stale = sum(r["run_id"] not in ids for r in rows)
    if stale:
        print(f"bench {grid.name}: {stale} rows of {path} are not runs of this grid (was it "
              "edited?): kept, and summarised as cells of their own", file=progress)
    return {r["run_id"] for r in rows if r["status"] == STATUS_OK}


def _drop_torn_row(path: Path) -> None:
    """A crash in the middle of a write leaves a row without its newline: cut it off, or the
    next row would be glued to it. Fields never hold newlines (_cell)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _measure(run: Run, run_one: RunOne, clock: Callable[[], float]) -> dict[str, str]:
    row: dict[str, Value] = {"run_id": run.run_id, "grid": run.grid, **run.params(),
                             "started_at": datetime.now(UTC).isoformat(timespec="seconds")}
    start = clock()
    try:
        measured = dict(run_one(run))
        unknown = [k for k in measured if k not in MEASURED]
        if unknown:
            raise ValueError(f"the driver returned unknown columns {', '.join(unknown)} "
                             f"(it may fill: {', '.join(MEASURED)})")
        wrong = [k for k, v in measured.items() if v is not None and
                 (isinstance(v, bool) or not isinstance(v, int | float | str))]
        if wrong:
            raise ValueError(f"the driver returned values that are neither numbers nor "
                             f"strings: {', '.join(f'{k}={measured[k]!r}' for k in wrong)}")
        row |= measured
        row["status"] = STATUS_OK
    except (NotImplementedError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - any failure of one run is that run's result
        row |= {"status": STATUS_FAILED, "error": f"{type(err).__name__}: {err}"}
    row["wall_s"] = round(clock() - start, 3)
    return {k: _cell(row.get(k)) for k in COLUMNS}


def _cell(value: Value) -> str:
    if value is None:
        return ""
    return " | ".join(str(value).splitlines())


def _report(out: TextIO, grid: Grid, run: Run, row: dict[str, str], n: int, total: int,
            durations: list[float], remaining: int) -> None:
    eta = _clock_time(sum(durations) / len(durations) * remaining)
    what = f"{run.mode} {run.workload.name} {run.size_mb:g} MB {run.link.name} #{run.repetition}"
    result = row["status"] if row["status"] == STATUS_OK else f"FAILED ({row['error']})"
    print(f"bench {grid.name}: [{n}/{total}] {what}: {result} in {float(row['wall_s']):.1f} s; "
          f"elapsed {_clock_time(sum(durations))}, ETA {eta}", file=out, flush=True)


def _clock_time(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else \
        f"{s // 60}m{s % 60:02d}s"
