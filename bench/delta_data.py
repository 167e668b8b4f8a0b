"""Basis/new pairs for the delta engine's benchmark and tests: random data, and the repetitive
or crafted content that once made matching quadratic (memory images are full of zero pages and
allocator patterns; a hostile peer crafts whatever collides).

Every pair gets the same edit, so each kind's time compares with the random kind's.
"""

from __future__ import annotations

import numpy as np

from migctl.agent.delta.signature import Signature

PAGE = 4096
EDIT_BYTES = 100
KINDS = ("random", "zeros", "one-page", "few-pages", "half-zero", "colliding")
"""``colliding``: every page has the same weak sum (distinct contents), so an honest
signature of it is one where every weak sum collides."""


def basis_of(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    pages = size // PAGE
    if kind == "random":
        return rng.integers(0, 256, size, dtype=np.uint8)
    if kind == "zeros":
        return np.zeros(size, dtype=np.uint8)
    if kind == "one-page":
        return np.tile(rng.integers(0, 256, PAGE, dtype=np.uint8), pages)
    if kind == "few-pages":
        distinct = rng.integers(0, 256, (8, PAGE), dtype=np.uint8)
        return distinct[rng.integers(0, 8, pages)].reshape(-1)
    if kind == "half-zero":
        data = rng.integers(0, 256, size, dtype=np.uint8)
        data.reshape(pages, PAGE)[rng.choice(pages, pages // 2, replace=False)] = 0
        return data
    if kind == "colliding":
        return colliding_pages(pages, rng).reshape(-1)
    raise ValueError(f"unknown kind {kind!r}")


def colliding_pages(count: int, rng: np.random.Generator, moves: int = 32) -> np.ndarray:
    """COUNT distinct pages with one weak sum: a random page changed by balanced moves.

    +1 at i and -1 at i+1 keeps the byte sum and adds 1 to the weighted sum; as many moves
    the other way take it back, so both halves of rsync's weak sum stay what they were.
    """
    base = rng.integers(1, 255, PAGE, dtype=np.int16)
    out = np.empty((count, PAGE), dtype=np.uint8)
    for k in range(count):
        pairs = rng.choice(PAGE // 2, 2 * moves, replace=False) * 2
        sign = np.repeat(np.array([1, -1], dtype=np.int16), moves)
        page = base.copy()
        page[pairs] += sign
        page[pairs + 1] -= sign
        out[k] = page
    return out


def edited(basis: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """1 % of the pages rewritten at random, then an insertion and a deletion of 100 bytes."""
    data = basis.copy()
    pages = data.size // PAGE
    for p in rng.choice(pages, max(1, pages // 100), replace=False):
        data[p * PAGE : (p + 1) * PAGE] = rng.integers(0, 256, PAGE, dtype=np.uint8)
    at = data.size // 3 + int(rng.integers(0, PAGE))
    cut = 2 * data.size // 3 + int(rng.integers(0, PAGE))
    inserted = rng.integers(0, 256, EDIT_BYTES, dtype=np.uint8)
    return np.concatenate([data[:at], inserted, data[at:cut], data[cut + EDIT_BYTES :]])


def colliding_signature(sig: Signature, weak: int) -> Signature:
    """What a hostile receiver could send: the same blocks, every weak sum set to WEAK."""
    raw = int(weak).to_bytes(4, "little") * sig.block_count
    return Signature(sig.block_size, sig.basis_length, raw, sig.strong_raw, sig.basis_hash)
