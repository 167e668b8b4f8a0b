"""Benchmark the delta engine against rsync, and one gRPC stream against a raw socket.

Not a test: it prints numbers measured on this machine, in one run, side by side.

    .venv/bin/python bench/delta_bench.py [--size-mib 256] [--workdir DIR] [--repeat 3]
    .venv/bin/python bench/delta_bench.py --mode processes --repeat 5

Pairs (basis -> new), built from a fixed seed:
  changed    1 % of the 4 KiB pages rewritten at random + a 100-byte insertion and a 100-byte
             deletion (bench/delta_data.py's edit)
  identical  a byte-for-byte copy of the basis
  different  unrelated random data of the same size

Both tools rebuild the new file over a destination that already holds the basis, in the
page cache (files were just written; ``sync`` runs before every timed step).  rsync runs as
``rsync --no-whole-file -I --stats -B 4096 NEW DEST`` (a local copy otherwise skips the delta
algorithm).  For the engine, end to end (e2e) = the delta generator consumed directly by an
in-place patch in one thread, so delta and patch times add up; the signature is made before
the container freezes, so it is reported on its own.  Both tools pay the kernel's cost of
replacing a 256 MiB file (freeing the old one); "->new" shows the engine writing to a new
path instead.  An identical pair patched in place is a verified no-op for the engine (the
file already holds the result), while rsync -I rewrites it: see the ->new column for the cost
of really writing it.  Each timing is the median of --repeat runs, rsync and engine runs
interleaved.
Peak delta memory runs the delta step in a child process and reads its peak RSS (VmHWM, reset
after setup) minus its RSS before the delta; mapped file pages still resident count against us.

--mode processes measures what a user of the commands meets, start-up included.  Rows: every
kind of bench/delta_data.py (random, and content that is repetitive or crafted so that weak sums
collide) with the same edit as "changed", plus "colliding-sig": the random pair with a signature
whose weak sums a hostile receiver set all to one value.  In each of --repeat rounds, per row
and one after the other on a destination freshly copied from the basis (``sync`` before every
timed step): ``rsync --no-whole-file -I --stats -B 4096 NEW DEST``; then ``migctl-delta
delta SIG NEW DELTA`` and ``migctl-delta patch DEST DELTA DEST`` (the console script the venv
installed, run on this worktree's code, bytecode cached; ``python -m migctl.agent.delta`` where no
script is installed); then rdiff's ``delta`` and ``patch``
into a new file renamed over DEST (rdiff cannot patch in place), if rdiff is installed.  Both
signatures are made before the timed steps (the engine's before the container freezes).
Reported: medians of the rounds; delta+patch against rsync's wall time and bytes sent, each row
against the random row, and the peak RSS of every engine step from GNU time.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import numpy as np
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.delta_data import KINDS, basis_of, colliding_signature, edited  # noqa: E402
from migctl.agent.delta import (  # noqa: E402
    DeltaStats,
    delta_stream,
    make_signature,
    patch_stream,
)

MIB = 1 << 20
SEED = 20240611


# -- data -------------------------------------------------------------------------------------


def _write_random(path: Path, size: int, rng: np.random.Generator) -> None:
    with open(path, "wb") as f:
        for off in range(0, size, 16 * MIB):
            f.write(rng.integers(0, 256, min(16 * MIB, size - off), dtype=np.uint8).tobytes())


def build_files(workdir: Path, size: int) -> dict[str, Path]:
    rng = np.random.default_rng(SEED)
    basis = workdir / "basis.bin"
    _write_random(basis, size, rng)
    identical = workdir / "identical.bin"
    shutil.copyfile(basis, identical)
    different = workdir / "different.bin"
    _write_random(different, size, rng)

    changed = workdir / "changed.bin"
    edited(np.fromfile(basis, dtype=np.uint8), rng).tofile(changed)
    return {"basis": basis, "changed": changed, "identical": identical, "different": different}


def file_hash(path: Path) -> bytes:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MIB):
            h.update(chunk)
    return h.digest()


def fresh_dest(basis: Path, dest: Path) -> None:
    """Destination holding the basis, written to disk so writeback does not skew timings."""
    if dest.exists():
        dest.unlink()
    shutil.copyfile(basis, dest)
    os.sync()


# -- rsync --------------------------------------------------------------------------------------


def run_rsync(new: Path, dest: Path) -> tuple[float, int, int]:
    cmd = ["rsync", "--no-whole-file", "-I", "--stats", "-B", "4096", str(new), str(dest)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    elapsed = time.perf_counter() - t0
    sent = int(re.search(r"Total bytes sent: ([\d,]+)", out).group(1).replace(",", ""))
    received = int(re.search(r"Total bytes received: ([\d,]+)", out).group(1).replace(",", ""))
    return elapsed, sent, received


# -- engine -------------------------------------------------------------------------------------


def run_engine(new: Path, dest: Path, basis: Path) -> dict[str, float]:
    """Time each role alone, then delta -> patch pipelined through a generator (end to end)."""
    fresh_dest(basis, dest)
    t0 = time.perf_counter()
    sig = make_signature(dest)
    t_sig = time.perf_counter() - t0
    sig_bytes = sum(len(c) for c in sig.to_chunks())
    os.sync()
    stats = DeltaStats()
    t0 = time.perf_counter()
    for _chunk in delta_stream(sig, new, stats=stats):  # streamed and dropped, as over gRPC
        pass
    t_delta = time.perf_counter() - t0
    chunks = list(delta_stream(sig, new))
    os.sync()
    t0 = time.perf_counter()
    patch_stream(dest, chunks, dest)
    t_patch = time.perf_counter() - t0

    elsewhere = dest.with_name(dest.name + ".new")
    fresh_dest(basis, dest)
    t0 = time.perf_counter()
    patch_stream(dest, chunks, elsewhere)  # basis kept: every byte of the result is written
    t_patch_new = time.perf_counter() - t0
    elsewhere.unlink()
    del chunks

    fresh_dest(basis, dest)
    t0 = time.perf_counter()
    patch_stream(dest, delta_stream(sig, new), dest)  # one thread: delta + patch
    t_e2e = time.perf_counter() - t0
    return {
        "sig": t_sig,
        "sig_bytes": sig_bytes,
        "delta": t_delta,
        "patch": t_patch,
        "patch_new": t_patch_new,
        "e2e": t_e2e,
        "wire": stats.wire_bytes,
        "literal": stats.literal_bytes,
        "matched": stats.matched_bytes,
    }


_MEMORY_CHILD = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, sys.argv[1])
    from migctl.agent.delta import Signature, delta_stream

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    with open(sys.argv[2], "rb") as f:
        sig = Signature.from_chunks(iter(lambda: f.read(1 << 20), b""))
    for chunk in delta_stream(sig, sys.argv[3]):  # warm-up: imports, lazy tables, allocator
        pass
    reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        reset = False
    before = status("VmRSS")
    wire = 0
    for chunk in delta_stream(sig, sys.argv[3]):
        wire += len(chunk)
    print(status("VmHWM") - before, int(reset), wire)
    """
)


