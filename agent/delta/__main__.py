"""migctl-delta: rdiff's verbs (signature, delta, patch) for scripts and for use by hand.

    migctl-delta signature [-b BLOCK] BASIS [SIG]
    migctl-delta delta SIG NEW [DELTA]
    migctl-delta patch BASIS DELTA OUT

As with rdiff, a missing or ``-`` SIG or DELTA is standard output when written and standard
input when read; ``-s`` prints statistics on standard error.  Exit codes: 0 ok, 1 the delta or
signature failed verification, 2 usage or I/O error.  It loads neither grpc nor docker, and
numpy only where the work needs it (a signature, a delta with many edits), so it starts in a
few tens of milliseconds.
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import sys
from collections.abc import Iterable, Iterator

from migctl.agent.delta import DeltaStats, Signature, delta_stream, make_signature, patch_stream
from migctl.agent.delta.signature import DEFAULT_BLOCK_SIZE
from migctl.agent.version import VersionAction
from migctl.common.errors import DeltaError

_READ = 1 << 20
STDIO = "-"


def _read_chunks(path: str) -> Iterator[bytes]:
    if path == STDIO:
        yield from _chunks_of(sys.stdin.buffer)
        return
    with open(path, "rb") as f:
        yield from _chunks_of(f)


def _chunks_of(f: io.BufferedIOBase) -> Iterator[bytes]:
    while chunk := f.read(_READ):
        yield chunk


def _write(path: str, chunks: Iterable[bytes]) -> int:
    """Write to standard output, or beside ``path`` and rename, so a failed run leaves no
    half-written output."""
    if path == STDIO:
        out = sys.stdout.buffer
        total = 0
        for chunk in chunks:
            out.write(chunk)
            total += len(chunk)
        out.flush()
        return total
    tmp = f"{path}.tmp-{os.getpid()}"
    total = 0
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                total += len(chunk)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return total


def _summary(stats: DeltaStats) -> str:
    return (
        f"new {stats.new_size} B: matched {stats.matched_bytes} B, literal "
        f"{stats.literal_bytes} B, delta {stats.wire_bytes} B"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="migctl-delta", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action=VersionAction)
    parser.add_argument(
        "-s", "--statistics", action="store_true", help="print statistics on standard error"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("signature", help="write the signature of BASIS to SIG")
    p.add_argument("basis")
    p.add_argument("sig", nargs="?", default=STDIO)
    p.add_argument("-b", "--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    p = sub.add_parser("delta", help="write the delta from SIG's basis to NEW into DELTA")
    p.add_argument("sig")
    p.add_argument("new")
    p.add_argument("delta", nargs="?", default=STDIO)
    p = sub.add_parser("patch", help="apply DELTA to BASIS, producing OUT (atomically)")
    p.add_argument("basis")
    p.add_argument("delta")
    p.add_argument("out")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "signature":
            sig = make_signature(args.basis, args.block_size)
            size = _write(args.sig, sig.to_chunks())
            note = f"signature: {sig.block_count} blocks of {sig.block_size} B, {size} B"
        elif args.command == "delta":
            sig = Signature.from_chunks(_read_chunks(args.sig))
            stats = DeltaStats()
            _write(args.delta, delta_stream(sig, args.new, stats=stats))
            note = f"delta: {_summary(stats)}"
        else:
            stats = patch_stream(args.basis, _read_chunks(args.delta), args.out)
            note = f"patch: {_summary(stats)}"
    except DeltaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    if args.statistics:
        print(note, file=sys.stderr)
    return 0


def run() -> None:
    """The command's entry: a short-lived process that keeps no cycles needs neither the
    cyclic collector (~3 % of a delta's time) nor the interpreter's teardown (~10 ms)."""
    gc.disable()
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # a closed pipe: what could be said is lost either way
        code = code or 2
    os._exit(code)


if __name__ == "__main__":
    run()
