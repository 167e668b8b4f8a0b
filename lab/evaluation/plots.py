"""PNG plots of a grid's cells: times against the source's link rate, one line per mode, and
bytes by origin, stacked per mode. One pair of files per workload × size."""

from __future__ import annotations

import re
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

from migctl.common.errors import MigctlError
from migctl.lab.evaluation.columns import read_runs
from migctl.lab.evaluation.runner import RUNS_CSV
from migctl.lab.evaluation.summary import CONFIDENCE, MB, Cell, summarize

TIME_METRICS = (("downtime_s", "downtime (agents)"), ("client_gap_s", "client gap"),
                ("total_s", "total time"))
ORIGINS = (("bytes_from_source", "source"), ("bytes_from_neighbours", "neighbours"),
           ("bytes_from_destination", "destination's cache"))
LOG_AXIS_SPAN = 10  # rates spanning more than this factor get a log axis
DPI = 110


def write_plots(out: Path) -> list[Path]:
    """OUT/time-WORKLOAD-SIZE.png and OUT/bytes-WORKLOAD-SIZE.png from OUT/runs.csv."""
    cells = [c for c in summarize(read_runs(out / RUNS_CSV)) if c.n]
    if not cells:
        raise MigctlError(f"{out / RUNS_CSV} holds no finished run to plot")
    panels: dict[tuple[str, str], list[Cell]] = {}
    for cell in cells:
        panels.setdefault((cell.key["workload"], cell.key["size_mb"]), []).append(cell)
    written = []
    for (workload, size), group in panels.items():
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{workload}-{size}mb")
        title = f"{workload}, {size} MB"
        written.append(_times(group, title, out / f"time-{stem}.png"))
        written.append(_bytes(group, title, out / f"bytes-{stem}.png"))
    return written


def _line_label(cell: Cell, group: list[Cell]) -> str:
    """The mode, and whatever else tells apart cells of that mode at one source rate
    (neighbour's rate, loss): one line per mode unless the grid varies more than the rate."""
    def same_point(c: Cell) -> bool:
        return all(c.key[k] == cell.key[k] for k in ("mode", "source_rate_bps"))

    label = cell.key["mode"]
    for key, name in (("neighbour_rate_bps", "neighbour"), ("loss_pct", "loss %")):
        if len({c.key[key] for c in group if same_point(c)}) > 1:
            label += f", {name} {_rate(cell.key[key]) if key.endswith('bps') else cell.key[key]}"
    return label


def _times(group: list[Cell], title: str, path: Path) -> Path:
    fig = Figure(figsize=(4.2 * len(TIME_METRICS), 3.8))
    lines: dict[str, list[Cell]] = {}
    for cell in group:
        lines.setdefault(_line_label(cell, group), []).append(cell)
    rates = [float(c.key["source_rate_bps"]) / 1e6 for c in group]
    for i, (metric, name) in enumerate(TIME_METRICS):
        ax = fig.add_subplot(1, len(TIME_METRICS), i + 1)
        for label, members in lines.items():
            points = sorted((float(c.key["source_rate_bps"]) / 1e6, c.stats[metric])
                            for c in members if c.stats[metric])
            if not points:
                continue
            xs = [x for x, _ in points]
            ys = [s.median for _, s in points]
            err = [[s.median - s.ci_low for _, s in points],
                   [s.ci_high - s.median for _, s in points]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
        if max(rates) > LOG_AXIS_SPAN * min(rates):
            ax.set_xscale("log")
        ticks = sorted({(float(c.key["source_rate_bps"]) / 1e6, c.key["link"]) for c in group})
        ax.set_xticks([x for x, _ in ticks], [f"{x:g}\n{link}" for x, link in ticks],
                      fontsize="small")
        ax.minorticks_off()
        ax.set_xlabel("source link rate, Mbit/s")
        ax.set_ylabel("seconds")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    fig.suptitle(f"{title}: median, {round(CONFIDENCE * 100)} % CI")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def _bytes(group: list[Cell], title: str, path: Path) -> Path:
    links = sorted({(float(c.key["source_rate_bps"]), c.key["link"]) for c in group})
    modes = list(dict.fromkeys(c.key["mode"] for c in group))
    fig = Figure(figsize=(max(5.0, 1.1 * len(links) * len(modes) + 2), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(modes)
    bars = [(li + (mi - (len(modes) - 1) / 2) * width, mode,
             [_median_mb(group, link, mode, metric) for metric, _ in ORIGINS])
            for li, (_, link) in enumerate(links) for mi, mode in enumerate(modes)]
    for o, (_, origin) in enumerate(ORIGINS):
        ax.bar([x for x, _, _ in bars], [stack[o] for _, _, stack in bars], width * 0.9,
               bottom=[sum(stack[:o]) for _, _, stack in bars], label=origin, color=f"C{o}")
    ax.set_xticks([x for x, _, _ in bars], [mode for _, mode, _ in bars], fontsize="small",
                  rotation=30)
    for li, (_, link) in enumerate(links):
        ax.text(li, -0.3, link, transform=ax.get_xaxis_transform(), ha="center")
    ax.set_ylabel("MB (median per origin)")
    ax.set_title(f"{title}: bytes by origin, per mode")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def _median_mb(group: list[Cell], link: str, mode: str, metric: str) -> float:
    cell = next((c for c in group if c.key["link"] == link and c.key["mode"] == mode), None)
    stat = cell.stats[metric] if cell else None
    return stat.median / MB if stat else 0.0


def _rate(bps: str) -> str:
    return "unshaped" if not bps else f"{float(bps) / 1e6:g} Mbit/s"
