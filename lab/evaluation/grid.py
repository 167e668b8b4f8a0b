"""Grid files (TOML): what to measure, checked before anything runs, and expanded into runs.

A grid is link profiles × workloads × sizes × modes, each cell repeated. Every mistake is an
error naming the file, the key and the value, so a grid never half-runs on a typo.

    name = "quick"
    repetitions = 3
    seed = 7                     # the run order is reproducible
    nodes = 3                    # lab nodes needed (a neighbour for cooperative)
    modes = ["traditional", "cooperative", "reference"]
    compression = "zstd"         # the same on every side: migctl's wire and the reference's rsync

    [[links]]
    name = "edge-100"
    source_rate = "100mbit"      # tc's units: bit, kbit, mbit, gbit (kibit, mibit, ... too)
    neighbour_rate = "1gbit"     # optional: unshaped when absent
    loss = "0.1%"                # optional, on both shaped paths

    [[workloads]]
    kind = "volume-writer"       # redis | memory-writer | volume-writer | toy
    sizes_mb = [50, 200]         # Redis data, memory written, or volume size
    dirty_rate_mb_s = 1          # optional, writers only: MB written per second during the run
    name = "volume-1MBps"        # optional: the workload's label (default from kind and rate)
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migctl.client.api import read_toml
from migctl.common.errors import MigctlError

MODES = ("traditional", "cooperative", "reference")
KINDS = ("redis", "memory-writer", "volume-writer", "toy")
WRITER_KINDS = ("memory-writer", "volume-writer")
COMPRESSIONS = ("zstd", "none")
MIN_NODES = 2  # a source and a destination
MAX_NODES = 3  # the CSV has per-node columns for nodeA..nodeC
RUN_ID_LENGTH = 12  # hex digits of the parameters' hash: unique enough for any grid

# tc's rate units (tc(8), RATES), in bits per second. Its "bps" units are bytes per second.
RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
              "kibit": 2**10, "mibit": 2**20, "gibit": 2**30, "tibit": 2**40}
_RATE = re.compile(r"(\d+(?:\.\d+)?)([a-z]+)")
_LOSS = re.compile(r"(\d+(?:\.\d+)?)%")

TOP_KEYS = {"name", "repetitions", "seed", "nodes", "modes", "compression", "links",
            "workloads"}
LINK_KEYS = {"name", "source_rate", "neighbour_rate", "loss"}
WORKLOAD_KEYS = {"kind", "sizes_mb", "dirty_rate_mb_s", "name"}


class GridError(MigctlError):
    """A grid file that cannot be run as written."""


@dataclass(frozen=True)
class Link:
    name: str
    source_rate_bps: int
    neighbour_rate_bps: int | None  # None: the neighbour's path is not shaped
    loss_pct: float


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str
    sizes_mb: tuple[float, ...]
    dirty_rate_mb_s: float


@dataclass(frozen=True)
class Grid:
    path: Path
    name: str
    repetitions: int
    seed: int
    nodes: int
    modes: tuple[str, ...]
    compression: str
    links: tuple[Link, ...]
    workloads: tuple[Workload, ...]

    def runs(self) -> list[Run]:
        """Every run, in the order to run them: repetition by repetition, each a shuffle of
        all cells. Blocks keep every cell's repetitions spread over the whole grid, so a drift
        of the machine, or an interruption, favours no mode and no cell."""
        rng = random.Random(self.seed)
        cells = [(link, w, size, mode) for link in self.links for w in self.workloads
                 for size in w.sizes_mb for mode in self.modes]
        order = []
        for rep in range(1, self.repetitions + 1):
            block = [Run(self.name, link, w, size, mode, rep, self.compression)
                     for link, w, size, mode in cells]
            rng.shuffle(block)
            order += block
        return order


@dataclass(frozen=True)
class Run:
    """One migration to measure: what the driver gets."""

    grid: str
    link: Link
    workload: Workload
    size_mb: float
    mode: str
    repetition: int
    compression: str

    def params(self) -> dict[str, str | int | float | None]:
        """The run's parameters as CSV columns (all but the grid's name identify it)."""
        return {"link": self.link.name, "source_rate_bps": self.link.source_rate_bps,
                "neighbour_rate_bps": self.link.neighbour_rate_bps,
                "loss_pct": self.link.loss_pct, "workload": self.workload.name,
                "kind": self.workload.kind, "size_mb": self.size_mb,
                "dirty_rate_mb_s": self.workload.dirty_rate_mb_s, "mode": self.mode,
                "compression": self.compression, "repetition": self.repetition}

    @property
    def run_id(self) -> str:
        """Stable across runs of the harness, so that --resume recognises finished runs; it
        changes when any parameter does (a link's rate edited under the same name too)."""
        canon = json.dumps(self.params(), sort_keys=True)
        return hashlib.sha256(canon.encode()).hexdigest()[:RUN_ID_LENGTH]


def parse_rate(text: object) -> int:
    """A tc rate ("100mbit", "1.5gbit") in bits per second; ValueError says what is wrong."""
    if not isinstance(text, str):
        raise ValueError("a rate is a string with tc's units, e.g. \"100mbit\"")
    m = _RATE.fullmatch(text.lower())
    if not m:
        raise ValueError("a rate is a number and a unit with no space, e.g. \"100mbit\"")
    number, unit = m.groups()
    if unit.endswith("bps"):
        raise ValueError(f"in tc, {unit!r} means bytes per second: write bits, e.g. "
                         f"\"{number}{unit[:-3]}bit\" or 8 times the number")
    if unit not in RATE_UNITS:
        raise ValueError(f"unknown unit {unit!r} (known: {', '.join(RATE_UNITS)})")
    bps = round(float(number) * RATE_UNITS[unit])
    if bps <= 0:
        raise ValueError("a rate must be above 0")
    return bps


def parse_loss(text: object) -> float:
    """A loss ("0.5%") in percent, as tc netem writes it."""
    m = _LOSS.fullmatch(text) if isinstance(text, str) else None
    if not m or not float(m.group(1)) < 100:
        raise ValueError("a loss is a percentage below 100 in quotes, e.g. \"0.5%\"")
    return float(m.group(1))


class _Checker:
    """Reads values out of the parsed TOML; errors name the file and the key's full path."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, value: object, problem: str) -> GridError:
        return GridError(f"grid file {self.path}: {key} = {_toml(value)}: {problem}")

    def keys(self, table: dict[str, Any], known: set[str], where: str) -> None:
        for key in table:
            if key not in known:
                raise GridError(f"grid file {self.path}: unknown key {where}{key} "
                                f"(known: {', '.join(sorted(known))})")

    def required(self, table: dict[str, Any], key: str, where: str) -> Any:
        if key not in table:
            raise GridError(f"grid file {self.path}: {where}{key} is missing")
        return table[key]

    def string(self, value: object, key: str, choices: tuple[str, ...] = ()) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, value, "must be a non-empty string")
        if choices and value not in choices:
            raise self.fail(key, value, f"unknown; choose from {', '.join(choices)}")
        return value

    def integer(self, value: object, key: str, low: int, high: int | None = None) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(key, value, "must be a whole number")
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise self.fail(key, value, f"must be {bound}")
        return value

    def number(self, value: object, key: str, *, positive: bool) -> float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.fail(key, value, "must be a number")
        if value < 0 or (positive and value == 0):
            raise self.fail(key, value, "must be above 0" if positive else "must not be negative")
        return value

    def array(self, value: object, key: str) -> list[Any]:
        if not isinstance(value, list) or not value:
            raise self.fail(key, value, "must be a non-empty list")
        if len({json.dumps(v, sort_keys=True) for v in value}) != len(value):
            raise self.fail(key, value, "lists a value twice")
        return value

    def tables(self, value: object, key: str) -> list[dict[str, Any]]:
        if not isinstance(value, list) or not value or \
                not all(isinstance(v, dict) for v in value):
            raise GridError(f"grid file {self.path}: {key} must be one or more [[{key}]] tables")
        return value

    def unique_names(self, names: list[str], key: str) -> None:
        seen = set()
        for name in names:
            if name in seen:
                raise GridError(f"grid file {self.path}: two {key} are named {name!r} "
                              "(give each its own name = ...)")
            seen.add(name)


def _toml(value: object) -> str:
    return json.dumps(value) if isinstance(value, str | int | float | list) else repr(value)


def load_grid(path: Path) -> Grid:
    """The grid in PATH, checked through: a GridError names the file, the key and the value."""
    data = read_toml(path, "grid file", error=GridError)
    c = _Checker(path)
    c.keys(data, TOP_KEYS, "")
    modes = c.array(c.required(data, "modes", ""), "modes")
    for i, mode in enumerate(modes):
        c.string(mode, f"modes[{i}]", MODES)
    links = [_link(c, t, i) for i, t in
             enumerate(c.tables(c.required(data, "links", ""), "links"))]
    workloads = [_workload(c, t, i) for i, t in
                 enumerate(c.tables(c.required(data, "workloads", ""), "workloads"))]
    c.unique_names([link.name for link in links], "links")
    c.unique_names([w.name for w in workloads], "workloads")
    return Grid(path=path, name=c.string(c.required(data, "name", ""), "name"),
                repetitions=c.integer(c.required(data, "repetitions", ""), "repetitions", 1),
                seed=c.integer(data.get("seed", 0), "seed", 0),
                nodes=c.integer(data.get("nodes", MAX_NODES), "nodes", MIN_NODES, MAX_NODES),
                modes=tuple(modes),
                compression=c.string(data.get("compression", COMPRESSIONS[0]), "compression",
                                     COMPRESSIONS),
                links=tuple(links), workloads=tuple(workloads))


def _link(c: _Checker, t: dict[str, Any], i: int) -> Link:
    where = f"links[{i}]."
    c.keys(t, LINK_KEYS, where)
    rates = {}
    for key in ("source_rate", "neighbour_rate"):
        if key not in t and key == "neighbour_rate":
            rates[key] = None
            continue
        value = c.required(t, key, where)
        try:
            rates[key] = parse_rate(value)
        except ValueError as err:
            raise c.fail(where + key, value, str(err)) from None
    try:
        loss = parse_loss(t.get("loss", "0%"))
    except ValueError as err:
        raise c.fail(where + "loss", t["loss"], str(err)) from None
    return Link(name=c.string(c.required(t, "name", where), where + "name"),
                source_rate_bps=rates["source_rate"],  # type: ignore[arg-type]
                neighbour_rate_bps=rates["neighbour_rate"], loss_pct=loss)


def _workload(c: _Checker, t: dict[str, Any], i: int) -> Workload:
    where = f"workloads[{i}]."
    c.keys(t, WORKLOAD_KEYS, where)
    kind = c.string(c.required(t, "kind", where), where + "kind", KINDS)
    sizes = c.array(c.required(t, "sizes_mb", where), where + "sizes_mb")
    for j, size in enumerate(sizes):
        c.number(size, f"{where}sizes_mb[{j}]", positive=True)
    dirty = c.number(t.get("dirty_rate_mb_s", 0), where + "dirty_rate_mb_s", positive=False)
    if dirty and kind not in WRITER_KINDS:
        raise c.fail(where + "dirty_rate_mb_s", dirty,
                     f"only {' and '.join(WRITER_KINDS)} write at a set rate, not {kind}")
    default = f"{kind}-{dirty:g}MBps" if dirty else kind
    name = c.string(t.get("name", default), where + "name")
    return Workload(name=name, kind=kind, sizes_mb=tuple(map(_plain, sizes)),
                    dirty_rate_mb_s=_plain(dirty))


def _plain(x: float) -> float:
    """1.0 as 1: the same size written either way is the same run (and the same run id)."""
    return int(x) if float(x).is_integer() else x
