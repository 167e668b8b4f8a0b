"""Whole files as chunk streams, and digests that every transferred piece is checked against."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import xxhash

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


def write_stream(chunks: Iterable[bytes], path: Path) -> int:
    """Write CHUNKS to PATH atomically (temp file + rename); return the byte count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    total = 0
    try:
        with tmp.open("wb") as f:
            for data in chunks:
                f.write(data)
                total += len(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return total
