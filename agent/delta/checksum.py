"""Strong checksums shared by the signature, match and patch roles.

No numpy here: the patch role and the start of a delta need only these, and importing numpy
costs a command more time (~0.15 s) than rebuilding a file with few changes.  The weak sums
live in :mod:`agent.delta.weak`.
"""

from __future__ import annotations

import mmap
import threading

import xxhash

BytesLike = bytes | bytearray | memoryview | mmap.mmap

STRONG_SIZE = 16
"""Bytes of one strong hash (xxh3_128)."""

strong_digest = xxhash.xxh3_128_digest
"""Strong hash of one block or of a whole file: fast (GB/s) and 128 bits wide."""

EMPTY_HASH = strong_digest(b"")


def strong_hashes(view: memoryview, start: int, count: int, block_size: int) -> bytes:
    """Concatenated strong hashes of ``count`` whole blocks starting at byte ``start``.

    One C call per block is the cheapest xxhash allows; the list comprehension keeps the
    per-block interpreter cost to a few hundred nanoseconds.
    """
    L = block_size
    return b"".join([strong_digest(view[p : p + L]) for p in range(start, start + count * L, L)])


def hash_mapped(mm: mmap.mmap, start: int = 0, end: int | None = None) -> xxhash.xxh3_128:
    """Streaming strong hash of a mapped range, dropping pages behind it to keep RSS flat."""
    end = len(mm) if end is None else end
    hasher = xxhash.xxh3_128()
    view = memoryview(mm)
    step = 8 << 20
    try:
        for off in range(start, end, step):
            stop = min(end, off + step)
            hasher.update(view[off:stop])
            release(mm, off, stop)
    finally:
        view.release()
    return hasher


def release(mm: mmap.mmap, start: int, end: int) -> None:
    """Forget mapped pages in ``[start, end)`` (page-aligned inwards); the page cache keeps them.

    Without this, touching a whole mapped file makes RSS grow to the file's size even though
    the memory is reclaimable, which hides real leaks and trips container memory limits.
    """
    page = mmap.PAGESIZE
    lo = -(-start // page) * page
    hi = (end // page) * page
    if hi > lo:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class HashInBackground(threading.Thread):
    """The whole-file hash of a mapped file on a thread of its own, overlapped with matching or
    rebuilding (xxhash drops the GIL): checking it costs almost nothing on 2 cores."""

    def __init__(self, mm: mmap.mmap) -> None:
        super().__init__(name="delta-hash", daemon=True)
        self._mm = mm
        self._digest: bytes | None = None
        self._error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self._digest = hash_mapped(self._mm).digest()
        except BaseException as exc:  # re-raised in the caller's thread by digest()
            self._error = exc

    def digest(self) -> bytes:
        self.join()
        if self._error is not None:
            raise self._error
        assert self._digest is not None
        return self._digest
