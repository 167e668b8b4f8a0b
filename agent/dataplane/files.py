"""Whole files as chunk streams, and digests that every transferred piece is checked against."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import xxhash

from migctl.common.errors import DeltaError

CHUNK = 1 << 20  # 1 MiB messages: large enough for throughput, far below the message limit


def iter_file(path: Path, chunk: int = CHUNK) -> Iterator[bytes]:
    with path.open("rb") as f:
        while data := f.read(chunk):
            yield data


def digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    for data in iter_file(path):
        h.update(data)
    return h.hexdigest()


def write_stream(chunks: Iterable[bytes], path: Path, max_bytes: int | None = None) -> int:
    """Write CHUNKS to PATH atomically (temp file + rename); return the byte count.

    A peer that sends more than MAX_BYTES (the size it announced) is stopped at the first
    chunk over: the temporary file is removed and PATH is never created.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    total = 0
    try:
        with tmp.open("wb") as f:
            for data in chunks:
                total += len(data)
                if max_bytes is not None and total > max_bytes:
                    raise DeltaError(f"{path.name}: the peer sent more than the {max_bytes} "
                                     "bytes announced")
                f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return total


def flush_writes() -> None:
    """Write back to disk what pre-copy wrote (snapshots, checkpoint images, volumes: up to
    gigabytes) while the container still runs. Left dirty, that writeback competes with the
    frozen window: with the journal's fsyncs, CRIU's dump and the final pass's writes."""
    os.sync()
