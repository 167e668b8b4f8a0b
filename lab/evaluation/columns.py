"""The columns of runs.csv, in one place: the harness writes the run's identity and outcome,
the driver fills what it measures, and what it does not measure stays empty."""

from __future__ import annotations

import csv
from pathlib import Path

from migctl.common.errors import MigctlError

NODES = ("nodeA", "nodeB", "nodeC")  # grid.MAX_NODES of them

# Written by the harness: the run's identity, its parameters (Run.params()'s, in its order),
# and its outcome.
IDENTITY = {
    "run_id": "hash of the run's parameters and repetition: what --resume matches",
    "grid": "the grid's name",
}
PARAMS = {
    "link": "link profile's name",
    "source_rate_bps": "rate of the source's path, bits/s",
    "neighbour_rate_bps": "rate of the neighbour's path, bits/s; empty: not shaped",
    "loss_pct": "packet loss on the shaped paths, percent",
    "workload": "workload's name",
    "kind": "redis | memory-writer | volume-writer | toy",
    "size_mb": "Redis data, memory written or volume size, MB",
    "dirty_rate_mb_s": "MB the workload writes per second during the run",
    "mode": "traditional | cooperative | reference",
    "compression": "zstd | none: the same for every mode",
    "repetition": "1 .. the grid's repetitions",
}
OUTCOME = {
    "status": "ok | failed",
    "error": "why a failed run failed (one line)",
    "started_at": "UTC, ISO 8601",
    "wall_s": "the driver's whole run, setup included, as the harness timed it",
}
HARNESS = IDENTITY | PARAMS | OUTCOME

# Filled by the driver, from the migration's report and its own probes.
MEASURED = {
    "total_s": "the migration from request to restored, as the agents report it",
    "downtime_s": "from freeze to running again, as the agents report it",
    "client_gap_s": "the longest gap between two answers a client outside saw",
    "request_s": "phase request",
    "pre_copy_s": "phase pre-copy",
    "freeze_s": "phase freeze",
    "final_sync_s": "phase final sync",
    "restore_s": "phase restore",
    "bytes_total": "what the destination got, sent or cached: the sum of the three below",
    "bytes_from_source": "sent by the source",
    "bytes_from_neighbours": "sent by other nodes",
    "bytes_from_destination": "taken from the destination's own cache, not sent",
    **{f"cpu_s_{n}": f"CPU seconds on {n} (agent, engine, CRIU, rsync) during the run"
       for n in NODES},
    **{f"peak_rss_mb_{n}": f"peak resident memory on {n} during the run, MB" for n in NODES},
    "checkpoint_method": "how the source's final checkpoint was taken",
}

COLUMNS = (*HARNESS, *MEASURED)
STATUS_OK = "ok"
STATUS_FAILED = "failed"


def read_runs(path: Path) -> list[dict[str, str]]:
    """The rows of a runs.csv; one written with other columns is refused, not misread."""
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = tuple(reader.fieldnames or ())
    except FileNotFoundError:
        raise MigctlError(f"no {path}: run a grid with `migctl bench run` first") from None
    except OSError as err:
        raise MigctlError(f"cannot read {path}: {err.strerror}") from None
    if header != COLUMNS:
        missing = [c for c in COLUMNS if c not in header]
        extra = [c for c in header if c not in COLUMNS]
        raise MigctlError(f"{path} has other columns than this migctl writes (missing: "
                          f"{', '.join(missing) or '-'}; unknown: {', '.join(extra) or '-'}"
                          f"{'' if missing or extra else '; in another order'})")
    return rows
