"""Block matching (rsync's sender role): turn a new file plus a signature into a delta stream.

Strategy, cheapest first:

1. Whole file: same length and same xxh3_128 as the basis -> one COPY.
2. Predicted blocks: the new file is walked on a grid from the last match ("block ``j`` was
   at offset ``p``, so block ``j+1`` should be at ``p+L``"), starting aligned at 0.  A batch
   of predicted blocks is strong-hashed and compared with the signature's bytes at once.
   In-place page changes and long shifted regions cost only this.
3. Search, only where prediction failed: find the first offset whose block is in the basis.
   A gap of at most ``SMALL_GAP_BLOCKS`` between two runs on one grid (pages rewritten in
   place) is only checked block by block.
   Each candidate offset costs one strong hash and one dict lookup, because the index keeps one
   entry per distinct block (equal blocks collapse).  The first searches hash every offset
   directly; past ``DIRECT_BUDGET`` offsets, weak sums at every offset of a window (numpy
   prefix sums) pick the candidates first.  The first confirmed match re-anchors the grid.
4. Giving up: when a probe of ``PROBE_BYTES`` finds nothing, data is sent as zstd literals
   and probes back off exponentially (up to one per ``SKIP_MAX``), so unrelated files stream
   at compression speed while the grid check still catches resumed matches.

Work is linear in the input whatever its content: a search confirms each candidate in O(1)
and gives up after ``FALSE_HITS_PER_BLOCK`` refuted weak hits per block scanned (so signatures
crafted to collide cost a bounded amount), and a batch restarts at ``BATCH_MIN`` blocks after
every re-anchor and doubles while the prediction holds, so input that re-anchors at every block
does not hash each block a thousand times.  numpy is imported only by the first vectorised
search: a delta of a file with a few edits starts and ends without it.

Only the mapping of the new file is touched, window by window, and pages behind the cursor
are dropped, so resident memory stays at a few MiB whatever the file size.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from operator import itemgetter

from migctl.agent.delta.checksum import (
    EMPTY_HASH,
    STRONG_SIZE,
    HashThread,
    hash_in_background,
    hash_mapped,
    release,
    strong_digest,
    strong_hashes,
)
from migctl.agent.delta.signature import Signature
from migctl.agent.delta.stats import Counters, DeltaStats
from migctl.agent.delta.wire import LITERAL_MAX, VERSION, Header, WireWriter

TYPE_CHECKING = False  # typing costs a delta process ~10 ms to import
if TYPE_CHECKING:
    from migctl.agent.delta.weak import WeakFilter

BATCH_BLOCKS = 1024
"""Most predicted blocks hashed and compared per batch (4 MiB at 4 KiB blocks)."""
BATCH_MIN = 4
"""First batch after a re-anchor; it doubles while the prediction holds."""
COMPARE_GROUP = 32
"""Predicted blocks compared as one byte string before looking at them one by one."""
FIRST_WINDOW = 16 << 10
MAX_WINDOW = 256 << 10
"""Vectorised windows start small (most gaps are one changed page) and grow to this."""
PROBE_BYTES = 64 << 10
"""How far one search looks for a match before the region is declared literal."""
SKIP_MIN = 256 << 10
SKIP_MAX = 16 << 20
"""Literal bytes sent between failed probes: doubles from SKIP_MIN up to SKIP_MAX."""
SAMPLE_STRIDE = 16
"""While giving up, one predicted block in this many is still checked."""
SMALL_GAP_BLOCKS = 3
"""A gap of at most this many blocks between two runs on one grid is checked block by block,
not at every offset: that is where pages were rewritten in place, and trying every offset
would cost ~L strong hashes to save at most the gap's blocks but one (rsync rolls a weak sum
through it in C; here each offset is a Python call)."""
DIRECT_OFFSETS = 16
"""A search over at most this many offsets hashes each one: cheaper than any vector setup."""
DIRECT_BUDGET = 64 << 10
"""Offsets one delta may hash directly in larger searches (~40 ms) before it imports numpy
for the vectorised search: enough for a handful of insertions and deletions."""
FALSE_HITS_PER_BLOCK = 4
FALSE_HITS_MIN = 64
"""A vectorised search gives up after FALSE_HITS_MIN + FALSE_HITS_PER_BLOCK per block it
scanned of weak-sum hits that the strong hash refutes: honest data has almost none, and a
signature crafted so that weak sums collide everywhere costs no more than this."""


class MatchWork(Counters):
    """What a delta cost the matcher, for tests and benchmarks to bound (not timing):
    batch_hashes, blocks strong-hashed to check the prediction; search_hashes, offsets
    strong-hashed while searching (direct or as weak-sum candidates); refuted, weak-sum
    candidates that the strong hash refuted; scanned, offsets whose weak sum a vectorised
    search computed; searches; given_up, vectorised searches stopped by the FALSE_HITS
    bound."""

    __slots__ = ("batch_hashes", "search_hashes", "refuted", "scanned", "searches", "given_up")
    batch_hashes: int
    search_hashes: int
    refuted: int
    scanned: int
    searches: int
    given_up: int


class _Index:
    """Distinct whole basis blocks by strong hash, each to one block holding it.

    Built on the first search.  Equal blocks (zero pages, a repeated allocator pattern)
    collapse into one entry, so confirming a candidate is one dict lookup however many
    blocks share its content or its weak sum.
    """

    def __init__(self, sig: Signature) -> None:
        n = sig.basis_length // sig.block_size  # the short last block never rolls
        self.full = n
        # Bytes keys: their hash is salted per process, so no signature can be crafted to make
        # this dict's inserts chain (int keys hash to themselves: a peer choosing the hashes'
        # heads made building it quadratic).  iter_unpack cuts them in C.
        raw = sig.strong_raw[: n * STRONG_SIZE]
        keys = map(itemgetter(0), struct.iter_unpack(f"{STRONG_SIZE}s", raw))
        self.blocks = dict(zip(keys, range(n), strict=True))
        self._weak_raw = sig.weak_raw
        self._weak: WeakFilter | None = None

    @property
    def weak(self) -> WeakFilter:
        if self._weak is None:
            from migctl.agent.delta.weak import WeakFilter

            self._weak = WeakFilter(self._weak_raw, self.full)
        return self._weak


class _Matcher:
    def __init__(
        self, sig: Signature, mm: mmap.mmap, size: int, stats: DeltaStats, work: MatchWork,
        delta_format: int,
    ) -> None:
        self.sig = sig
        self.L = sig.block_size
        self.mm = mm
        self.view = memoryview(mm)
        self.size = size
        self.stats = stats
        self.work = work
        self.writer = WireWriter(Header(sig.block_size, sig.basis_length, sig.basis_hash, size),
                                 delta_format=delta_format)
        self.basis_full = sig.basis_length // self.L
        self.basis_tail = sig.basis_length % self.L
        self.strong = sig.strong_raw
        self._index: _Index | None = None
        self.run_start = -1  # pending COPY run
        self.run_count = 0
        self.lit_start = 0  # pending literal [lit_start, lit_end)
        self.lit_end = 0
        self.released = 0
        self.no_roll_until = 0  # no rolling probe before this offset (backing off)
        self.skip = SKIP_MIN
        self.batch = BATCH_BLOCKS  # the aligned start is a prediction like any other
        self.direct_left = DIRECT_BUDGET

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

    def build_index(self) -> None:
        """The block index, on the first search that needs it (a delta without one never
        pays for it)."""
        if self._index is None:
            self._index = _Index(self.sig)

    def _strong_of(self, j: int) -> bytes:
        return self.strong[j * STRONG_SIZE : (j + 1) * STRONG_SIZE]

    def _scan(self, offsets: Iterable[int], start: int, prefer: int) -> tuple[int, int] | None:
        """The first of ``offsets`` whose block is in the basis: one hash, one lookup each.

        The blocks the old layout puts nearest win over other blocks with the same content
        (``prefer`` is the block predicted at ``start``, so ``prefer + (off - start) // L`` and
        the one after): after an insertion or a deletion in repeated content the grid goes on
        from the right copy, and runs stay consecutive and batch into one COPY.
        """
        assert self._index is not None
        view, L, full, blocks = self.view, self.L, self.basis_full, self._index.blocks
        hashed = 0
        found = None
        near_k, near = -1, (b"", b"")
        for off in offsets:
            hashed += 1
            digest = strong_digest(view[off : off + L])
            k = prefer + (off - start) // L
            if k != near_k:
                near_k = k
                near = tuple(self._strong_of(i) if i < full else b"" for i in (k, k + 1))
            if digest in near:
                found = off, k + near.index(digest)
                break
            j = blocks.get(digest)
            if j is not None:
                found = off, j
                break
        self.work.search_hashes += hashed
        return found

    def search(self, start: int, limit: int, prefer: int) -> tuple[int, int] | None:
        """First offset in ``[start, limit - L]`` whose block is in the basis, and that block."""
        L = self.L
        if self.basis_full == 0 or limit - start < L:
            return None
        self.build_index()
        self.work.searches += 1
        last = limit - L  # last offset to try
        if last - start < DIRECT_OFFSETS:
            return self._scan(range(start, last + 1), start, prefer)
        stop = min(last, start + self.direct_left - 1)
        if stop < start:
            return self._search_vectorised(start, limit, start, prefer)
        found = self._scan(range(start, stop + 1), start, prefer)
        self.direct_left -= (stop if found is None else found[0]) - start + 1
        if found is not None or stop == last:
            return found
        return self._search_vectorised(stop + 1, limit, start, prefer)

    def _search_vectorised(
        self, first: int, limit: int, start: int, prefer: int
    ) -> tuple[int, int] | None:
        """Weak sums of every offset from ``first`` on (numpy) pick the candidates; the strong
        hash confirms them (``start`` and ``prefer`` as for :meth:`_scan`)."""
        from migctl.agent.delta.weak import rolling_hits

        assert self._index is not None
        L, work = self.L, self.work
        weak = self._index.weak
        allowed = FALSE_HITS_MIN + FALSE_HITS_PER_BLOCK * ((limit - first) // L)
        o = first
        window = FIRST_WINDOW
        while o + L <= limit:
            end = min(limit, o + window + L - 1)
            work.scanned += end - L + 1 - o
            hits = rolling_hits(self.view[o:end], L, weak)[: allowed + 1]
            found = self._scan([o + c for c in hits], start, prefer)
            if found is not None:
                return found
            work.refuted += len(hits)
            allowed -= len(hits)
            if allowed < 0:
                work.given_up += 1
                return None
            o = end - L + 1
            window = min(window * 4, MAX_WINDOW)
        return None

    # -- main loop ----------------------------------------------------------------------

    def run(self) -> Iterator[bytes]:
        sig, n, writer = self.sig, self.size, self.writer
        hasher_thread: HashThread | None = None
        if n == sig.basis_length and self._ends_match():
            digest = hash_mapped(self.mm).digest()
            if digest == sig.basis_hash:
                self.copy(0, sig.block_count, n)
                self.flush_run()
                writer.end(n, digest)
                yield from writer.drain()
                return
        else:
            hasher_thread = hash_in_background(self.mm)
        try:
            yield from self._walk()
        except BaseException:  # abandoned (the receiver went away) or failed
            if hasher_thread is not None:
                hasher_thread.cancel()
            raise
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
            if strong_digest(block) != self._strong_of(j):
                return False
        return True

    def _walk(self) -> Iterator[bytes]:
        pos = 0
        jnext = 0  # basis block predicted at ``pos``
        while pos < self.size:
            count = min(self.batch, (self.size - pos) // self.L, self.basis_full - jnext)
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

    def _anchor(self, found: tuple[int, int]) -> tuple[int, int]:
        """Predict from a new match on: small batches first, in case it does not hold."""
        self.batch = BATCH_MIN
        return found

    def _probe(self, start: int, prefer: int) -> tuple[int, int] | None:
        """Search of one probe's length; a miss backs further probes off."""
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
        if (
            jnext == self.basis_full
            and tail
            and pos + tail <= n
            and strong_digest(self.view[pos : pos + tail]) == self._strong_of(jnext)
        ):
            self.copy(jnext, 1, tail)
            return pos + tail, jnext + 1
        if n - pos < L:
            self.literal(pos, n)
            return n, jnext
        if pos >= self.no_roll_until:
            found = self._probe(pos, jnext)
            if found is not None:
                self.literal(pos, found[0])
                return self._anchor(found)
        end = min(n, max(self.no_roll_until, pos + L))
        self.literal(pos, end)
        return end, jnext + -(-(end - pos) // L)

    def _predicted(self, pos: int, j: int) -> bool:
        """Whether basis block ``j`` is at ``pos`` (one block, as the grid predicts)."""
        if j >= self.basis_full or pos + self.L > self.size:
            return False
        self.work.batch_hashes += 1
        return strong_digest(self.view[pos : pos + self.L]) == self._strong_of(j)

    def _sampled_batch(self, pos: int, jnext: int, count: int) -> tuple[int, int]:
        """While giving up on a region, check only every SAMPLE_STRIDE-th predicted block:
        enough to notice that the old layout resumed, when the full check takes over again."""
        L = self.L
        count = min(count, -(-(self.no_roll_until - pos) // L))
        for k in range(0, count, SAMPLE_STRIDE):
            if self._predicted(pos + k * L, jnext + k):  # the run starts after the last miss
                count = k - SAMPLE_STRIDE + 1 if k else 0
                self.no_roll_until = 0
                self.skip = SKIP_MIN
                break
        self.literal(pos, pos + count * L)
        return pos + count * L, jnext + count

    def _batch(self, pos: int, jnext: int, count: int) -> tuple[int, int]:
        """Check ``count`` predicted blocks at once; search the gaps between matching runs."""
        L = self.L
        got = strong_hashes(self.view, pos, count, L)
        self.work.batch_hashes += count
        runs = _runs(got, self.strong[jnext * STRONG_SIZE : (jnext + count) * STRONG_SIZE])
        for k, g, matched in runs:
            if matched:
                self.copy(jnext + k, g - k, (g - k) * L)
                continue
            p = pos + k * L
            e = pos + g * L
            if g < count or self._predicted(e, jnext + g):  # the prediction holds again at e
                found = self._fill(p, e, jnext + k)
                if found is None:
                    continue
                return self._anchor(found)
            found = None  # open gap to the end of the batch
            if p >= self.no_roll_until:
                found = self._probe(p, jnext + k)
            if found is None:  # literal up to the next probe, then a new batch
                stop = count
                if self.no_roll_until < pos + count * L:
                    stop = max(k + 1, -(-(self.no_roll_until - pos) // L))
                self.literal(p, pos + stop * L)
                return pos + stop * L, jnext + stop
            self.literal(p, found[0])
            return self._anchor(found)
        self.batch = min(2 * self.batch, BATCH_BLOCKS)
        return pos + count * L, jnext + count

    def _fill(self, p: int, e: int, prefer: int) -> tuple[int, int] | None:
        """Cover the gap ``[p, e)`` between two predicted runs with matches or literals.

        Blocks found on the grid (another basis block in place of the predicted one) are
        copied and the prediction goes on; a match off the grid means the data moved, so it is
        returned for the caller to predict from.
        """
        L = self.L
        if e - p <= SMALL_GAP_BLOCKS * L:
            self._fill_on_grid(p, e, prefer)
            return None
        while p < e:
            found = None
            if e - p <= PROBE_BYTES + L or p >= self.no_roll_until:
                found = self.search(p, min(e, p + PROBE_BYTES + L), prefer)
            if found is None:
                self.literal(p, e)
                return None
            off, j = found
            self.literal(p, off)
            if (off - p) % L:
                return found
            self.copy(j, 1, L)
            p, prefer = off + L, j + 1
        return None

    def _fill_on_grid(self, p: int, e: int, prefer: int) -> None:
        """A small gap, block by block: each one the basis holds anywhere is copied."""
        L = self.L
        self.build_index()
        for q in range(p, e, L):
            found = self._scan((q,), q, prefer) if self.basis_full else None
            if found is None:
                self.literal(q, q + L)
                prefer += 1
            else:
                self.copy(found[1], 1, L)
                prefer = found[1] + 1


def _runs(got: bytes, want: bytes) -> list[tuple[int, int, bool]]:
    """Split predicted blocks into maximal runs ``(first, end, matched)`` by their hashes.

    Groups of COMPARE_GROUP hashes are compared as one string first, so a batch with a few
    changed pages costs a few dozen comparisons rather than one per block.
    """
    S = STRONG_SIZE
    count = len(got) // S
    if got == want:
        return [(0, count, True)]
    runs: list[tuple[int, int, bool]] = []
    first, state = 0, got[:S] == want[:S]
    for k in range(0, count, COMPARE_GROUP):
        g = min(count, k + COMPARE_GROUP)
        if state and got[k * S : g * S] == want[k * S : g * S]:
            continue
        for i in range(k, g):
            equal = got[i * S : (i + 1) * S] == want[i * S : (i + 1) * S]
            if equal != state:
                runs.append((first, i, state))
                first, state = i, equal
    runs.append((first, count, state))
    return runs


def delta_stream(
    sig: Signature,
    new_path: str | os.PathLike[str],
    *,
    stats: DeltaStats | None = None,
    work: MatchWork | None = None,
    delta_format: int = VERSION,
) -> Iterator[bytes]:
    """Yield the delta from ``sig``'s basis to ``new_path`` as wire chunks (<= 1 MiB each).

    ``stats`` and ``work``, if given, are filled in as the stream is consumed and are final
    once the generator is exhausted.  ``new_path`` is mapped, not copied: it must not be truncated
    while the stream is being consumed (checkpoint images and archives are write-once).
    ``delta_format``: the one the receiver reads (see :func:`agent.delta.wire.agreed_format`).
    """
    if stats is None:
        stats = DeltaStats()
    stats.literal_bytes = stats.matched_bytes = stats.wire_bytes = 0
    with open(new_path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        stats.new_size = size
        if size == 0:
            writer = WireWriter(Header(sig.block_size, sig.basis_length, sig.basis_hash, 0),
                                delta_format=delta_format)
            writer.end(0, EMPTY_HASH)
            for chunk in writer.drain():
                stats.wire_bytes += len(chunk)
                yield chunk
            return
        mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        matcher = _Matcher(sig, mm, size, stats, work or MatchWork(), delta_format)
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
