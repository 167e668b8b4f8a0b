"""rdiff-like command line, for debugging transfers by hand and for scripts.

    python -m agent.delta signature BASIS SIG
    python -m agent.delta delta SIG NEW DELTA
    python -m agent.delta patch BASIS DELTA OUT

Exit codes: 0 ok, 1 the delta or signature failed verification, 2 usage or I/O error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import BinaryIO

from agent.delta import DeltaStats, Signature, delta_stream, make_signature, patch_stream
from agent.delta.signature import DEFAULT_BLOCK_SIZE
from agent.errors import DeltaError

_READ = 1 << 20


def _read_chunks(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(_READ):
        yield chunk


def _write_atomically(path: str, chunks: Iterator[bytes]) -> int:
    """Write beside ``path`` and rename, so a failed run leaves no half-written output."""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agent.delta", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("signature", help="write the signature of BASIS to SIG")
    p.add_argument("basis")
    p.add_argument("sig")
    p.add_argument("-b", "--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    p = sub.add_parser("delta", help="write the delta from SIG's basis to NEW into DELTA")
    p.add_argument("sig")
    p.add_argument("new")
    p.add_argument("delta")
    p = sub.add_parser("patch", help="apply DELTA to BASIS, producing OUT")
    p.add_argument("basis")
    p.add_argument("delta")
    p.add_argument("out")
    args = parser.parse_args(argv)
    try:
        if args.command == "signature":
            sig = make_signature(args.basis, args.block_size)
            size = _write_atomically(args.sig, sig.to_chunks())
            print(f"signature: {sig.block_count} blocks of {sig.block_size} B, {size} B")
        elif args.command == "delta":
            with open(args.sig, "rb") as f:
                sig = Signature.from_chunks(_read_chunks(f))
            stats = DeltaStats()
            _write_atomically(args.delta, delta_stream(sig, args.new, stats=stats))
            print(f"delta: {_summary(stats)}")
        else:
            with open(args.delta, "rb") as f:
                stats = patch_stream(args.basis, _read_chunks(f), args.out)
            print(f"patch: {_summary(stats)}")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
