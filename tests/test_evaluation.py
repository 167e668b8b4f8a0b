"""The evaluation harness (client.evaluation) with a fake driver: grid files and their errors,
the runs and their order, the CSV and --resume, the statistics against hand computations,
the plots and the `migctl bench` commands. No lab: the lab driver has tests of its own."""

from __future__ import annotations

import csv
import io
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from migctl.client import cli
from migctl.common.errors import MigctlError
from migctl.lab.evaluation import columns, grid, runner, summary
from migctl.lab.evaluation.grid import Grid, GridError, Run, load_grid, parse_rate
from migctl.lab.evaluation.plots import write_plots
from migctl.lab.seedmethod import RSYNC

REPO = Path(__file__).resolve().parent.parent

BASE = """\
name = "tiny"
repetitions = 3
seed = 7
nodes = 3
modes = ["traditional", "cooperative", "reference"]

[[links]]
name = "slow"
source_rate = "10mbit"
neighbour_rate = "1gbit"

[[links]]
name = "fast"
source_rate = "100mbit"

[[workloads]]
kind = "redis"
sizes_mb = [50, 200]

[[workloads]]
kind = "volume-writer"
sizes_mb = [10]
dirty_rate_mb_s = 1
"""
CELLS = 2 * (2 + 1) * 3  # links × (sizes of redis + of the writer) × modes
TOTAL_S = {"traditional": [10.0, 12.0, 11.0], "cooperative": [6.0, 5.0, 7.0],
           "reference": [20.0, 30.0, 25.0]}


def write_grid(tmp_path: Path, text: str = BASE) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path


def fake_measure(run: Run) -> dict[str, float | str | None]:
    """Fixed numbers: total_s from TOTAL_S by mode and repetition, bytes from the size."""
    size = run.size_mb * 1e6
    from_source = size if run.mode != "cooperative" else size / 4
    return {"total_s": TOTAL_S[run.mode][run.repetition - 1], "downtime_s": 0.5,
            "client_gap_s": None, "bytes_total": size, "bytes_from_source": from_source,
            "bytes_from_neighbours": size - from_source, "bytes_from_destination": 0,
            "cpu_s_nodeA": 1.25, "checkpoint_method": "criu"}


