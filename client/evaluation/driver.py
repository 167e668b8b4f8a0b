"""The lab driver: what runs one migration of a grid and measures it. The harness calls
`run_one` once per run, in the grid's shuffled order, and writes what it returns.

A driver is anything with this shape; `migctl bench run --driver MODULE:NAME` picks another
(a simulator, a driver for real machines). NAME(grid) is entered as a context manager around
the whole grid (set the lab up and the links back afterwards), then `run_one(run)` per run."""

from __future__ import annotations

from types import TracebackType
from typing import Protocol

from client.evaluation.grid import Grid, Run
from client.evaluation.runner import Value


class Driver(Protocol):
    def __enter__(self) -> Driver: ...

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None: ...

    def run_one(self, run: Run) -> dict[str, Value]: ...


class LabDriver:
    """Runs each migration on the lab (`migctl lab up --nodes grid.nodes`).

    run_one(run) must, for the run's parameters:
      - shape the links with tc in the node namespaces: the source's path at
        run.link.source_rate_bps, the neighbour's at run.link.neighbour_rate_bps (None: not
        shaped), both with run.link.loss_pct % loss (netem); tc takes f"{bps}bit";
      - start run.workload.kind with run.size_mb of data (and run.workload.dirty_rate_mb_s of
        writes per second for the writers) on the source, and for cooperative, let a neighbour
        hold what it would hold in the scenario (as tests/test_cooperative.py sets it up);
      - migrate it with run.mode: traditional and cooperative through migctl; reference is the
        seed's method, checkpoint + rsync, as a baseline;
      - compress as run.compression says on every side (rsync's zstd for the reference when
        "zstd"), and raise where a mode cannot honour it, so no run is recorded under a
        compression it did not use;
      - return the columns of client.evaluation.columns.MEASURED it measured (numbers, or a
        string for checkpoint_method); leave out what it does not measure. Raise on failure:
        the harness records the run as failed with the exception's message and goes on.
    """

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def __enter__(self) -> LabDriver:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None

    def run_one(self, run: Run) -> dict[str, Value]:
        raise NotImplementedError("written by the lab engineer")
