"""`migctl bench run|summary|plots`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from migctl.client import completion
from migctl.common.errors import MigctlError
from migctl.lab.evaluation.grid import Grid, load_grid

if TYPE_CHECKING:  # the driver imports the Docker SDK: only `bench run` loads it
    from migctl.lab.evaluation.driver import Driver

DEFAULT_OUT = Path("bench-results")
DEFAULT_DRIVER = "migctl.lab.evaluation.driver:LabDriver"


def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="measure traditional vs cooperative vs the reference "
                           "on a grid of links × workloads × sizes")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    run = bsub.add_parser("run", help="run a grid file's runs in random order; write "
                          "runs.csv, summary and plots")
    run.add_argument("grid", type=Path, metavar="GRID.toml"
                     ).complete = completion.FILE  # type: ignore[attr-defined]
    run.add_argument("--out", type=Path, default=None, metavar="DIR",
                     help=f"results folder (default: {DEFAULT_OUT}/GRID_NAME)"
                     ).complete = completion.DIRECTORY  # type: ignore[attr-defined]
    run.add_argument("--resume", action="store_true",
                     help="go on with DIR/runs.csv: skip the runs it holds as ok")
    run.add_argument("--driver", default=DEFAULT_DRIVER, metavar="MODULE:NAME",
                     help=f"what runs one migration, called with the grid (default: "
                          f"{DEFAULT_DRIVER}, the lab)")
    run.set_defaults(func=cmd_run)
    for name, func, what in (("summary", cmd_summary, "summary.csv and summary.md"),
                             ("plots", cmd_plots, "PNG plots")):
        p = bsub.add_parser(name, help=f"write {what} from DIR/runs.csv")
        p.add_argument("dir", type=Path, metavar="DIR"
                       ).complete = completion.DIRECTORY  # type: ignore[attr-defined]
        p.set_defaults(func=func)


def load_driver(spec: str) -> Callable[[Grid], Driver]:
    """MODULE:NAME, imported; a clear error for a spec that names nothing."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise MigctlError(f"--driver {spec!r}: write MODULE:NAME, e.g. {DEFAULT_DRIVER}")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as err:
        raise MigctlError(f"--driver {spec!r}: cannot import {module}: {err}") from None
    except AttributeError:
        raise MigctlError(f"--driver {spec!r}: {module} has no {name}") from None


def cmd_run(args: argparse.Namespace) -> int:
    from migctl.lab.evaluation.runner import RUNS_CSV, run_grid

    grid = load_grid(args.grid)
    factory = load_driver(args.driver)
    out = args.out or DEFAULT_OUT / grid.name
    try:
        with factory(grid) as driver:
            run_grid(grid, driver.run_one, out, resume=args.resume)
    except KeyboardInterrupt:
        print(f"migctl bench: interrupted; finished runs are in {out / RUNS_CSV}: go on with "
              f"`migctl bench run {args.grid} --out {out} --resume`", file=sys.stderr)
        return 130
    except NotImplementedError as err:
        raise MigctlError(f"driver {args.driver}: {err}") from None
    return _report(out)


def cmd_summary(args: argparse.Namespace) -> int:
    from migctl.lab.evaluation.summary import write_summary

    csv_path, md_path = write_summary(args.dir)
    print(md_path.read_text(), end="")
    print(f"written: {csv_path}, {md_path}", file=sys.stderr)
    return 0


def cmd_plots(args: argparse.Namespace) -> int:
    from migctl.lab.evaluation.plots import write_plots

    for path in write_plots(args.dir):
        print(path)
    return 0


def _report(out: Path) -> int:
    from migctl.lab.evaluation.plots import write_plots
    from migctl.lab.evaluation.summary import write_summary

    paths = list(write_summary(out))
    try:
        paths += write_plots(out)
    except MigctlError as err:  # every run failed: the summary says so, nothing to draw
        print(f"migctl bench: no plots: {err}", file=sys.stderr)
    print(f"written: {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0