def delta_peak_memory(sig_path: Path, new: Path) -> tuple[int, bool]:
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, root, str(sig_path), str(new)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return int(out[0]), bool(int(out[1]))


# -- gRPC vs socket -------------------------------------------------------------------------------


def grpc_throughput(total: int, msg: int = MIB) -> float:
    import grpc

    payload = os.urandom(msg)
    count = total // msg
    limits = [
        ("grpc.max_send_message_length", 16 * MIB),
        ("grpc.max_receive_message_length", 16 * MIB),
    ]

    def pull(request: bytes, context: grpc.ServicerContext):
        for _ in range(int(request.decode())):
            yield payload

    handler = grpc.method_handlers_generic_handler(
        "bench.Bulk",
        {"Pull": grpc.unary_stream_rpc_method_handler(pull)},  # None serializers = raw bytes
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=limits)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=limits) as channel:
            call = channel.unary_stream("/bench.Bulk/Pull")
            received = sum(len(m) for m in call(b"4"))  # warm-up: connection, HTTP/2 windows
            t0 = time.perf_counter()
            received = sum(len(m) for m in call(str(count).encode()))
            elapsed = time.perf_counter() - t0
    finally:
        server.stop(None)
    assert received == count * msg
    return received / elapsed


def socket_throughput(total: int, msg: int = MIB) -> float:
    payload = os.urandom(msg)
    count = total // msg
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            for _ in range(count):
                conn.sendall(payload)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    buf = bytearray(msg)
    view = memoryview(buf)
    received = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        t0 = time.perf_counter()
        while received < count * msg:
            n = sock.recv_into(view)
            if not n:
                break
            received += n
        elapsed = time.perf_counter() - t0
    thread.join()
    listener.close()
    assert received == count * msg
    return received / elapsed