class FakeDriver:
    """A driver for `migctl bench run --driver tests.test_evaluation:FakeDriver`."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def __enter__(self) -> FakeDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def run_one(self, run: Run) -> dict[str, float | str | None]:
        return fake_measure(run)


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


# -- grid files ------------------------------------------------------------------------------


def test_the_shipped_grids_load_with_the_sizes_their_comments_give() -> None:
    quick = load_grid(REPO / "bench/grids/quick.toml")
    full = load_grid(REPO / "bench/grids/full.toml")
    assert len(quick.runs()) == 24
    assert len(full.runs()) == 972
    assert (len(full.links), len(full.workloads), full.repetitions) == (3, 3, 9)
    assert {len(w.sizes_mb) for w in full.workloads} == {4}
    assert full.modes == quick.modes == grid.MODES


def test_a_grid_is_parsed_into_its_values(tmp_path: Path) -> None:
    g = load_grid(write_grid(tmp_path))
    assert (g.name, g.repetitions, g.seed, g.nodes, g.compression) == ("tiny", 3, 7, 3, "zstd")
    assert g.links[0] == grid.Link("slow", 10_000_000, 1_000_000_000, 0.0)
    assert g.links[1].neighbour_rate_bps is None
    assert g.workloads[1] == grid.Workload("volume-writer-1MBps", "volume-writer", (10,), 1)


@pytest.mark.parametrize(("text", "bps"), [
    ("100mbit", 100_000_000), ("1gbit", 1_000_000_000), ("1.5Gbit", 1_500_000_000),
    ("64kbit", 64_000), ("100bit", 100), ("1mibit", 2**20)])
def test_rates_in_tc_units(text: str, bps: int) -> None:
    assert parse_rate(text) == bps


@pytest.mark.parametrize(("text", "why"), [
    ("100 mbit", "no space"), ("100mbps", "bytes per second"), ("100", "a number and a unit"),
    ("fast", "a number and a unit"), ("100mbits", "unknown unit 'mbits'"),
    ("0mbit", "above 0"), (100, "a string")])
def test_bad_rates_say_what_is_wrong(text: object, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_rate(text)


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("seed = 7", "seed = 7\nrepetition = 3", "unknown key repetition"),
    ("repetitions = 3", "repetitions = 0", "repetitions = 0: must be at least 1"),
    ("repetitions = 3", 'repetitions = "3"', 'repetitions = "3": must be a whole number'),
    ("nodes = 3", "nodes = 4", "nodes = 4: must be between 2 and 3"),
    ('"reference"]', '"coop"]', 'modes[2] = "coop": unknown; choose from'),
    ('modes = ["traditional", "cooperative", "reference"]', "modes = []",
     "modes = []: must be a non-empty list"),
    ('"reference"]', '"traditional"]', "lists a value twice"),
    ('source_rate = "10mbit"', 'source_rate = "10 mbps"',
     'links[0].source_rate = "10 mbps": a rate is a number and a unit'),
    ('source_rate = "10mbit"', 'source_rate = "10mbps"', "means bytes per second"),
    ('neighbour_rate = "1gbit"', 'neighbour_rate = "1gbit"\nloss = "5"',
     'links[0].loss = "5": a loss is a percentage'),
    ('neighbour_rate = "1gbit"', 'neighbour_rate = "1gbit"\ndelay = "20ms"',
     "unknown key links[0].delay"),
    ('name = "fast"', 'name = "slow"', "two links are named 'slow'"),
    ("sizes_mb = [50, 200]", "sizes_mb = [50, -1]", "workloads[0].sizes_mb[1] = -1: must be "
                                                    "above 0"),
    ("sizes_mb = [50, 200]", "sizes_mb = []", "workloads[0].sizes_mb = []"),
    ('kind = "redis"', 'kind = "postgres"', 'workloads[0].kind = "postgres": unknown'),
    ("sizes_mb = [50, 200]", "sizes_mb = [50]\ndirty_rate_mb_s = 2",
     "workloads[0].dirty_rate_mb_s = 2: only memory-writer and volume-writer"),
    ("dirty_rate_mb_s = 1", "dirty_rate_mb_s = -1", "dirty_rate_mb_s = -1: must not be "
                                                    "negative"),
    ("", 'compression = "lz4"', 'compression = "lz4": unknown; choose from zstd, none'),
])
def test_a_bad_grid_is_refused_naming_file_key_and_value(tmp_path: Path, old: str, new: str,
                                                         expected: str) -> None:
    text = BASE.replace(old, new) if old else f"{new}\n{BASE}"  # "": a top-level key, first
    assert text != BASE
    path = write_grid(tmp_path, text)
    with pytest.raises(GridError) as err:
        load_grid(path)
    assert str(err.value).startswith(f"grid file {path}")
    assert expected in str(err.value)


@pytest.mark.parametrize(("text", "expected"), [
    ("name = ", "is not valid TOML"),
    ('name = "x"\nrepetitions = 1\nmodes = ["traditional"]\n[[workloads]]\nkind = "toy"\n'
     "sizes_mb = [1]\n", "links is missing"),
    ('name = "x"\nrepetitions = 1\nmodes = ["traditional"]\nlinks = [1]\n',
     "links must be one or more [[links]] tables")])
def test_a_broken_grid_file_is_refused(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(GridError, match=expected.replace("[", r"\[")):
        load_grid(write_grid(tmp_path, text))


def test_a_missing_grid_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(GridError, match=f"grid file {tmp_path}/none.toml does not exist"):
        load_grid(tmp_path / "none.toml")


# -- runs --------------------------------------------------------------------------------


def test_runs_are_every_cell_once_per_repetition_in_a_reproducible_shuffle(
        tmp_path: Path) -> None:
    g = load_grid(write_grid(tmp_path))
    runs = g.runs()
    assert len(runs) == CELLS * g.repetitions
    assert len({r.run_id for r in runs}) == len(runs)
    for rep in range(g.repetitions):  # blocks: each holds every cell, of one repetition
        block = runs[rep * CELLS:(rep + 1) * CELLS]
        assert {r.repetition for r in block} == {rep + 1}
        assert len({(r.link, r.workload, r.size_mb, r.mode) for r in block}) == CELLS
    assert [r.run_id for r in load_grid(write_grid(tmp_path)).runs()] == \
        [r.run_id for r in runs]
    reseeded = load_grid(write_grid(tmp_path, BASE.replace("seed = 7", "seed = 8"))).runs()
    assert [r.run_id for r in reseeded] != [r.run_id for r in runs]
    assert sorted(r.run_id for r in reseeded) == sorted(r.run_id for r in runs)
    cells_in_order = [(r.link.name, r.workload.name, r.size_mb, r.mode) for r in runs[:CELLS]]
    assert cells_in_order != sorted(cells_in_order)


def test_a_run_id_changes_with_any_parameter_and_not_with_how_a_size_is_written(
        tmp_path: Path) -> None:
    ids = {r.run_id for r in load_grid(write_grid(tmp_path)).runs()}
    faster = load_grid(write_grid(tmp_path, BASE.replace('"10mbit"', '"11mbit"'))).runs()
    assert len({r.run_id for r in faster} - ids) == len(faster) // 2  # the slow link's runs
    as_float = load_grid(write_grid(tmp_path, BASE.replace("[50, 200]", "[50.0, 200.0]")))
    assert {r.run_id for r in as_float.runs()} == ids


def test_run_params_are_the_csv_parameter_columns(tmp_path: Path) -> None:
    run = load_grid(write_grid(tmp_path)).runs()[0]
    assert tuple(run.params()) == tuple(columns.PARAMS)


# -- the runner and its CSV ----------------------------------------------------------------


def run_tiny(tmp_path: Path, run_one: runner.RunOne = fake_measure, resume: bool = False,
             text: str = BASE) -> tuple[Grid, Path, str]:
    g = load_grid(write_grid(tmp_path, text))
    log = io.StringIO()
    ticks = iter(range(0, 10**6, 10))  # every run takes 10 s by this clock
    runner.run_grid(g, run_one, tmp_path / "out", resume=resume, progress=log,
                    clock=lambda: next(ticks))
    return g, tmp_path / "out" / runner.RUNS_CSV, log.getvalue()


def test_a_tiny_grid_writes_one_row_per_run_with_exactly_the_columns(tmp_path: Path) -> None:
    g, path, _ = run_tiny(tmp_path)
    header, rows = read_csv(path)
    assert header == list(columns.COLUMNS)
    assert columns.COLUMNS[:2] == ("run_id", "grid")
    assert {"total_s", "downtime_s", "client_gap_s", "pre_copy_s", "bytes_from_source",
            "cpu_s_nodeC", "peak_rss_mb_nodeA", "checkpoint_method"} <= set(header)
    assert [r["run_id"] for r in rows] == [r.run_id for r in g.runs()]
    first, run = rows[0], g.runs()[0]
    assert first["status"] == "ok" and first["error"] == ""
    assert first["grid"] == "tiny" and first["mode"] == run.mode
    assert first["source_rate_bps"] == str(run.link.source_rate_bps)
    assert first["total_s"] == str(TOTAL_S[run.mode][0])
    assert first["cpu_s_nodeA"] == "1.25" and first["checkpoint_method"] == "criu"
    assert first["client_gap_s"] == first["restore_s"] == first["cpu_s_nodeB"] == ""
    assert first["wall_s"] == "10"


def test_progress_counts_runs_and_estimates_from_their_mean(tmp_path: Path) -> None:
    g, _, log = run_tiny(tmp_path)
    total = len(g.runs())
    lines = log.splitlines()
    assert lines[0].endswith(f"{total} runs, 0 done before, {total} to go -> "
                             f"{tmp_path}/out/runs.csv")
    assert f"[1/{total}]" in lines[1]
    assert f"elapsed 0m10s, ETA {(total - 1) * 10 // 60}m{(total - 1) * 10 % 60:02d}s" \
        in lines[1]
    assert lines[-1].endswith(f"elapsed {total * 10 // 60}m{total * 10 % 60:02d}s, ETA 0m00s")


def test_a_failed_run_is_a_row_and_the_grid_goes_on(tmp_path: Path) -> None:
    victim = load_grid(write_grid(tmp_path)).runs()[4].run_id

    def flaky(run: Run) -> dict:
        if run.run_id == victim:
            raise RuntimeError("restore failed:\nCRIU said no")
        return fake_measure(run)

    g, path, log = run_tiny(tmp_path, flaky)
    _, rows = read_csv(path)
    assert len(rows) == len(g.runs())
    failed = [r for r in rows if r["status"] == "failed"]
    assert [r["run_id"] for r in failed] == [victim]
    assert failed[0]["error"] == "RuntimeError: restore failed: | CRIU said no"
    assert failed[0]["total_s"] == ""
    assert "FAILED (RuntimeError: restore failed: | CRIU said no)" in log


def test_runs_failing_in_a_row_stop_the_grid(tmp_path: Path) -> None:
    def broken(run: Run) -> dict:
        raise ConnectionError("nodeB's agent does not answer")

    with pytest.raises(runner.GridAborted, match="3 runs failed in a row.*does not answer"):
        run_tiny(tmp_path, broken)
    _, rows = read_csv(tmp_path / "out" / runner.RUNS_CSV)
    assert len(rows) == runner.MAX_CONSECUTIVE_FAILURES


@pytest.mark.parametrize(("returned", "expected"), [
    ({"total_s": 1.0, "downtime": 0.2}, "unknown columns downtime"),
    ({"status": "ok"}, "unknown columns status"),
    ({"total_s": [1.0]}, "neither numbers nor strings: total_s=[1.0]"),
    ({"total_s": True}, "neither numbers nor strings: total_s=True")])
def test_a_driver_returning_what_the_csv_cannot_hold_fails_that_run(
        tmp_path: Path, returned: dict, expected: str) -> None:
    text = BASE.replace("repetitions = 3", "repetitions = 1").replace(
        '["traditional", "cooperative", "reference"]', '["traditional"]')
    with pytest.raises(runner.GridAborted):
        run_tiny(tmp_path, lambda run: returned, text=text)
    _, rows = read_csv(tmp_path / "out" / runner.RUNS_CSV)
    assert rows[0]["status"] == "failed" and expected in rows[0]["error"]


def test_resume_skips_finished_runs_and_runs_failed_ones_again(tmp_path: Path) -> None:
    g = load_grid(write_grid(tmp_path))
    runs = g.runs()
    stop_at, victim = runs[7].run_id, runs[2].run_id

    def interrupted(run: Run) -> dict:
        if run.run_id == stop_at:
            raise KeyboardInterrupt
        if run.run_id == victim:
            raise RuntimeError("once")
        return fake_measure(run)

    with pytest.raises(KeyboardInterrupt):
        run_tiny(tmp_path, interrupted)
    _, rows = read_csv(tmp_path / "out" / runner.RUNS_CSV)
    assert [r["run_id"] for r in rows] == [r.run_id for r in runs[:7]]
    with pytest.raises(MigctlError, match="exists: go on with --resume"):
        run_tiny(tmp_path)

    seen: list[str] = []
    _, path, log = run_tiny(tmp_path, lambda run: seen.append(run.run_id) or fake_measure(run),
                            resume=True)
    assert seen == [victim] + [r.run_id for r in runs[7:]]
    assert f"{len(runs)} runs, 6 done before, {len(runs) - 6} to go" in log
    _, rows = read_csv(path)
    assert len(rows) == len(runs) + 1  # the failed row stays, as a record
    assert {r["run_id"] for r in rows if r["status"] == "ok"} == {r.run_id for r in runs}


def test_resume_cuts_off_a_row_torn_by_a_crash(tmp_path: Path) -> None:
    text = BASE.replace("repetitions = 3", "repetitions = 1")
    runs = load_grid(write_grid(tmp_path, text)).runs()

    def one_then_stop(run: Run) -> dict:
        if run.run_id != runs[0].run_id:
            raise KeyboardInterrupt
        return fake_measure(run)

    with pytest.raises(KeyboardInterrupt):
        run_tiny(tmp_path, one_then_stop, text=text)
    path = tmp_path / "out" / runner.RUNS_CSV
    with path.open("a") as f:
        f.write(f"{runs[1].run_id},tiny,slow,100")  # no newline: the crash
    run_tiny(tmp_path, resume=True, text=text)
    _, rows = read_csv(path)
    assert [r["run_id"] for r in rows] == [r.run_id for r in runs]
    assert all(r["status"] == "ok" for r in rows)


def test_resume_refuses_another_grids_results(tmp_path: Path) -> None:
    run_tiny(tmp_path, text=BASE.replace("repetitions = 3", "repetitions = 1"))
    with pytest.raises(MigctlError, match="holds runs of grid tiny, not other"):
        run_tiny(tmp_path, resume=True, text=BASE.replace('name = "tiny"', 'name = "other"'))


def test_a_csv_with_other_columns_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "runs.csv"
    path.write_text("run_id,grid,total\n")
    with pytest.raises(MigctlError, match="missing: link, .*unknown: total"):
        columns.read_runs(path)


# -- statistics --------------------------------------------------------------------------


def test_median_and_interval_match_hand_computations() -> None:
    assert summary.median_ci([5.0, 1.0, 3.0]).median == 3.0
    assert summary.median_ci([4.0, 1.0, 3.0, 2.0]).median == 2.5
    assert summary.median_ci([7.0] * 5) == summary.Stat(5, 7.0, 7.0, 7.0)
    assert summary.median_ci([2.0]) == summary.Stat(1, 2.0, 2.0, 2.0)
    # Two values: a resample's median is a (1/4), their mean (1/2) or b (1/4), so the 5th
    # and 95th percentiles of 10 000 of them are a and b themselves.
    assert summary.median_ci([10.0, 20.0]) == summary.Stat(2, 15.0, 10.0, 20.0)
    # Three values: the median of a resample is 1 with p = 7/27 (two or three 1s), 3 alike.
    assert summary.median_ci([3.0, 1.0, 2.0]) == summary.Stat(3, 2.0, 1.0, 3.0)


def test_the_bootstrap_is_the_textbook_percentile_bootstrap() -> None:
    values = [round(v, 1) for v in np.random.default_rng(1).normal(30, 3, 25)]
    rng = np.random.default_rng(summary.BOOTSTRAP_SEED)
    medians = [np.median([values[i] for i in rng.integers(0, len(values), len(values))])
               for _ in range(summary.BOOTSTRAP_RESAMPLES)]
    stat = summary.median_ci(values)
    assert stat.median == sorted(values)[12]
    assert (stat.ci_low, stat.ci_high) == (np.percentile(medians, 5), np.percentile(medians, 95))
    assert (stat.ci_low, stat.ci_high) != (np.percentile(medians, 10), np.percentile(medians, 90))
    assert stat.ci_low < stat.median < stat.ci_high


def test_the_summary_of_a_tiny_grid(tmp_path: Path) -> None:
    run_tiny(tmp_path)
    out = tmp_path / "out"
    csv_path, md_path = summary.write_summary(out)
    _, rows = read_csv(csv_path)
    assert len(rows) == CELLS
    first = rows[0]
    assert (first["link"], first["workload"], first["size_mb"], first["mode"]) == \
        ("slow", "redis", "50", "traditional")
    assert [r["mode"] for r in rows[:3]] == ["traditional", "cooperative", "reference"]
    by_mode = {r["mode"]: r for r in rows[:3]}
    assert {m: float(r["total_s_median"]) for m, r in by_mode.items()} == \
        {"traditional": 11.0, "cooperative": 6.0, "reference": 25.0}
    trad, coop = by_mode["traditional"], by_mode["cooperative"]
    assert (float(trad["total_s_ci_low"]), float(trad["total_s_ci_high"])) == (10.0, 12.0)
    assert float(coop["total_s_vs_traditional"]) == 6.0 / 11.0
    assert float(trad["total_s_vs_traditional"]) == 1.0
    assert float(coop["bytes_from_source_vs_traditional"]) == 0.25
    assert trad["n"] == "3" and trad["n_failed"] == "0"
    assert trad["client_gap_s_median"] == "" and trad["client_gap_s_vs_traditional"] == ""
    md = md_path.read_text()
    assert "| slow | redis | 50 | cooperative | 3 | 0 | 6 [5, 7] ×0.55 | 0.5 [0.5, 0.5] ×1.00 " \
           "| – | 50 [50, 50] ×1.00 | 12.5 [12.5, 12.5] ×0.25 |" in md
    assert md.count("\n| ") == CELLS + 1


def test_the_summary_counts_failed_runs_apart(tmp_path: Path) -> None:
    def fails_reference_once(run: Run) -> dict:
        if (run.mode, run.link.name, run.size_mb, run.repetition) == ("reference", "slow", 50, 2):
            raise RuntimeError("rsync died")
        return fake_measure(run)

    run_tiny(tmp_path, fails_reference_once)
    cells = summary.summarize(columns.read_runs(tmp_path / "out" / runner.RUNS_CSV))
    ref = cells[2]
    assert (ref.key["mode"], ref.key["link"], ref.key["size_mb"]) == ("reference", "slow", "50")
    assert (ref.n, ref.n_failed) == (2, 1)
    assert ref.stats["total_s"] == summary.median_ci([20.0, 25.0])


# -- plots and the command line ------------------------------------------------------------


def test_plots_are_written_as_pngs(tmp_path: Path) -> None:
    run_tiny(tmp_path)
    paths = write_plots(tmp_path / "out")
    assert sorted(p.name for p in paths) == sorted(
        f"{kind}-{stem}.png" for kind in ("time", "bytes")
        for stem in ("redis-50mb", "redis-200mb", "volume-writer-1MBps-10mb"))
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_migctl_bench_run_summary_and_plots(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    grid_path, out = write_grid(tmp_path), tmp_path / "results"
    argv = ["bench", "run", str(grid_path), "--out", str(out),
            "--driver", "tests.test_evaluation:FakeDriver"]
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 0
    assert {"runs.csv", "summary.csv", "summary.md", "time-redis-50mb.png"} <= \
        {p.name for p in out.iterdir()}
    with pytest.raises(SystemExit) as again:
        cli.main(argv)
    assert again.value.code == 1
    assert "exists: go on with --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit) as resumed:
        cli.main([*argv, "--resume"])
    assert resumed.value.code == 0
    assert "54 done before, 0 to go" in capsys.readouterr().err
    (out / "summary.md").unlink()
    with pytest.raises(SystemExit):
        cli.main(["bench", "summary", str(out)])
    assert "| slow | redis | 50 | traditional | 3 | 0 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["bench", "plots", str(out)])
    assert str(out / "bytes-redis-200mb.png") in capsys.readouterr().out


@pytest.mark.parametrize(("driver", "expected"), [
    ("no_such_module:X", "cannot import no_such_module"),
    ("migctl.lab.evaluation.driver:Nothing", "migctl.lab.evaluation.driver has no Nothing"),
    ("LabDriver", "write MODULE:NAME")])
def test_migctl_bench_run_names_a_driver_it_cannot_use(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], driver: str, expected: str) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["bench", "run", str(write_grid(tmp_path)), "--out", str(tmp_path / "o"),
                  "--driver", driver])
    assert done.value.code == 1
    assert expected in capsys.readouterr().err


def test_the_reference_pulls_a_file_whose_size_and_mtime_did_not_change(tmp_path: Path) -> None:
    """A final checkpoint's pages often keep the first's size and second: rsync's quick check
    would keep the first's (the reference restored stale memory, 3 runs in 16)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    pages = src / "pages-1.img"
    pages.write_bytes(b"first checkpoint" * 256)
    os.utime(pages, ns=(1_700_000_000_000_000_000,) * 2)
    subprocess.run([*RSYNC, f"{src}/", str(dst)], check=True, capture_output=True)
    pages.write_bytes(b"final checkpoint" * 256)
    os.utime(pages, ns=(1_700_000_000_000_000_000,) * 2)
    subprocess.run([*RSYNC, f"{src}/", str(dst)], check=True, capture_output=True)
    assert (dst / "pages-1.img").read_bytes() == pages.read_bytes()
