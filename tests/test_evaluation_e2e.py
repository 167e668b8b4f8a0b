"""A tiny grid through the real lab: every mode migrates, every row is complete."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from migctl.lab import net as labnet
from migctl.lab.evaluation.columns import COLUMNS, MEASURED
from migctl.lab.nodes import Lab
from tests.conftest import LabHandle, migctl

pytestmark = pytest.mark.lab

TINY = """
name = "tiny"
repetitions = 1
seed = 1
nodes = 3
modes = ["traditional", "cooperative", "reference"]
compression = "zstd"

[[links]]
name = "edge-200"
source_rate = "200mbit"
neighbour_rate = "1gbit"

[[workloads]]
kind = "redis"
sizes_mb = [5]
"""


def shaping() -> dict[str, str]:
    """What tc holds on every lab node's link, as set: the bench must give it back."""
    state = Lab().state()
    return {n: labnet.in_ns(n, "tc", "class", "show", "dev", "eth0").stdout
            for n in sorted(state["nodes"])}


def test_a_tiny_grid_runs_every_mode_on_the_lab(lab: LabHandle, tmp_path: Path) -> None:
    links_before, shaping_before = migctl("lab", "links").stdout, shaping()
    grid = tmp_path / "tiny.toml"
    grid.write_text(TINY)
    out = tmp_path / "out"
    migctl("bench", "run", str(grid), "--out", str(out))
    with (out / "runs.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        assert tuple(reader.fieldnames or ()) == COLUMNS
    assert sorted(r["mode"] for r in rows) == ["cooperative", "reference", "traditional"]
    for row in rows:
        assert row["status"] == "ok", row["error"]
        empty = [c for c in MEASURED if row[c] == ""]
        assert empty == [], f"{row['mode']}: nothing measured for {empty}"
        assert 0 < float(row["downtime_s"]) <= float(row["total_s"])
        assert float(row["client_gap_s"]) > 0, "the client saw no gap at all"
        assert int(row["bytes_total"]) == sum(int(row[c]) for c in (
            "bytes_from_source", "bytes_from_neighbours", "bytes_from_destination"))
    assert {r["checkpoint_method"] for r in rows} == {"direct", "engine"}
    assert (out / "summary.md").read_text().count("| edge-200 | redis |") == 3
    assert (out / "time-redis-5mb.png").stat().st_size > 0
    assert migctl("lab", "links").stdout == links_before, "the links were not given back"
    assert shaping() == shaping_before, "the links were not given back"
