"""Weak (rolling) checksums, vectorised with numpy, and the lookup the rolling search uses.

The weak sum is rsync's: ``a = sum(x) mod 2^16``, ``b = sum((L - i) * x_i) mod 2^16``,
combined as ``a | b << 16``.  Both sides must compute it identically, so this module is the
single definition.  Everything is vectorised: per-block sums for signatures and cumulative
sums for "every byte offset at once" during the rolling search, because a Python loop per
byte would be ~1000x slower than rsync's C loop.
"""

from __future__ import annotations

import functools

import numpy as np

from migctl.agent.delta.checksum import BytesLike

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


_MIX = np.uint32(0x9E3779B1)


class WeakFilter:
    """Which weak sums occur among a basis's whole blocks, asked for many offsets at once.

    Only distinct sums are kept, so a basis of repeated pages, or a crafted signature whose
    sums all collide, makes a small filter, not a long list to walk.  A hashed bitmap rules out
    most offsets; a sorted array of the distinct sums confirms the rest exactly.
    """

    def __init__(self, weak_raw: bytes, count: int) -> None:
        sums = np.unique(np.frombuffer(weak_raw, dtype="<u4", count=count).astype(_U32))
        bits = min(24, max(16, (max(sums.size, 1) * 16 - 1).bit_length()))
        self._shift = _U32(32 - bits)
        self._table = np.zeros(1 << bits, dtype=bool)
        self._table[(sums * _MIX) >> self._shift] = True
        self._sums = sums

    def hits(self, weak: np.ndarray) -> np.ndarray:
        """Indices into ``weak`` (ascending) whose sum occurs in the basis."""
        hit = np.flatnonzero(self._table[(weak * _MIX) >> self._shift])
        if hit.size:
            sums = weak[hit]
            at = np.minimum(np.searchsorted(self._sums, sums), self._sums.size - 1)
            hit = hit[self._sums[at] == sums]
        return hit


def rolling_hits(data: BytesLike, block_size: int, basis: WeakFilter) -> list[int]:
    """Offsets ``k`` of ``data`` whose window ``data[k:k+L]`` has a weak sum the basis has."""
    weak = rolling_weak(np.frombuffer(data, dtype=np.uint8), block_size)
    return basis.hits(weak).tolist()
