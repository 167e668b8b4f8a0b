"""Weak (rolling) and strong checksums shared by the signature, match and patch roles.

The weak sum is rsync's: ``a = sum(x) mod 2^16``, ``b = sum((L - i) * x_i) mod 2^16``,
combined as ``a | b << 16``.  Both sides must compute it identically, so this module is the
single definition.  Everything is vectorised with numpy: per-block sums for signatures and
cumulative sums for "every byte offset at once" during the rolling search, because a Python
loop per byte would be ~1000x slower than rsync's C loop.
"""

from __future__ import annotations

import functools
import mmap
import threading

import numpy as np
import xxhash

BytesLike = bytes | bytearray | memoryview | mmap.mmap

STRONG_SIZE = 16
"""Bytes of one strong hash (xxh3_128)."""

strong_digest = xxhash.xxh3_128_digest
"""Strong hash of one block or of a whole file: fast (GB/s) and 128 bits wide."""

_U32 = np.uint32
_MASK16 = _U32(0xFFFF)


def rolling_weak(data: np.ndarray, block_size: int) -> np.ndarray:
    """Weak sums of every window ``data[k:k+L]``, for k in ``0..len(data)-L``.

    Uses two prefix sums so the cost is a handful of vector ops per byte instead of a loop:
    with ``A`` the prefix sum of bytes and ``AA`` the prefix sum of ``A``,
    ``a(k) = A[k+L] - A[k]`` and ``b(k) = AA[k+L] - AA[k] - L * A[k]``.  uint32 arithmetic
    wraps, which is harmless because only the low 16 bits of each half are kept.
    """
    n = int(data.shape[0])
    L = block_size
    if n < L:
        return np.empty(0, dtype=_U32)
    A = np.empty(n + 1, dtype=_U32)
    A[0] = 0
    np.cumsum(data, dtype=_U32, out=A[1:])
    AA = np.empty(n + 1, dtype=_U32)
    AA[0] = 0
    np.cumsum(A[1:], dtype=_U32, out=AA[1:])
    head = A[:-L]
    a = A[L:] - head
    b = AA[L:] - AA[:-L]
    b -= head * _U32(L)
    a &= _MASK16
    b <<= _U32(16)
    a |= b
    return a


def _group_size(block_size: int) -> int:
    """Largest group (<= 64) that divides the block and keeps float32 partial sums exact."""
    for g in (64, 32, 16, 8):
        if block_size % g == 0:
            return g
    return 0


def block_weak(blocks: np.ndarray) -> np.ndarray:
    """Weak sums of the rows of a ``(n, L)`` uint8 array (whole, aligned blocks).

    ``b`` needs a weighted sum; integer matmul in numpy is slow, so bytes are summed in
    groups of <= 64 with float32 BLAS, where every partial sum stays below 2^24 and is exact.
    Rows are taken ~1 MiB at a time so the float temporaries stay small and cache-resident.
    """
    n, L = blocks.shape
    out = np.empty(n, dtype=_U32)
    rows = max(1, (1 << 20) // max(L, 1))
    for i in range(0, n, rows):
        out[i : i + rows] = _block_weak(blocks[i : i + rows])
    return out


def _block_weak(blocks: np.ndarray) -> np.ndarray:
    n, L = blocks.shape
    a = blocks.sum(axis=1, dtype=_U32)
    g = _group_size(L)
    if g == 0:
        weights = np.arange(L, 0, -1, dtype=np.int64)
        b = (blocks.astype(np.int64) @ weights).astype(_U32)
    else:
        ng = L // g
        grouped = blocks.reshape(n * ng, g)
        inner = (grouped.astype(np.float32) @ np.arange(g, 0, -1, dtype=np.float32)).astype(_U32)
        sums = grouped.sum(axis=1, dtype=_U32).reshape(n, ng)
        offsets = (L - g * np.arange(1, ng + 1)).astype(_U32)
        b = inner.reshape(n, ng).sum(axis=1, dtype=_U32) + sums @ offsets
    return (a & _MASK16) | (b.astype(_U32) << _U32(16))


def weak_of(data: BytesLike) -> int:
    """Weak sum of one buffer of any length (one changed block, the basis's short tail)."""
    x = np.frombuffer(data, dtype=np.uint8)
    n = x.shape[0]
    a = int(x.sum(dtype=np.uint64))
    b = int(x @ _descending(n))
    return (a & 0xFFFF) | ((b & 0xFFFF) << 16)


@functools.cache
def _descending(n: int) -> np.ndarray:
    return np.arange(n, 0, -1, dtype=np.int64)


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
