"""What migctl-runc adds to the engine's ordinary runc calls.

Not a test: it prints numbers measured on this machine, in one run.

    .venv/bin/python bench/runc_wrapper_bench.py [--calls 300]

Each call is a process, as containerd's shim makes them: `runc ARGS` and `migctl-runc ARGS`
are run alternately, --calls times each, and the medians are compared. ARGS are `--version`
(runc's cheapest call), `list` and `state` of a missing container under a scratch --root (an
ordinary call that reads runc's state), and a checkpoint call of a missing container with a
request staged for it (the wrapper's rewriting path; runc fails at once, so the figure is the
wrapper's own cost plus runc's start-up).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from migctl.agent.runtime.direct import WRAPPER


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=300)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, requests = Path(tmp) / "root", Path(tmp) / "requests"
        root.mkdir()
        requests.mkdir()
        cid = "f" * 64
        (requests / f"{cid}.checkpoint").write_text(f"{tmp}/images\n")
        env = dict(os.environ, MIGCTL_RUNC_DIR=str(requests))
        cases = {
            "--version": ["--version"],
            "list": ["--root", str(root), "list"],
            "state": ["--root", str(root), "state", cid],
            "checkpoint (staged)": ["--root", str(root), "checkpoint", "--image-path",
                                    f"{tmp}/engine", cid],
        }
        print(f"{args.calls} calls each, medians; machine: {os.cpu_count()} cores, "
              f"kernel {os.uname().release}")
        print(f"{'call':<22}{'runc ms':>10}{'wrapper ms':>12}{'added ms':>10}")
        for name, argv in cases.items():
            plain, wrapped = [], []
            for _ in range(args.calls):
                plain.append(timed(["runc", *argv], env))
                wrapped.append(timed([str(WRAPPER), *argv], env))
            a, b = statistics.median(plain) * 1e3, statistics.median(wrapped) * 1e3
            print(f"{name:<22}{a:>10.2f}{b:>12.2f}{b - a:>10.2f}")


if __name__ == "__main__":
    main()