# -- processes: the commands as a user runs them ---------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).with_name("migctl-delta")
ENGINE = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "migctl.agent.delta"]
GNU_TIME = "/usr/bin/time" if os.path.exists("/usr/bin/time") else None
PROCESS_ROWS = (*KINDS, "colliding-sig")
"""``colliding-sig``: the random pair, with a signature whose weak sums a hostile receiver
set all to one value."""


def timed(cmd: list[str], log: Path) -> tuple[float, int, str]:
    """Wall time and peak RSS (bytes; -1 without GNU time) of one command, start-up included,
    and its output.  The RSS comes from GNU time, whose child is forked from a small process:
    a child forked from this one would count this one's pages until its exec."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(ROOT)  # as installed: bytecode cached, the worktree's code
    rss_file = log.with_suffix(".rss")
    if GNU_TIME:
        cmd = [GNU_TIME, "-f", "%M", "-o", str(rss_file), *cmd]
    with open(log, "w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        elapsed = time.perf_counter() - t0
        out.seek(0)
        text = out.read()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {text}")
    rss = int(rss_file.read_text().split()[-1]) * 1024 if GNU_TIME else -1
    return elapsed, rss, text


def build_row(workdir: Path, row: str, size: int) -> tuple[Path, Path]:
    kind = "random" if row == "colliding-sig" else row
    rng = np.random.default_rng(SEED)
    basis = basis_of(kind, size, rng)
    basis_path, new_path = workdir / f"{kind}.basis", workdir / f"{kind}.new"
    if not new_path.exists():
        basis.tofile(basis_path)
        edited(basis, rng).tofile(new_path)
    return basis_path, new_path


def engine_signature(row: str, basis: Path, sig_path: Path) -> None:
    """The receiver's signature (made before the freeze, so not in the delta's time)."""
    sig = make_signature(basis)
    if row == "colliding-sig":
        sig = colliding_signature(sig, int(sig.weak[0]))
    with open(sig_path, "wb") as f:
        for chunk in sig.to_chunks():
            f.write(chunk)


def one_process_run(workdir: Path, basis: Path, new: Path, want: bytes) -> dict[str, float]:
    """rsync, the engine's commands and rdiff's, one after the other on the same pair."""
    dest, log = workdir / "dest.bin", workdir / "log.txt"
    sig, delta = workdir / "engine.sig", workdir / "engine.delta"
    r: dict[str, float] = {}
    fresh_dest(basis, dest)
    r["rsync"], r["rsync_rss"], out = timed(
        ["rsync", "--no-whole-file", "-I", "--stats", "-B", "4096", str(new), str(dest)], log
    )
    r["rsync_sent"] = int(re.search(r"Total bytes sent: ([\d,]+)", out).group(1).replace(",", ""))
    assert file_hash(dest) == want, "rsync output differs"

    fresh_dest(basis, dest)
    r["delta"], r["delta_rss"], _ = timed([*ENGINE, "delta", str(sig), str(new), str(delta)], log)
    os.sync()
    r["patch"], r["patch_rss"], _ = timed([*ENGINE, "patch", str(dest), str(delta), str(dest)], log)
    r["delta_bytes"] = delta.stat().st_size
    assert file_hash(dest) == want, "engine output differs"

    if shutil.which("rdiff"):
        rsig, rdelta, rnew = workdir / "rdiff.sig", workdir / "rdiff.delta", workdir / "rdiff.new"
        fresh_dest(basis, dest)
        rdiff = ["rdiff", "--force"]  # overwrite the previous run's files
        timed([*rdiff, "signature", "-b", "4096", str(dest), str(rsig)], log)
        os.sync()
        r["rdiff_delta"], _, _ = timed([*rdiff, "delta", str(rsig), str(new), str(rdelta)], log)
        os.sync()
        r["rdiff_patch"], _, _ = timed([*rdiff, "patch", str(dest), str(rdelta), str(rnew)], log)
        t0 = time.perf_counter()
        os.replace(rnew, dest)  # like rsync and the engine: the new file takes DEST's place
        r["rdiff_patch"] += time.perf_counter() - t0
        r["rdiff_bytes"] = rdelta.stat().st_size
        assert file_hash(dest) == want, "rdiff output differs"
    return r


def identical_vs_cp(workdir: Path, basis: Path, repeat: int) -> tuple[float, float]:
    """Patching an unchanged file into a new path against ``cp`` of it, medians."""
    sig, delta, out = workdir / "id.sig", workdir / "id.delta", workdir / "id.out"
    engine_signature("identical", basis, sig)
    timed([*ENGINE, "delta", str(sig), str(basis), str(delta)], workdir / "log.txt")
    patch_t, cp_t = [], []
    for _ in range(repeat):
        for times, cmd in (
            (patch_t, [*ENGINE, "patch", str(basis), str(delta), str(out)]),
            (cp_t, ["cp", str(basis), str(out)]),
        ):
            out.unlink(missing_ok=True)
            os.sync()
            times.append(timed(cmd, workdir / "log.txt")[0])
    out.unlink(missing_ok=True)
    return statistics.median(patch_t), statistics.median(cp_t)


def report_processes(workdir: Path, size: int, args: argparse.Namespace) -> int:
    has_rdiff = shutil.which("rdiff") is not None
    if not has_rdiff:
        print("rdiff (librsync) is not installed: its columns are left out", file=sys.stderr)
    rows: dict[str, list[dict[str, float]]] = {}
    for row in PROCESS_ROWS:
        print(f"{row}: building {args.size_mib} MiB pair ...", flush=True)
        basis, new = build_row(workdir, row, size)
        engine_signature(row, basis, workdir / "engine.sig")
        want = file_hash(new)
        rows[row] = [one_process_run(workdir, basis, new, want) for _ in range(args.repeat)]
        if row not in ("random", "colliding-sig"):
            basis.unlink()
            new.unlink()
    patch_id, cp_id = identical_vs_cp(workdir, workdir / "random.basis", args.repeat)

    med = {row: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
           for row, runs in rows.items()}
    for row, runs in rows.items():
        med[row]["engine"] = statistics.median(r["delta"] + r["patch"] for r in runs)
        if has_rdiff:
            med[row]["rdiff"] = statistics.median(r["rdiff_delta"] + r["rdiff_patch"] for r in runs)
    base = med["random"]["engine"]
    print()
    print(
        f"processes, {args.size_mib} MiB, block 4096, {os.cpu_count()} CPUs, "
        f"median of {args.repeat} interleaved runs"
    )
    head = (
        "| pair | rsync s | rdiff s | delta s | patch s | delta+patch s | x rsync | x random "
        "| delta B | rsync sent B | B x rsync | rdiff delta B | peak MiB |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for row, m in med.items():
        peak = max(max(r["delta_rss"], r["patch_rss"]) for r in rows[row]) / MIB
        rdiff_t = f"{m['rdiff']:.3f}" if has_rdiff else "-"
        rdiff_b = f"{int(m['rdiff_bytes']):,}" if has_rdiff else "-"
        print(
            f"| {row} | {m['rsync']:.3f} | {rdiff_t} | {m['delta']:.3f} | {m['patch']:.3f} "
            f"| {m['engine']:.3f} | {m['engine'] / m['rsync']:.2f} | {m['engine'] / base:.2f} "
            f"| {int(m['delta_bytes']):,} | {int(m['rsync_sent']):,} "
            f"| {m['delta_bytes'] / m['rsync_sent']:.3f} | {rdiff_b} | {peak:.1f} |"
        )
    print(f"\nidentical file patched to a new path: {patch_id:.3f} s; cp of it: {cp_id:.3f} s")
    print(
        "all runs, delta+patch / rsync (s): "
        + "; ".join(
            f"{row}: {[round(r['delta'] + r['patch'], 3) for r in runs]} / "
            f"{[round(r['rsync'], 3) for r in runs]}"
            for row, runs in rows.items()
        )
    )
    r = med["random"]
    peak_all = max(max(x["delta_rss"], x["patch_rss"]) for runs in rows.values() for x in runs)
    checks = [
        ("random: delta + patch <= 0.7 x rsync wall", r["engine"] <= 0.7 * r["rsync"]),
        ("random: bytes <= 1.05 x rsync sent", r["delta_bytes"] <= 1.05 * r["rsync_sent"]),
        *(
            (f"{row}: <= 2 x random", med[row]["engine"] <= 2 * base)
            for row in med
            if row != "random"
        ),
        ("peak memory of each step <= 128 MiB (all pairs)", peak_all <= 128 * MIB),
    ]
    print("\ntargets:")
    for label, ok in checks:
        print(f"  [{'met' if ok else 'MISSED'}] {label}")
    return 0


# -- report -------------------------------------------------------------------------------------


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def measure(fn: Callable[[], dict[str, float]], repeat: int) -> list[dict[str, float]]:
    return [fn() for _ in range(repeat)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--grpc-mib", type=int, default=2048, help="bytes to stream, in MiB")
    parser.add_argument(
        "--mode",
        choices=("inprocess", "processes"),
        default="inprocess",
        help="processes: time the commands as a user runs them, next to rsync and rdiff",
    )
    args = parser.parse_args()
    if shutil.which("rsync") is None:
        print("rsync is not installed (apt-get install -y rsync)", file=sys.stderr)
        return 2
    size = args.size_mib * MIB
    workdir = Path(tempfile.mkdtemp(prefix="delta-bench-", dir=args.workdir))
    try:
        if args.mode == "processes":
            return report_processes(workdir, size, args)
        return report(workdir, size, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def report(workdir: Path, size: int, args: argparse.Namespace) -> int:
    print(f"building {args.size_mib} MiB files in {workdir} (seed {SEED}) ...", flush=True)
    files = build_files(workdir, size)
    basis = files["basis"]
    rows = []
    for name in ("changed", "identical", "different"):
        new = files[name]
        want = file_hash(new)
        dest_r = workdir / "dest-rsync" / new.name
        dest_r.parent.mkdir(exist_ok=True)
        dest_e = workdir / "dest-engine" / new.name
        dest_e.parent.mkdir(exist_ok=True)

        def one_rsync(new: Path = new, dest: Path = dest_r, want: bytes = want) -> dict:
            fresh_dest(basis, dest)
            t, sent, received = run_rsync(new, dest)
            assert file_hash(dest) == want, "rsync output differs"
            return {"time": t, "sent": sent, "received": received}

        def one_engine(new: Path = new, dest: Path = dest_e, want: bytes = want) -> dict:
            result = run_engine(new, dest, basis)
            assert file_hash(dest) == want, "engine output differs"
            return result

        r_runs, e_runs = [], []
        for _ in range(args.repeat):  # interleaved so both see the same machine state
            r_runs.append(one_rsync())
            e_runs.append(one_engine())
        sig_path = workdir / "basis.sig"
        with open(sig_path, "wb") as f:
            for chunk in make_signature(basis).to_chunks():
                f.write(chunk)
        peak, reset = delta_peak_memory(sig_path, new)
        rows.append((name, r_runs, e_runs, peak, reset))

    print()
    print(f"size {args.size_mib} MiB, {os.cpu_count()} CPUs, median of {args.repeat} runs")
    head = (
        f"{'pair':10} {'rsync s':>7} {'sent B':>12} {'sig s':>6} {'delta s':>7} "
        f"{'patch s':>7} {'->new s':>7} {'e2e s':>6} {'wire B':>12} {'time x':>6} "
        f"{'bytes x':>7} {'e2e GB/s':>8} {'->new GB/s':>10} {'rsync GB/s':>10} {'peak MiB':>8}"
    )
    print(head)
    print("-" * len(head))
    summary = {}
    for name, r_runs, e_runs, peak, _reset in rows:
        t_r = median(r_runs, "time")
        sent = int(median(r_runs, "sent"))
        t_d = median(e_runs, "delta")
        t_e = median(e_runs, "e2e")
        t_new = statistics.median(r["delta"] + r["patch_new"] for r in e_runs)
        wire = int(median(e_runs, "wire"))
        e2e = size / t_e / 1e9
        summary[name] = (t_e / t_r, wire / sent, e2e, peak)
        print(
            f"{name:10} {t_r:7.3f} {sent:12,d} {median(e_runs, 'sig'):6.3f} {t_d:7.3f} "
            f"{median(e_runs, 'patch'):7.3f} {median(e_runs, 'patch_new'):7.3f} {t_e:6.3f} "
            f"{wire:12,d} {t_e / t_r:6.2f} {wire / sent:7.3f} {e2e:8.2f} "
            f"{size / t_new / 1e9:10.2f} {size / t_r / 1e9:10.2f} {peak / MIB:8.1f}"
        )
    print(
        "\nall runs (s): "
        + "; ".join(
            f"{name}: rsync {[round(r['time'], 3) for r in r_runs]} "
            f"e2e {[round(r['e2e'], 3) for r in e_runs]}"
            for name, r_runs, e_runs, _, _ in rows
        )
    )
    print(
        "columns: patch = in place over DEST (like rsync, old inode freed inside the timing); "
        "->new = patch into a new file, basis kept; e2e = delta streamed straight into an "
        "in-place patch in the same thread; time x = e2e / rsync; "
        "->new GB/s = size / (delta + ->new)"
    )
    e0 = rows[0][2][0]
    print(
        f"\nsignature: {int(e0['sig_bytes']):,} B for the basis "
        f"(rsync received {int(median(rows[0][1], 'received')):,} B of block sums)"
    )
    print(f"changed pair: literal {int(e0['literal']):,} B, matched {int(e0['matched']):,} B")
    if not rows[0][4]:
        print("note: could not reset VmHWM; peak memory includes the child's setup")

    total = args.grpc_mib * MIB
    g = grpc_throughput(total)
    s = socket_throughput(total)
    print(
        f"\nloopback, {args.grpc_mib} MiB in 1 MiB messages: gRPC stream {g / 1e9:.2f} GB/s, "
        f"raw TCP socket {s / 1e9:.2f} GB/s, gRPC/socket {g / s:.2f}"
    )

    checks = [
        ("changed: delta+patch <= 0.7 x rsync time", summary["changed"][0] <= 0.7),
        ("changed: wire bytes <= 1.05 x rsync bytes sent", summary["changed"][1] <= 1.05),
        ("identical: >= 2 GB/s end to end", summary["identical"][2] >= 2.0),
        ("different: >= 0.4 GB/s end to end", summary["different"][2] >= 0.4),
        (
            "delta peak memory <= 128 MiB (all pairs)",
            max(v[3] for v in summary.values()) <= 128 * MIB,
        ),
        ("one gRPC stream >= 1 GB/s on loopback", g >= 1e9),
    ]
    print("\ntargets:")
    for label, ok in checks:
        print(f"  [{'met' if ok else 'MISSED'}] {label}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
