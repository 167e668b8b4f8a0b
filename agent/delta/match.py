"""Block matching (rsync's sender role): turn a new file plus a signature into a delta stream.

Strategy, cheapest first:

1. Whole file: same length and same xxh3_128 as the basis -> one COPY.
2. Predicted blocks: the new file is walked on a grid from the last match ("block ``j`` was
   at offset ``p``, so block ``j+1`` should be at ``p+L``"), starting aligned at 0.  A batch
   of up to 1024 blocks is strong-hashed and compared with the signature in one numpy call.
   In-place page changes and long shifted regions cost only this.
3. Rolling search, only where prediction failed: weak sums at every byte offset of a small
   window (numpy prefix sums), a bitmap + sorted-table lookup to keep candidates, the strong
   hash to confirm.  The first confirmed match re-anchors the prediction grid.
4. Giving up: when a probe of ``PROBE_BYTES`` finds nothing, data is sent as zstd literals
   and rolling probes back off exponentially (up to one per ``SKIP_MAX``), so unrelated
   files stream at compression speed while the grid check still catches resumed matches.

Only the mapping of the new file is touched, window by window, and pages behind the cursor
are dropped, so resident memory stays at a few MiB whatever the file size.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import numpy as np

from agent.delta.checksum import (
    STRONG_SIZE,
    HashInBackground,
    hash_mapped,
    release,
    rolling_weak,
    strong_digest,
    strong_hashes,
    weak_of,
)
from agent.delta.signature import EMPTY_HASH, Signature
from agent.delta.stats import DeltaStats
from agent.delta.wire import LITERAL_MAX, Header, WireWriter

BATCH_BLOCKS = 1024
"""Predicted blocks hashed per numpy comparison (4 MiB at 4 KiB blocks)."""
FIRST_WINDOW = 16 << 10
MAX_WINDOW = 256 << 10
"""Rolling windows start small (most gaps are one changed page) and grow to this."""
PROBE_BYTES = 64 << 10
"""How far one rolling probe looks for a match before the region is declared literal."""
SKIP_MIN = 256 << 10
SKIP_MAX = 16 << 20
"""Literal bytes sent between failed probes: doubles from SKIP_MIN up to SKIP_MAX."""

SAMPLE_STRIDE = 16
"""While giving up, one predicted block in this many is still checked."""

_MIX = np.uint32(0x9E3779B1)


def _strong_view(sig: Signature) -> memoryview:
    """The strong hashes as one flat byte view: slices compare with digests, copy-free."""
    strong = np.ascontiguousarray(sig.strong, dtype=np.uint8).reshape(-1)
    return memoryview(strong)


class _BlockIndex:
    """Lookup from weak sum to basis blocks, built only if a rolling search happens."""

    def __init__(self, sig: Signature) -> None:
        n = sig.basis_length // sig.block_size  # the short last block never rolls
        weak = sig.weak[:n]
        self.n = n
        bits = min(24, max(16, (max(n, 1) * 16 - 1).bit_length()))
        self._shift = np.uint32(32 - bits)
        self._table = np.zeros(1 << bits, dtype=bool)
        self._table[(weak * _MIX) >> self._shift] = True
        keys = (weak.astype(np.uint64) << np.uint64(32)) | np.arange(n, dtype=np.uint64)
        keys.sort()  # by weak sum, then block index: deterministic and faster than argsort
        self._order = (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        self._sorted = (keys >> np.uint64(32)).astype(np.uint32)
        self._strong = _strong_view(sig)
        self._by_strong: dict[bytes, int] | None = None

    def lookup(self, weak: int) -> tuple[int, int]:
        """Table range of the blocks with one weak sum (empty if none)."""
        lo = int(np.searchsorted(self._sorted, np.uint32(weak), "left"))
        hi = lo
        while hi < self.n and self._sorted[hi] == weak:
            hi += 1
        return lo, hi

    def candidates(self, weak: np.ndarray) -> tuple[list[int], list[int], list[int]]:
        """Offsets (into ``weak``) whose sum occurs in the basis, with their table ranges."""
        hit = np.flatnonzero(self._table[(weak * _MIX) >> self._shift])
        if hit.size == 0:
            return [], [], []
        sums = weak[hit]
        lo = np.searchsorted(self._sorted, sums, "left")
        hi = np.searchsorted(self._sorted, sums, "right")
        keep = hi > lo
        return hit[keep].tolist(), lo[keep].tolist(), hi[keep].tolist()

    def confirm(self, digest: bytes, lo: int, hi: int) -> int | None:
        """Block whose strong hash is ``digest`` among the blocks sharing one weak sum."""
        if hi - lo <= 8:
            strong = self._strong
            for j in self._order[lo:hi].tolist():
                if strong[j * STRONG_SIZE : (j + 1) * STRONG_SIZE] == digest:
                    return j
            return None
        if self._by_strong is None:  # many equal weak sums: repeated content, e.g. zero pages
            by_strong: dict[bytes, int] = {}
            strong = self._strong
            for j in range(self.n):
                by_strong.setdefault(bytes(strong[j * STRONG_SIZE : (j + 1) * STRONG_SIZE]), j)
            self._by_strong = by_strong
        return self._by_strong.get(digest)


class _Matcher:
    def __init__(self, sig: Signature, mm: mmap.mmap, size: int, stats: DeltaStats) -> None:
        self.sig = sig
        self.L = sig.block_size
        self.mm = mm
        self.view = memoryview(mm)
        self.size = size
        self.stats = stats
        self.writer = WireWriter(Header(sig.block_size, sig.basis_length, sig.basis_hash, size))
        self.basis_full = sig.basis_length // self.L
        self.basis_tail = sig.basis_length % self.L
        self.strong64 = np.ascontiguousarray(sig.strong).view(np.uint64).reshape(-1, 2)
        self.strong_bytes = _strong_view(sig)
        self._index: _BlockIndex | None = None
        self.run_start = -1  # pending COPY run
        self.run_count = 0
        self.lit_start = 0  # pending literal [lit_start, lit_end)
        self.lit_end = 0
        self.released = 0
        self.no_roll_until = 0  # no rolling probe before this offset (backing off)
        self.skip = SKIP_MIN

    # -- output -------------------------------------------------------------------------

    def copy(self, index: int, count: int, nbytes: int) -> None:
        self.flush_literal()
        if self.run_count and self.run_start + self.run_count == index:
            self.run_count += count
        else:
            self.flush_run()
            self.run_start, self.run_count = index, count
        self.stats.matched_bytes += nbytes

    def literal(self, start: int, end: int) -> None:
        if end <= start:
            return
        self.flush_run()
        if self.lit_end != start:
            self.flush_literal()
            self.lit_start = start
        self.lit_end = end
        self.stats.literal_bytes += end - start
        while self.lit_end - self.lit_start >= LITERAL_MAX:
            self._emit_literal(self.lit_start, self.lit_start + LITERAL_MAX)

    def flush_run(self) -> None:
        if self.run_count:
            self.writer.copy(self.run_start, self.run_count)
            self.run_count = 0

    def flush_literal(self) -> None:
        if self.lit_end > self.lit_start:
            self._emit_literal(self.lit_start, self.lit_end)

    def _emit_literal(self, start: int, end: int) -> None:
        self.writer.literal(self.view[start:end])
        self.lit_start = end

    def release_behind(self, pos: int) -> None:
        upto = min(pos, self.lit_start) if self.lit_end > self.lit_start else pos
        if upto - self.released >= (4 << 20):
            release(self.mm, self.released, upto)
            self.released = upto

    # -- search -------------------------------------------------------------------------

    def search(self, start: int, limit: int, prefer: int) -> tuple[int, int] | None:
        """First offset in ``[start, limit - L]`` whose block is in the basis, and that block.

        ``prefer`` (the block after the previous match) wins ties, so runs of repeated
        content stay consecutive and batch into one COPY.
        """
        L = self.L
        if self.basis_full == 0 or limit - start < L:
            return None
        if self._index is None:
            self._index = _BlockIndex(self.sig)
        index = self._index
        weak_sig = self.sig.weak
        strong = self.strong_bytes
        view = self.view
        prefer_ok = 0 <= prefer < self.basis_full
        if limit - start == L:  # one offset (a single changed block): skip the prefix sums
            digest = strong_digest(view[start:limit])
            if prefer_ok and strong[prefer * STRONG_SIZE : (prefer + 1) * STRONG_SIZE] == digest:
                return start, prefer
            j = index.confirm(digest, *index.lookup(weak_of(view[start:limit])))
            return None if j is None else (start, j)
        o = start
        window = FIRST_WINDOW
        while o + L <= limit:
            end = min(limit, o + window + L - 1)
            weak = rolling_weak(np.frombuffer(view[o:end], dtype=np.uint8), L)
            for c, lo, hi in zip(*index.candidates(weak), strict=True):
                off = o + c
                digest = strong_digest(view[off : off + L])
                if (
                    prefer_ok
                    and weak_sig[prefer] == weak[c]
                    and strong[prefer * STRONG_SIZE : (prefer + 1) * STRONG_SIZE] == digest
                ):
                    return off, prefer
                j = index.confirm(digest, lo, hi)
                if j is not None:
                    return off, j
            o = end - L + 1
            window = min(window * 4, MAX_WINDOW)
        return None

    # -- main loop ----------------------------------------------------------------------

    def run(self) -> Iterator[bytes]:
        sig, n, writer = self.sig, self.size, self.writer
        hasher_thread: HashInBackground | None = None
        if n == sig.basis_length and self._ends_match():
            digest = hash_mapped(self.mm).digest()
            if digest == sig.basis_hash:
                self.copy(0, sig.block_count, n)
                self.flush_run()
                writer.end(n, digest)
                yield from writer.drain()
                return
        else:
            hasher_thread = HashInBackground(self.mm)
        try:
            yield from self._walk()
        finally:
            if hasher_thread is not None:
                hasher_thread.join()
        if hasher_thread is not None:
            digest = hasher_thread.digest()
        self.flush_run()
        self.flush_literal()
        writer.end(n, digest)
        yield from writer.drain()

    def _ends_match(self) -> bool:
        """Cheap guess whether the files are identical, before hashing all of it for sure."""
        last = self.sig.block_count - 1
        for j in {0, last}:
            block = self.view[j * self.L : min(self.size, (j + 1) * self.L)]
            if strong_digest(block) != self.strong_bytes[j * STRONG_SIZE : (j + 1) * STRONG_SIZE]:
                return False
        return True

    def _walk(self) -> Iterator[bytes]:
        pos = 0
        jnext = 0  # basis block predicted at ``pos``
        while pos < self.size:
            count = min(BATCH_BLOCKS, (self.size - pos) // self.L, self.basis_full - jnext)
            if count <= 0:
                pos, jnext = self._unpredicted(pos, jnext)
            elif pos < self.no_roll_until and count > SAMPLE_STRIDE:
                pos, jnext = self._sampled_batch(pos, jnext, count)
            else:
                pos, jnext = self._batch(pos, jnext, count)
            self.release_behind(pos)
            ready = self.writer.drain()
            if ready:
                yield from ready

    def _probe(self, start: int, prefer: int) -> tuple[int, int] | None:
        """Rolling search of one probe's length; a miss backs further probes off."""
        found = self.search(start, min(self.size, start + PROBE_BYTES + self.L), prefer)
        if found is None:
            self.no_roll_until = start + PROBE_BYTES + self.skip
            self.skip = min(self.skip * 2, SKIP_MAX)
        else:
            self.skip = SKIP_MIN
        return found

    def _unpredicted(self, pos: int, jnext: int) -> tuple[int, int]:
        """No whole basis block is predicted here: the basis's short tail, a probe or literal."""
        L, n, tail = self.L, self.size, self.basis_tail
        if jnext == self.basis_full and tail and pos + tail <= n:
            expected = self.strong_bytes[jnext * STRONG_SIZE : (jnext + 1) * STRONG_SIZE]
            if strong_digest(self.view[pos : pos + tail]) == expected:
                self.copy(jnext, 1, tail)
                return pos + tail, jnext + 1
        if n - pos < L:
            self.literal(pos, n)
            return n, jnext
        if pos >= self.no_roll_until:
            found = self._probe(pos, jnext)
            if found is not None:
                self.literal(pos, found[0])
                return found
        end = min(n, max(self.no_roll_until, pos + L))
        self.literal(pos, end)
        return end, jnext + -(-(end - pos) // L)

    def _sampled_batch(self, pos: int, jnext: int, count: int) -> tuple[int, int]:
        """While giving up on a region, check only every SAMPLE_STRIDE-th predicted block:
        enough to notice that the old layout resumed, when the full check takes over again."""
        L, view = self.L, self.view
        count = min(count, -(-(self.no_roll_until - pos) // L))
        got = b"".join(
            [
                strong_digest(view[pos + k * L : pos + (k + 1) * L])
                for k in range(0, count, SAMPLE_STRIDE)
            ]
        )
        equal = (
            np.frombuffer(got, dtype=np.uint64).reshape(-1, 2)
            == self.strong64[jnext : jnext + count : SAMPLE_STRIDE]
        ).all(1)
        hits = np.flatnonzero(equal)
        if hits.size:  # the matching run starts after the last sampled miss
            first = int(hits[0])
            count = (first - 1) * SAMPLE_STRIDE + 1 if first else 0
            self.no_roll_until = 0
            self.skip = SKIP_MIN
        self.literal(pos, pos + count * L)
        return pos + count * L, jnext + count

    def _batch(self, pos: int, jnext: int, count: int) -> tuple[int, int]:
        """Check ``count`` predicted blocks at once; search the gaps between matching runs."""
        L = self.L
        got = np.frombuffer(strong_hashes(self.view, pos, count, L), dtype=np.uint64)
        equal = (got.reshape(count, 2) == self.strong64[jnext : jnext + count]).all(1)
        bounds = np.flatnonzero(equal[1:] != equal[:-1]) + 1
        starts = [0, *bounds.tolist()]
        ends = [*bounds.tolist(), count]
        matched = bool(equal[0])
        for k, g in zip(starts, ends, strict=True):
            if matched:
                self.copy(jnext + k, g - k, (g - k) * L)
                matched = False
                continue
            matched = True
            p = pos + k * L
            found = None
            if g < count:  # bounded gap: the prediction holds again at block ``g``
                e = pos + g * L
                if e - p <= PROBE_BYTES + L or p >= self.no_roll_until:
                    found = self.search(p, min(e, p + PROBE_BYTES + L), jnext + k)
                if found is None:
                    self.literal(p, e)
                    continue
            else:  # open gap to the end of the batch
                if p >= self.no_roll_until:
                    found = self._probe(p, jnext + k)
                if found is None:  # literal up to the next probe, then a new batch
                    stop = count
                    if self.no_roll_until < pos + count * L:
                        stop = max(k + 1, -(-(self.no_roll_until - pos) // L))
                    self.literal(p, pos + stop * L)
                    return pos + stop * L, jnext + stop
            self.literal(p, found[0])
            return found  # re-anchor the prediction on the new match
        return pos + count * L, jnext + count


def delta_stream(
    sig: Signature, new_path: str | os.PathLike[str], *, stats: DeltaStats | None = None
) -> Iterator[bytes]:
    """Yield the delta from ``sig``'s basis to ``new_path`` as wire chunks (<= 1 MiB each).

    ``stats``, if given, is filled in as the stream is consumed and is final once the
    generator is exhausted.  ``new_path`` is mapped, not copied: it must not be truncated
    while the stream is being consumed (checkpoint images and archives are write-once).
    """
    if stats is None:
        stats = DeltaStats()
    stats.literal_bytes = stats.matched_bytes = stats.wire_bytes = 0
    with open(new_path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        stats.new_size = size
        if size == 0:
            writer = WireWriter(Header(sig.block_size, sig.basis_length, sig.basis_hash, 0))
            writer.end(0, EMPTY_HASH)
            for chunk in writer.drain():
                stats.wire_bytes += len(chunk)
                yield chunk
            return
        mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        matcher = _Matcher(sig, mm, size, stats)
        try:
            for chunk in matcher.run():
                stats.wire_bytes += len(chunk)
                yield chunk
        finally:
            try:
                matcher.view.release()
                mm.close()
            except BufferError:  # an abandoned generator may still hold a view; GC unmaps it
                pass
