"""Traditional vs cooperative migration over shaped links (a benchmark, not a test).

The issue's scenario on the 3-node lab: the container passed through nodeC earlier (nodeC
holds the layers and an older snapshot of its volume, which has grown by 5 % since). Then the
links are shaped with tc inside the node namespaces: the source's uplink to 10 Mbit/s, the
neighbour's to 100 Mbit/s, and the container is migrated nodeA -> nodeB, once each way. The
figures that matter are the ratios cooperative / traditional measured in the same run.

    .venv/bin/python bench/coop_bench.py [--volume-mb 20] [--source-mbit 10] [--neighbour-mbit 100]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.lab import Lab  # noqa: E402
from client.workloads import remove_everywhere  # noqa: E402
from tests import test_cooperative as scenario  # noqa: E402
from tests.conftest import LabHandle, migrate_json  # noqa: E402


def shape(node: str, mbit: int | None) -> None:
    ns = ["ip", "netns", "exec", f"migctl-{node}", "tc", "qdisc"]
    subprocess.run([*ns, "del", "dev", "eth0", "root"], capture_output=True)
    if mbit:
        subprocess.run([*ns, "add", "dev", "eth0", "root", "tbf", "rate", f"{mbit}mbit",
                        "burst", "64kb", "latency", "400ms"], check=True)


def run(lab: LabHandle, mode: str, args: argparse.Namespace) -> dict:
    name = f"bench-{mode[:4]}"
    scenario.passed_through_c(lab, name)
    shape("nodeA", args.source_mbit)
    shape("nodeC", args.neighbour_mbit)
    try:
        report = migrate_json("--mode", mode, "--from", "nodeA", "--to", "nodeB", name)
    finally:
        shape("nodeA", None)
        shape("nodeC", None)
    remove_everywhere(lab.docker, [name], [f"{name}-rw", f"{name}-ro"])
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--volume-mb", type=int, default=20)
    p.add_argument("--source-mbit", type=int, default=10)
    p.add_argument("--neighbour-mbit", type=int, default=100)
    args = p.parse_args()
    scenario.VOLUME_MB = args.volume_mb
    lab = LabHandle(Lab().up(3))
    results = {mode: run(lab, mode, args) for mode in ("traditional", "cooperative")}

    print(f"\nshaped uplinks: source nodeA {args.source_mbit} Mbit/s, neighbour nodeC "
          f"{args.neighbour_mbit} Mbit/s; volume {args.volume_mb} MB (+5 % since nodeC's copy)")
    print(f"{'mode':<13}{'total s':>10}{'downtime s':>12}{'from source MB':>16}"
          f"{'from neighbours MB':>20}")
    row = {}
    for mode, r in results.items():
        src = scenario.from_node(r, "nodeA")
        other = sum(o["bytes"] for o in r["origins"] if o["node"] != "nodeA")
        row[mode] = (r["total_seconds"], r["downtime_seconds"], src)
        print(f"{mode:<13}{r['total_seconds']:>10.2f}{r['downtime_seconds']:>12.2f}"
              f"{src / 1e6:>16.2f}{other / 1e6:>20.2f}")
    t, c = row["traditional"], row["cooperative"]
    print(f"{'coop / trad':<13}{c[0] / t[0]:>10.2f}{c[1] / t[1]:>12.2f}{c[2] / t[2]:>16.3f}")


if __name__ == "__main__":
    main()
