"""Strong checksums shared by the signature, match and patch roles.

No numpy here: the patch role and the start of a delta need only these, and importing numpy
costs a command more time (~0.15 s) than rebuilding a file with few changes.  The weak sums
live in :mod:`agent.delta.weak`.
"""

from __future__ import annotations

import mmap
import queue
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


_HASH_STEP = 8 << 20


def hash_mapped(
    mm: mmap.mmap, start: int = 0, end: int | None = None, hasher: xxhash.xxh3_128 | None = None
) -> xxhash.xxh3_128:
    """Streaming strong hash of a mapped range, dropping pages behind it to keep RSS flat."""
    end = len(mm) if end is None else end
    hasher = xxhash.xxh3_128() if hasher is None else hasher
    view = memoryview(mm)
    step = _HASH_STEP
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


class HashThread(threading.Thread):
    """The strong hash of ranges of a mapped file, given in order, on a thread of its own.
    xxhash releases the GIL while it hashes, so this runs on the other core."""

    def __init__(self, mm: mmap.mmap) -> None:
        super().__init__(name="delta-hash", daemon=True)
        self._mm = mm
        self._queue: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._hasher = xxhash.xxh3_128()
        self._error: BaseException | None = None
        self._cancelled = False
        self.start()

    def add_range(self, start: int, stop: int) -> None:
        """Hash ``mm[start:stop]`` next."""
        self._queue.put((start, stop))

    def run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                start, stop = item
                for off in range(start, stop, _HASH_STEP):
                    if self._cancelled:
                        break
                    hash_mapped(self._mm, off, min(stop, off + _HASH_STEP), self._hasher)
        except BaseException as exc:  # re-raised in the caller's thread by digest()
            self._error = exc
            while self._queue.get() is not None:
                pass

    def finish(self) -> None:
        """Stop once what was given is hashed (idempotent: callers' cleanup paths end here)."""
        if self.is_alive():
            self._queue.put(None)
            self.join()

    def cancel(self) -> None:
        """Stop after the current step: the stream was abandoned, and a peer that drops
        streams must not keep this node hashing whole files for nothing."""
        self._cancelled = True
        self.finish()

    def digest(self) -> bytes:
        self.finish()
        if self._error is not None:
            raise self._error
        if self._cancelled:
            raise RuntimeError("the hash was cancelled")
        return self._hasher.digest()


def hash_in_background(mm: mmap.mmap) -> HashThread:
    """The whole-file hash of a mapped file, overlapped with matching or rebuilding."""
    thread = HashThread(mm)
    thread.add_range(0, len(mm))
    return thread
