"""Per cell (every parameter but the repetition): n, the median and a bootstrap confidence
interval of the median, and the ratio to traditional's median in the same cell.

The median, not the mean: a migration's times have a long tail (a retransmit, a slow fsync),
and a few runs per cell cannot pin a mean. The percentile bootstrap needs no distribution."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from migctl.common.errors import MigctlError
from migctl.lab.evaluation.columns import PARAMS, STATUS_FAILED, STATUS_OK, read_runs
from migctl.lab.evaluation.grid import MODES
from migctl.lab.evaluation.runner import RUNS_CSV

CONFIDENCE = 0.90
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 13  # fixed: the same runs.csv gives the same summary
BASELINE_MODE = "traditional"
METRICS = ("total_s", "downtime_s", "client_gap_s", "bytes_total", "bytes_from_source",
           "bytes_from_neighbours", "bytes_from_destination")
CELL_KEYS = tuple(k for k in PARAMS if k != "repetition")
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
MB = 1e6


@dataclass(frozen=True)
class Stat:
    n: int
    median: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class Cell:
    key: dict[str, str]  # CELL_KEYS -> the CSV's text
    n: int  # ok runs
    n_failed: int
    stats: dict[str, Stat | None]  # METRICS -> None where no ok run measured it


def median_ci(values: list[float], confidence: float = CONFIDENCE,
              resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Stat:
    """The median of VALUES and its percentile-bootstrap confidence interval."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values")
    rng = np.random.default_rng(seed)
    medians = np.median(x[rng.integers(0, x.size, size=(resamples, x.size))], axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(medians, [tail, 100 - tail])
    return Stat(int(x.size), float(np.median(x)), float(low), float(high))


def summarize(rows: list[dict[str, str]]) -> list[Cell]:
    """The cells of runs.csv's rows, ordered by link rate, workload, size and mode."""
    groups: dict[tuple[str, ...], list[dict[str, str]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in CELL_KEYS), []).append(row)
    cells = []
    for key, members in groups.items():
        ok = [r for r in members if r["status"] == STATUS_OK]
        stats: dict[str, Stat | None] = {}
        for metric in METRICS:
            values = [_number(r, metric) for r in ok if r[metric] != ""]
            stats[metric] = median_ci(values) if values else None
        cells.append(Cell(dict(zip(CELL_KEYS, key, strict=True)), len(ok),
                          sum(r["status"] == STATUS_FAILED for r in members), stats))
    return sorted(cells, key=_order)


def ratio(cells: list[Cell], cell: Cell, metric: str) -> float | None:
    """CELL's median over the baseline mode's median in the same cell; None without one."""
    base_key = cell.key | {"mode": BASELINE_MODE}
    base = next((c for c in cells if c.key == base_key), None)
    mine, theirs = cell.stats[metric], base.stats[metric] if base else None
    if mine is None or theirs is None or theirs.median == 0:
        return None
    return mine.median / theirs.median


def write_summary(out: Path) -> tuple[Path, Path]:
    """OUT/summary.csv (every figure) and OUT/summary.md (the table to read) from runs.csv."""
    cells = summarize(read_runs(out / RUNS_CSV))
    if not cells:
        raise MigctlError(f"{out / RUNS_CSV} holds no runs yet")
    csv_path, md_path = out / SUMMARY_CSV, out / SUMMARY_MD
    fields = [*CELL_KEYS, "n", "n_failed"]
    for m in METRICS:
        fields += [f"{m}_n", f"{m}_median", f"{m}_ci_low", f"{m}_ci_high",
                   f"{m}_vs_{BASELINE_MODE}"]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for cell in cells:
            row: dict[str, object] = {**cell.key, "n": cell.n, "n_failed": cell.n_failed}
            for m in METRICS:
                s, r = cell.stats[m], ratio(cells, cell, m)
                if s:
                    row |= {f"{m}_n": s.n, f"{m}_median": s.median, f"{m}_ci_low": s.ci_low,
                            f"{m}_ci_high": s.ci_high}
                row[f"{m}_vs_{BASELINE_MODE}"] = "" if r is None else r
            writer.writerow(row)
    md_path.write_text(_markdown(cells))
    return csv_path, md_path


def _markdown(cells: list[Cell]) -> str:
    pct = round(CONFIDENCE * 100)
    shown = [("total_s", "total s", 1), ("downtime_s", "downtime s", 1),
             ("client_gap_s", "client gap s", 1), ("bytes_total", "MB total", MB),
             ("bytes_from_source", "MB from source", MB)]
    lines = [f"Median [{pct} % bootstrap CI of the median] over the ok runs, and × the median "
             f"of {BASELINE_MODE} in the same cell.", "",
             "| link | workload | size MB | mode | n | failed | " +
             " | ".join(title for _, title, _ in shown) + " |",
             "|" + "---|" * (6 + len(shown))]
    for cell in cells:
        k = cell.key
        figures = []
        for metric, _, unit in shown:
            s, r = cell.stats[metric], ratio(cells, cell, metric)
            text = "–" if s is None else \
                f"{s.median / unit:.3g} [{s.ci_low / unit:.3g}, {s.ci_high / unit:.3g}]"
            if s is not None and r is not None and k["mode"] != BASELINE_MODE:
                text += f" ×{r:.2f}"
            figures.append(text)
        lines.append(f"| {k['link']} | {k['workload']} | {k['size_mb']} | {k['mode']} | "
                     f"{cell.n} | {cell.n_failed} | " + " | ".join(figures) + " |")
    return "\n".join(lines) + "\n"


def _number(row: dict[str, str], column: str) -> float:
    try:
        value = float(row[column])
    except ValueError:
        raise MigctlError(f"run {row['run_id']}: {column} = {row[column]!r} is not a "
                          "number") from None
    if not math.isfinite(value):
        raise MigctlError(f"run {row['run_id']}: {column} = {row[column]!r} is not finite")
    return value


def _order(cell: Cell) -> tuple:
    k = cell.key
    mode = MODES.index(k["mode"]) if k["mode"] in MODES else len(MODES)
    return (float(k["source_rate_bps"]), k["link"], k["workload"], float(k["size_mb"]), mode,
            tuple(k.values()))
