"""The delta engine rebuilds files exactly, sends little for small edits, and rejects bad input."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import migctl.agent.delta.checksum as checksum_module
import migctl.agent.delta.match as match_module
import migctl.agent.delta.patch as patch_module
from bench.delta_data import KINDS, basis_of, colliding_signature, edited
from migctl.agent.delta import (
    DELTA_FORMAT,
    DeltaStats,
    Signature,
    agreed_format,
    delta_stream,
    local_delta,
    make_signature,
    patch_stream,
)
from migctl.agent.delta.checksum import HashThread
from migctl.agent.delta.match import DIRECT_BUDGET, SMALL_GAP_BLOCKS, MatchWork
from migctl.agent.delta.patch import FOLLOW_STEP
from migctl.agent.delta.weak import block_weak, rolling_weak, weak_of
from migctl.agent.delta.wire import CHUNK_MAX, LITERAL_MAX, Header, WireWriter, _varint
from migctl.common.errors import DeltaError

ROOT = Path(__file__).resolve().parents[1]
KIB = 1024


def rand(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def roundtrip(d: Path, basis: bytes | None, new: bytes, block_size: int = 4096) -> DeltaStats:
    basis_path = None
    if basis is not None:
        basis_path = d / "basis"
        basis_path.write_bytes(basis)
    (d / "new").write_bytes(new)
    stats = local_delta(basis_path, d / "new", d / "out", block_size=block_size)
    assert (d / "out").read_bytes() == new
    assert stats.new_size == len(new)
    assert stats.literal_bytes + stats.matched_bytes == len(new)
    assert [p.name for p in d.iterdir() if "tmp" in p.name] == []
    return stats


def delta_chunks(d: Path, basis: bytes, new: bytes, block_size: int = 4096) -> list[bytes]:
    (d / "basis").write_bytes(basis)
    (d / "new").write_bytes(new)
    return list(delta_stream(make_signature(d / "basis", block_size), d / "new"))


# -- property tests: exact reconstruction -------------------------------------------------------

edit = st.one_of(
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=300)),
    st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 300)),
    st.tuples(st.just("replace"), st.floats(0, 1), st.binary(min_size=1, max_size=300)),
    st.tuples(st.just("move"), st.floats(0, 1), st.floats(0, 1), st.integers(1, 500)),
    st.tuples(st.just("repeat"), st.floats(0, 1), st.integers(1, 200), st.integers(2, 5)),
)


def apply_edits(data: bytes, edits: list[tuple]) -> bytes:
    out = bytearray(data)
    for e in edits:
        at = int(e[1] * len(out))
        if e[0] == "insert":
            out[at:at] = e[2]
        elif e[0] == "delete":
            del out[at : at + e[2]]
        elif e[0] == "replace":
            out[at : at + len(e[2])] = e[2]
        elif e[0] == "move":
            piece = bytes(out[at : at + e[3]])
            del out[at : at + e[3]]
            to = int(e[2] * len(out))
            out[to:to] = piece
        else:
            out[at:at] = bytes(out[at : at + e[2]]) * e[3]
    return bytes(out)


basis_data = st.one_of(
    st.binary(max_size=3000),  # low entropy: lots of repeated content
    st.builds(rand, st.integers(0, 5000), st.integers(0, 2**32 - 1)),
)
small_settings = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@small_settings
@given(basis=basis_data, edits=st.lists(edit, max_size=6), block_size=st.sampled_from([8, 16, 64]))
def test_rebuilds_edited_file_exactly(basis: bytes, edits: list, block_size: int) -> None:
    new = apply_edits(basis, edits)
    with tempfile.TemporaryDirectory() as d:
        roundtrip(Path(d), basis, new, block_size)


@small_settings
@given(
    basis=st.one_of(st.none(), basis_data),
    new=basis_data,
    block_size=st.sampled_from([16, 64, 4096]),
)
def test_rebuilds_unrelated_file_exactly(basis: bytes | None, new: bytes, block_size: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        roundtrip(Path(d), basis, new, block_size)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), edits=st.lists(edit, min_size=1, max_size=8))
def test_rebuilds_edited_large_file_with_4k_blocks(seed: int, edits: list) -> None:
    basis = rand(300 * KIB + seed % 5000, seed)
    new = apply_edits(basis, edits)
    with tempfile.TemporaryDirectory() as d:
        stats = roundtrip(Path(d), basis, new)
    changed = sum(len(e[2]) if e[0] in ("insert", "replace") else 0 for e in edits)
    assert stats.matched_bytes >= len(new) - changed - 2 * 4096 * (len(edits) + 1)


@pytest.mark.parametrize(
    ("basis", "new"),
    [
        (b"", b""),
        (b"", b"abc"),
        (b"abc", b""),
        (b"x" * 4096, b"x" * 4096),
        (b"x" * 4095, b"x" * 4097),
        (b"x" * 4097, b"x" * 4095),
        (rand(4096 * 3 + 1, 1), rand(4096 * 3 + 1, 1)[:-1]),
        (rand(4096 * 3 + 1, 1), rand(4096 * 3 + 1, 1) + b"tail"),
    ],
)
def test_edge_sizes(tmp_path: Path, basis: bytes, new: bytes) -> None:
    roundtrip(tmp_path, basis, new)


def test_no_basis_sends_compressed_whole_file(tmp_path: Path) -> None:
    new = b"migctl checkpoint page " * 20000
    stats = roundtrip(tmp_path, None, new)
    assert stats.literal_bytes == len(new)
    assert stats.wire_bytes < len(new) // 20


# -- behaviour: what gets matched ---------------------------------------------------------------


def test_changed_pages_are_the_only_literals(tmp_path: Path) -> None:
    basis = rand(1024 * KIB, 7)
    new = bytearray(basis)
    for page in (3, 100, 101, 200):
        new[page * 4096 : (page + 1) * 4096] = rand(4096, page)
    stats = roundtrip(tmp_path, basis, bytes(new))
    assert stats.literal_bytes == 4 * 4096
    assert stats.matched_bytes == len(basis) - 4 * 4096
    assert stats.wire_bytes < 4 * 4096 + 512


def test_insertion_is_matched_at_unaligned_offsets(tmp_path: Path) -> None:
    basis = rand(1024 * KIB, 8)
    at = 512 * KIB + 1234
    new = basis[:at] + rand(100, 9) + basis[at:]
    stats = roundtrip(tmp_path, basis, new)
    assert stats.matched_bytes >= len(basis) - 4096
    assert stats.literal_bytes <= 4096 + 100
    assert stats.wire_bytes < 8 * KIB


def test_deletion_is_matched_at_unaligned_offsets(tmp_path: Path) -> None:
    basis = rand(1024 * KIB, 10)
    new = basis[:300_001] + basis[300_101:]
    stats = roundtrip(tmp_path, basis, new)
    assert stats.matched_bytes >= len(new) - 4096


def test_match_found_after_a_long_unrelated_prefix(tmp_path: Path) -> None:
    basis = rand(2048 * KIB, 11)
    new = rand(700 * KIB + 17, 12) + basis
    stats = roundtrip(tmp_path, basis, new)
    assert stats.matched_bytes >= len(basis) * 3 // 4


def test_in_place_matches_resume_after_a_long_rewritten_region(tmp_path: Path) -> None:
    basis = rand(8 * 1024 * KIB, 28)
    new = rand(6 * 1024 * KIB, 29) + basis[6 * 1024 * KIB :]
    stats = roundtrip(tmp_path, basis, new)
    assert stats.matched_bytes >= 2 * 1024 * KIB - 16 * 4096


def test_repeated_blocks_batch_into_few_copy_runs(tmp_path: Path) -> None:
    basis = bytes(1024 * KIB)
    stats = roundtrip(tmp_path, basis, b"header" + basis)
    assert stats.matched_bytes >= len(basis) - 4096
    assert stats.wire_bytes < 200


def test_unrelated_data_goes_out_as_literals(tmp_path: Path) -> None:
    stats = roundtrip(tmp_path, rand(512 * KIB, 13), rand(512 * KIB, 14))
    assert stats.matched_bytes == 0
    assert stats.wire_bytes < 512 * KIB * 101 // 100


def test_delta_chunks_are_bounded_and_the_receiver_ignores_chunk_boundaries(
    tmp_path: Path,
) -> None:
    basis = rand(3 * 1024 * KIB, 15)
    new = rand(3 * 1024 * KIB, 16)[:1_500_000] + basis[1_000_000:]
    chunks = delta_chunks(tmp_path, basis, new)
    assert len(chunks) > 1
    assert all(0 < len(c) <= CHUNK_MAX for c in chunks)
    stream = b"".join(chunks)
    cuts = sorted(random.Random(1).sample(range(1, len(stream)), 300))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    patch_stream(tmp_path / "basis", [b""] + pieces, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == new


def test_in_place_patch_replaces_the_basis(tmp_path: Path) -> None:
    basis = rand(200 * KIB, 17)
    for new in (basis, basis[:1000] + b"!" + basis[1000:], basis[: 100 * KIB]):
        (tmp_path / "f").write_bytes(basis)
        (tmp_path / "n").write_bytes(new)
        sig = make_signature(tmp_path / "f")
        patch_stream(tmp_path / "f", delta_stream(sig, tmp_path / "n"), tmp_path / "f")
        assert (tmp_path / "f").read_bytes() == new
        assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "n"]


def test_patch_keeps_the_mode_of_the_replaced_file(tmp_path: Path) -> None:
    chunks = delta_chunks(tmp_path, b"a" * 5000, b"b" * 5000)
    (tmp_path / "out").write_bytes(b"old")
    os.chmod(tmp_path / "out", 0o640)
    patch_stream(tmp_path / "basis", chunks, tmp_path / "out")
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o640


def test_sender_and_receiver_stats_agree(tmp_path: Path) -> None:
    basis = rand(100 * KIB, 18)
    new = basis[:5000] + rand(3000, 19) + basis[5000:]
    (tmp_path / "basis").write_bytes(basis)
    (tmp_path / "new").write_bytes(new)
    sent = DeltaStats()
    got = patch_stream(
        tmp_path / "basis",
        delta_stream(make_signature(tmp_path / "basis"), tmp_path / "new", stats=sent),
        tmp_path / "out",
    )
    assert got == sent


def test_abandoned_delta_generator_cleans_up(tmp_path: Path) -> None:
    (tmp_path / "basis").write_bytes(rand(100 * KIB, 20))
    (tmp_path / "new").write_bytes(rand(3 * 1024 * KIB, 21))
    stream = delta_stream(make_signature(tmp_path / "basis"), tmp_path / "new")
    next(stream)
    stream.close()
    assert not [t for t in threading.enumerate() if t.name == "delta-hash"]


def test_an_abandoned_delta_stops_hashing_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver that drops the stream does not leave this side hashing the whole file (a
    peer could drop streams over and over): the hash stops after the step under way."""
    (tmp_path / "basis").write_bytes(rand(100 * KIB, 22))
    (tmp_path / "new").write_bytes(rand(64 * 1024 * KIB, 23))  # 8 hashing steps
    steps: list[int] = []
    real = checksum_module.hash_mapped

    def slow(mm, start=0, end=None, hasher=None):  # type: ignore[no-untyped-def]
        steps.append(start)
        time.sleep(0.2)
        return real(mm, start, end, hasher)

    monkeypatch.setattr(checksum_module, "hash_mapped", slow)
    stream = delta_stream(make_signature(tmp_path / "basis"), tmp_path / "new")
    next(stream)
    stream.close()
    assert not [t for t in threading.enumerate() if t.name == "delta-hash"]
    assert len(steps) <= 2


# -- checksums and signatures -------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(data=st.binary(min_size=1, max_size=600), block_size=st.integers(1, 130))
def test_rolling_weak_matches_the_per_block_definition(data: bytes, block_size: int) -> None:
    x = np.frombuffer(data, dtype=np.uint8)
    weak = rolling_weak(x, block_size)
    assert len(weak) == max(0, len(data) - block_size + 1)
    for k in range(len(weak)):
        block = data[k : k + block_size]
        a = sum(block) & 0xFFFF
        b = sum((block_size - i) * v for i, v in enumerate(block)) & 0xFFFF
        assert int(weak[k]) == a | (b << 16) == weak_of(block)
    whole = len(data) // block_size
    if whole:
        aligned = block_weak(x[: whole * block_size].reshape(whole, block_size))
        assert np.array_equal(aligned, weak[::block_size][:whole])


def test_signature_round_trips_through_bounded_chunks(tmp_path: Path) -> None:
    (tmp_path / "basis").write_bytes(rand(1024 * KIB + 5, 22))
    sig = make_signature(tmp_path / "basis", 16)
    chunks = list(sig.to_chunks())
    assert len(chunks) > 1 and all(len(c) <= 1 << 20 for c in chunks)
    stream = b"".join(chunks)
    assert len(stream) == sig.wire_size
    back = Signature.from_chunks(stream[i : i + 99991] for i in range(0, len(stream), 99991))
    assert (back.block_size, back.basis_length, back.basis_hash) == (
        sig.block_size,
        sig.basis_length,
        sig.basis_hash,
    )
    assert np.array_equal(back.weak, sig.weak) and np.array_equal(back.strong, sig.strong)
    empty = Signature.from_chunks(Signature.empty().to_chunks())
    assert empty.basis_length == 0 and empty.block_count == 0


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s[:-1],
        lambda s: s[:30],
        lambda s: b"",
        lambda s: s + b"\0",
        lambda s: b"XXXX" + s[4:],
        lambda s: s[:4] + b"\x09" + s[5:],
        lambda s: s[:50] + bytes([s[50] ^ 1]) + s[51:],
        lambda s: s[:-3] + bytes([s[-3] ^ 0x80]) + s[-2:],
    ],
)
def test_damaged_signature_is_rejected(tmp_path: Path, damage) -> None:
    (tmp_path / "basis").write_bytes(rand(20 * KIB, 23))
    good = b"".join(make_signature(tmp_path / "basis").to_chunks())
    with pytest.raises(DeltaError):
        Signature.from_chunks([damage(good)])


# -- corruption, truncation and the wrong basis -------------------------------------------------


def corrupt_setup(d: Path) -> bytes:
    basis = rand(64 * KIB, 24)
    new = basis[:10_000] + b"inserted" * 100 + basis[10_000:50_000] + rand(5000, 25)
    return b"".join(delta_chunks(d, basis, new))


def assert_rejected(d: Path, chunks: list[bytes], basis: Path | None = None) -> None:
    (d / "out").write_bytes(b"previous contents")
    with pytest.raises(DeltaError):
        patch_stream(d / "basis" if basis is None else basis, chunks, d / "out")
    assert (d / "out").read_bytes() == b"previous contents"
    assert sorted(p.name for p in d.iterdir()) == ["basis", "new", "out"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(position=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255))
def test_any_flipped_byte_is_rejected(position: float, xor: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        stream = bytearray(corrupt_setup(d))
        at = int(position * len(stream))
        stream[at] ^= xor
        if at in BASIS_HASH_BYTES:  # it only names the basis when a result fails: the
            # result's own hash, which a flip elsewhere breaks, decides
            patch_stream(d / "basis", [bytes(stream)], d / "out")
            assert (d / "out").read_bytes() == (d / "new").read_bytes()
        else:
            assert_rejected(d, [bytes(stream)])


BASIS_HASH_BYTES = range(18, 34)  # in the header: "MGDL" u8 u8 u32 u64, then 16 bytes


def test_every_truncation_is_rejected(tmp_path: Path) -> None:
    stream = corrupt_setup(tmp_path)
    cuts = {0, 1, 33, 34, 35, len(stream) - 1, len(stream) - 17}
    cuts |= set(random.Random(2).sample(range(len(stream)), 40))
    for cut in sorted(cuts):
        assert_rejected(tmp_path, [stream[:cut]])


def test_trailing_garbage_and_junk_streams_are_rejected(tmp_path: Path) -> None:
    stream = corrupt_setup(tmp_path)
    assert_rejected(tmp_path, [stream, b"\0"])
    assert_rejected(tmp_path, [os.urandom(5000)])
    assert_rejected(tmp_path, [])
    assert_rejected(tmp_path, [stream[:40], "not bytes"])  # type: ignore[list-item]


def test_wrong_basis_is_rejected_before_anything_is_replaced(tmp_path: Path) -> None:
    stream = corrupt_setup(tmp_path)
    basis = (tmp_path / "basis").read_bytes()
    other = tmp_path / "other"
    for wrong in (basis[:-1], basis + b"x", bytes(len(basis)), basis[:20_000] + b"\0"
                  + basis[20_001:]):
        other.write_bytes(wrong)
        (tmp_path / "out").write_bytes(b"previous contents")
        with pytest.raises(DeltaError, match="wrong basis"):
            patch_stream(other, [stream], tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == b"previous contents"
    # as with rsync, the result's hash is the proof: a basis that differs only where the
    # delta never reads still gives the verified result
    other.write_bytes(basis[:-1] + bytes([basis[-1] ^ 1]))
    patch_stream(other, [stream], tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == (tmp_path / "new").read_bytes()
    other.unlink()
    with pytest.raises(DeltaError, match="wrong basis"):
        patch_stream(None, [stream], tmp_path / "out")
    with pytest.raises(DeltaError, match="does not exist"):
        patch_stream(tmp_path / "missing", [stream], tmp_path / "out")


def test_wrong_basis_is_caught_by_the_result_hash_without_basis_check(tmp_path: Path) -> None:
    stream = corrupt_setup(tmp_path)
    basis = bytearray((tmp_path / "basis").read_bytes())
    basis[20_000] ^= 1
    (tmp_path / "other").write_bytes(basis)
    with pytest.raises(DeltaError, match="checksum"):
        patch_stream(tmp_path / "other", [stream], tmp_path / "out", verify_basis=False)
    assert not (tmp_path / "out").exists()


def crafted(sig: Signature, new_length: int, *tokens: tuple) -> list[bytes]:
    """A syntactically valid delta stream with chosen tokens."""
    header = Header(sig.block_size, sig.basis_length, sig.basis_hash, new_length)
    writer = WireWriter(header)
    for kind, *args in tokens:
        getattr(writer, kind)(*args)
    return writer.drain(final=True)


def test_well_formed_but_inconsistent_deltas_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "basis").write_bytes(rand(40_000, 30))
    sig = make_signature(tmp_path / "basis")
    last = sig.block_count - 1
    cases = [
        ("past the 100 bytes", 100, [("copy", 0, last + 1)]),
        ("copies basis blocks", 8192, [("copy", last, 2)]),
        ("empty copy", 4096, [("copy", 0, 0)]),
        ("promised", 5000, [("copy", 0, 1), ("end", 5000, bytes(16))]),
        ("checksum", 4096, [("copy", 0, 1), ("end", 4096, bytes(16))]),
        ("truncated", 4096, [("copy", 0, 1)]),
        ("wrong length", 4096, [("literal_frame", 4096, zstandard.compress(b"x" * 4095))]),
        ("not a zstd frame", 4096, [("literal_frame", 4096, b"junk" * 100)]),
        ("impossible length", 4096, [("_add", b"R\x00")]),
        ("impossible length", 4096, [("_add", b"R" + _varint(LITERAL_MAX + 1))]),
        ("past the 100 bytes", 100, [("_add", b"R" + _varint(200) + b"x" * 200)]),
        ("truncated", 4096, [("_add", b"R" + _varint(4096) + b"x" * 10)]),
    ]
    for message, length, tokens in cases:
        with pytest.raises(DeltaError, match=message):
            patch_stream(tmp_path / "basis", crafted(sig, length, *tokens), tmp_path / "out")
        assert not (tmp_path / "out").exists()


# -- command line -------------------------------------------------------------------------------


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migctl.agent.delta", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_round_trip_and_errors(tmp_path: Path) -> None:
    basis = rand(300 * KIB, 26)
    new = basis[:123_457] + b"new bytes" + basis[123_457:]
    (tmp_path / "basis").write_bytes(basis)
    (tmp_path / "new").write_bytes(new)
    r = cli("signature", tmp_path / "basis", tmp_path / "sig")
    assert r.returncode == 0, r.stderr
    r = cli("delta", tmp_path / "sig", tmp_path / "new", tmp_path / "delta")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "delta").stat().st_size < 10 * KIB
    r = cli("patch", tmp_path / "basis", tmp_path / "delta", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == new

    (tmp_path / "other").write_bytes(rand(300 * KIB, 27))
    r = cli("patch", tmp_path / "other", tmp_path / "delta", tmp_path / "out2")
    assert r.returncode == 1 and "wrong basis" in r.stderr
    assert not (tmp_path / "out2").exists()
    r = cli("delta", tmp_path / "missing.sig", tmp_path / "new", tmp_path / "d2")
    assert r.returncode == 2 and "No such file" in r.stderr and "missing.sig" in r.stderr
    r = cli("delta", tmp_path / "new", tmp_path / "new", tmp_path / "d2")
    assert r.returncode == 1 and "signature" in r.stderr
    assert not (tmp_path / "d2").exists()


# -- linear time on every input ---------------------------------------------------------------
# Each case is rebuilt byte for byte, and the matcher's work counters stay linear in the input:
# no timing, so a regression to per-candidate walks or unbounded searches fails on any machine.

ADVERSARIAL_SIZE = 2 * 1024 * KIB  # 512 pages


def counted_delta(
    d: Path, basis: bytes, new: bytes, sig: Signature | None = None
) -> tuple[DeltaStats, MatchWork]:
    (d / "basis").write_bytes(basis)
    (d / "new").write_bytes(new)
    if sig is None:
        sig = make_signature(d / "basis")
    stats, work = DeltaStats(), MatchWork()
    patch_stream(d / "basis", delta_stream(sig, d / "new", stats=stats, work=work), d / "out")
    assert (d / "out").read_bytes() == new
    return stats, work


def assert_linear(work: MatchWork, new_size: int) -> None:
    blocks = -(-new_size // 4096)
    assert work.batch_hashes <= 16 * blocks
    assert work.search_hashes <= DIRECT_BUDGET + 8 * blocks
    assert work.scanned <= 2 * new_size


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_content_is_matched_in_linear_work(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(31)
    basis = basis_of(kind, ADVERSARIAL_SIZE, rng)
    new = edited(basis, rng)
    stats, work = counted_delta(tmp_path, basis.tobytes(), new.tobytes())
    assert_linear(work, new.size)
    assert stats.matched_bytes >= new.size * 95 // 100  # 1 % of pages changed + two edits


def test_colliding_pages_make_a_signature_whose_weak_sums_all_collide(tmp_path: Path) -> None:
    (tmp_path / "basis").write_bytes(basis_of("colliding", 64 * 4096, np.random.default_rng(3)))
    sig = make_signature(tmp_path / "basis")
    assert len(set(sig.weak.tolist())) == 1
    assert len({bytes(s) for s in sig.strong}) == sig.block_count


def test_repeated_zero_pages_cost_as_much_as_random_changes(tmp_path: Path) -> None:
    """The issue's case: half of the basis's pages zero, every 4th page of the new file zeroed."""
    rng = np.random.default_rng(32)
    basis = basis_of("half-zero", ADVERSARIAL_SIZE, rng)
    new = basis.copy()
    new.reshape(-1, 4096)[::4] = 0
    stats, work = counted_delta(tmp_path, basis.tobytes(), new.tobytes())
    assert stats.literal_bytes == 0
    assert_linear(work, new.size)


@pytest.mark.parametrize("direct_budget", [DIRECT_BUDGET, 0])
def test_crafted_signature_with_colliding_weak_sums_cannot_stall_the_sender(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct_budget: int
) -> None:
    """A hostile receiver sets every weak sum to the zero page's (0) and sends strong hashes
    of nothing: every offset of the sender's zero runs is a weak hit that the strong hash
    refutes.  The search gives up after a bounded number of them, with or without numpy."""
    monkeypatch.setattr(match_module, "DIRECT_BUDGET", direct_budget)
    rng = np.random.default_rng(33)
    basis = basis_of("random", 4 * ADVERSARIAL_SIZE, rng)
    new = basis_of("half-zero", 4 * ADVERSARIAL_SIZE, rng)
    (tmp_path / "basis").write_bytes(basis.tobytes())
    honest = make_signature(tmp_path / "basis")
    garbage = rng.integers(0, 256, len(honest.strong_raw), dtype=np.uint8).tobytes()
    crafted_sig = colliding_signature(
        Signature(4096, honest.basis_length, honest.weak_raw, garbage, honest.basis_hash), 0
    )
    stats, work = counted_delta(tmp_path, basis.tobytes(), new.tobytes(), crafted_sig)
    assert stats.matched_bytes == 0
    blocks = new.size // 4096
    assert work.search_hashes <= direct_budget + 8 * blocks
    if direct_budget == 0:
        assert work.given_up > 0 and work.scanned <= 2 * new.size


def test_signature_whose_weak_sums_collide_still_matches_every_block(tmp_path: Path) -> None:
    """Weak sums only pick candidates: lying about them costs the liar, not the sender."""
    rng = np.random.default_rng(34)
    basis = basis_of("random", ADVERSARIAL_SIZE, rng)
    new = edited(basis, rng)
    (tmp_path / "basis").write_bytes(basis.tobytes())
    sig = colliding_signature(make_signature(tmp_path / "basis"), 12345)
    stats, work = counted_delta(tmp_path, basis.tobytes(), new.tobytes(), sig)
    honest, _ = counted_delta(tmp_path, basis.tobytes(), new.tobytes())
    assert stats.wire_bytes == honest.wire_bytes
    assert_linear(work, new.size)


def test_reanchoring_at_every_block_hashes_each_block_a_bounded_number_of_times(
    tmp_path: Path,
) -> None:
    """Every block of the new file moved by one more byte than the last: the prediction fails
    at every block, so the grid is anchored again at each one."""
    basis = rand(512 * 4096, 35)
    new = b"".join(basis[i : i + 4096] + b"x" for i in range(0, len(basis), 4096))
    stats, work = counted_delta(tmp_path, basis, new)
    assert stats.literal_bytes == 512
    assert_linear(work, len(new))


def test_other_blocks_in_place_of_predicted_ones_are_copied_without_searching_on(
    tmp_path: Path,
) -> None:
    """Basis A B A B ..., new A A A A ...: the grid misses every other block."""
    rng = np.random.default_rng(36)
    a, b = (rng.integers(0, 256, 4096, dtype=np.uint8).tobytes() for _ in range(2))
    stats, work = counted_delta(tmp_path, (a + b) * 256, a * 512 + b"tail")
    assert stats.literal_bytes == 4
    assert_linear(work, 512 * 4096)


def test_a_small_gap_of_rewritten_pages_is_checked_block_by_block(tmp_path: Path) -> None:
    """Two or three pages rewritten side by side cost one hash per page, not one per offset
    (4097 before); a page there that the basis holds elsewhere is still copied."""
    basis = rand(256 * 4096, 37)
    new = bytearray(basis)
    new[40 * 4096 : 42 * 4096] = rand(2 * 4096, 38)  # two pages side by side
    new[100 * 4096 : 101 * 4096] = rand(4096, 39)  # three: new, basis page 7, new
    new[101 * 4096 : 102 * 4096] = basis[7 * 4096 : 8 * 4096]
    new[102 * 4096 : 103 * 4096] = rand(4096, 40)
    stats, work = counted_delta(tmp_path, basis, bytes(new))
    assert stats.literal_bytes == 4 * 4096
    assert work.search_hashes <= 5
    assert_linear(work, len(new))


def test_a_moved_block_inside_a_larger_gap_is_still_found_off_the_grid(tmp_path: Path) -> None:
    """Past SMALL_GAP_BLOCKS the gap is searched at every offset, as before."""
    basis = rand(256 * 4096, 41)
    new = bytearray(basis)
    gap = rand((SMALL_GAP_BLOCKS + 1) * 4096, 42)
    moved = basis[200 * 4096 : 201 * 4096]
    new[50 * 4096 : 50 * 4096 + len(gap)] = gap[:100] + moved + gap[100 + 4096 :]
    stats, _ = counted_delta(tmp_path, basis, bytes(new))
    assert stats.literal_bytes == len(gap) - 4096


# -- a command that starts fast -----------------------------------------------------------------

_LOADED = """
import sys
from migctl.agent.delta.__main__ import main
code = main(sys.argv[1:])
print(code, *(name for name in ("grpc", "docker", "numpy", "zstandard") if name in sys.modules))
"""


def loaded_by(*args: str | Path) -> list[str]:
    """Exit code and heavy modules loaded by one run of the command, in a fresh interpreter."""
    r = subprocess.run(
        [sys.executable, "-c", _LOADED, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_command_loads_no_grpc_or_docker_and_numpy_only_where_needed(tmp_path: Path) -> None:
    basis = rand(1024 * KIB, 40)
    new = bytearray(basis[:300_000] + b"inserted" + basis[300_000:])
    new[700_000:704_096] = rand(4096, 41)
    (tmp_path / "basis").write_bytes(basis)
    (tmp_path / "new").write_bytes(new)
    assert loaded_by("signature", tmp_path / "basis", tmp_path / "sig") == ["0", "numpy"]
    delta = ("delta", tmp_path / "sig", tmp_path / "new", tmp_path / "delta")
    assert loaded_by(*delta) == ["0", "zstandard"]
    # Random edits go out STORED: nothing to decompress, zstandard stays unloaded
    assert loaded_by("patch", tmp_path / "basis", tmp_path / "delta", tmp_path / "out") == ["0"]
    assert (tmp_path / "out").read_bytes() == new
    new[500_000:500_000] = b"compressible " * 200
    (tmp_path / "new").write_bytes(new)
    assert loaded_by(*delta) == ["0", "zstandard"]
    assert loaded_by("patch", tmp_path / "basis", tmp_path / "delta", tmp_path / "out") == [
        "0", "zstandard"]
    assert (tmp_path / "out").read_bytes() == new


def test_delta_error_still_maps_to_failed_precondition() -> None:
    import grpc

    assert DeltaError("x").code is grpc.StatusCode.FAILED_PRECONDITION
    err = DeltaError("x")
    err.code = grpc.StatusCode.UNAVAILABLE  # a peer's status, kept as the peer said it
    assert err.code is grpc.StatusCode.UNAVAILABLE


def test_console_script_is_the_rdiff_like_command(tmp_path: Path) -> None:
    import tomllib

    from migctl.agent.delta.__main__ import main

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["migctl-delta"] == "migctl.agent.delta.__main__:run"
    (tmp_path / "basis").write_bytes(rand(50 * KIB, 42))
    (tmp_path / "new").write_bytes(rand(50 * KIB, 42) + b"more")
    assert main(["signature", "-b", "1024", str(tmp_path / "basis"), str(tmp_path / "sig")]) == 0
    assert main(["delta", str(tmp_path / "sig"), str(tmp_path / "new"), str(tmp_path / "d")]) == 0
    args = ["patch", str(tmp_path / "basis"), str(tmp_path / "d"), str(tmp_path / "out")]
    assert main(["-s", *args]) == 0
    assert (tmp_path / "out").read_bytes() == (tmp_path / "new").read_bytes()


def test_command_streams_signature_and_delta_through_pipes_like_rdiff(tmp_path: Path) -> None:
    basis = rand(80 * KIB, 43)
    new = basis[:1000] + b"piped" + basis[1000:]
    (tmp_path / "basis").write_bytes(basis)
    (tmp_path / "new").write_bytes(new)
    sig = subprocess.run(
        [sys.executable, "-m", "migctl.agent.delta", "signature", str(tmp_path / "basis")],
        cwd=ROOT, capture_output=True, timeout=60, check=True,
    ).stdout
    delta = subprocess.run(
        [sys.executable, "-m", "migctl.agent.delta", "delta", "-", str(tmp_path / "new")],
        cwd=ROOT, input=sig, capture_output=True, timeout=60, check=True,
    ).stdout
    r = subprocess.run(
        [sys.executable, "-m", "migctl.agent.delta", "-s", "patch", str(tmp_path / "basis"), "-",
         str(tmp_path / "out")],
        cwd=ROOT, input=delta, capture_output=True, timeout=60,
    )
    assert r.returncode == 0 and b"patch: new" in r.stderr and r.stdout == b""
    assert (tmp_path / "out").read_bytes() == new


# -- kernel copies --------------------------------------------------------------------------------


def test_matched_runs_are_copied_by_the_kernel_with_a_buffered_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    basis = rand(1024 * KIB, 50)
    new = basis[:5000] + b"edit" + basis[5000:700_000] + rand(4096, 51) + basis[704_096:]
    chunks = delta_chunks(tmp_path, basis, new)
    copied: list[int] = []
    real = os.copy_file_range

    def counting(src: int, dst: int, count: int, offset_src: int, offset_dst: int) -> int:
        done = real(src, dst, count, offset_src, offset_dst)
        copied.append(done)
        return done

    monkeypatch.setattr(os, "copy_file_range", counting)
    stats = patch_stream(tmp_path / "basis", chunks, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == new
    assert len(copied) > 1 and sum(copied) == stats.matched_bytes  # every run, not a prefix

    def unsupported(*args: int) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    patch_stream(tmp_path / "basis", chunks, tmp_path / "out2")
    assert (tmp_path / "out2").read_bytes() == new


@pytest.mark.parametrize("follow", [True, False], ids=["while-written", "at-the-end"])
def test_the_result_is_hashed_as_read_back_so_a_bad_kernel_copy_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, follow: bool
) -> None:
    """The proof is the output file as written, not the pieces meant to be written: a copy
    that puts the wrong bytes in place fails the patch, and nothing replaces OUT (whether the
    result is hashed as it is written, or at the end when it cannot be mapped)."""
    if not follow:
        monkeypatch.setattr(patch_module._Rebuild, "_start_follower", lambda self: None)
    basis = rand(6 * 1024 * KIB, 52)
    new = basis[:9000] + b"edit" + basis[9000:]
    chunks = delta_chunks(tmp_path, basis, new)
    real = os.copy_file_range

    def sloppy(src: int, dst: int, count: int, offset_src: int, offset_dst: int) -> int:
        done = real(src, dst, count, offset_src, offset_dst)
        if offset_dst <= 5 * 1024 * KIB < offset_dst + done:
            os.pwrite(dst, b"\0", 5 * 1024 * KIB)  # one byte the basis does not have there
        return done

    monkeypatch.setattr(os, "copy_file_range", sloppy)
    (tmp_path / "out").write_bytes(b"old")
    with pytest.raises(DeltaError, match="checksum"):
        patch_stream(tmp_path / "basis", chunks, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["basis", "new", "out"]


def record_handed(monkeypatch: pytest.MonkeyPatch, new: bytes) -> list[tuple[int, int]]:
    """The ranges the patch hands its hashing thread, each checked to hold NEW's bytes by then."""
    handed: list[tuple[int, int]] = []
    real = HashThread.add_range

    def recording(self: HashThread, start: int, stop: int) -> None:
        assert self._mm[start:stop] == new[start:stop]  # already written
        handed.append((start, stop))
        real(self, start, stop)

    monkeypatch.setattr(HashThread, "add_range", recording)
    return handed


def assert_contiguous(handed: list[tuple[int, int]], length: int) -> None:
    assert handed[0][0] == 0 and handed[-1][1] == length
    assert [a for a, _ in handed[1:]] == [b for _, b in handed[:-1]]  # in order, no gap


def test_the_result_is_hashed_while_it_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hashing thread follows the writer in pieces, not in one pass at the end."""
    basis = rand(24 * 1024 * KIB, 53)
    new = bytearray(basis[:100] + b"inserted" + basis[100:])
    new[12 * 1024 * KIB : 12 * 1024 * KIB + 4096] = rand(4096, 54)
    chunks = delta_chunks(tmp_path, basis, bytes(new))
    handed = record_handed(monkeypatch, bytes(new))
    patch_stream(tmp_path / "basis", chunks, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == new
    assert len(handed) >= len(new) // FOLLOW_STEP
    assert_contiguous(handed, len(new))


def test_incompressible_literals_go_stored_and_compressible_ones_compressed(
    tmp_path: Path,
) -> None:
    basis = rand(64 * KIB, 55)
    noise, text = rand(3000, 56), b"compressible " * 300
    new = basis[:8192] + noise + basis[8192:40_000] + text + basis[40_000:]
    stream = b"".join(delta_chunks(tmp_path, basis, new))
    assert b"R" + _varint(len(noise)) + noise in stream  # as is, no frame around it
    assert text not in stream  # compressed
    patch_stream(tmp_path / "basis", [stream], tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == new


def test_an_in_place_patch_hashes_a_long_unchanged_prefix_once_it_differs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In place, the output is opened only at the first difference: the prefix copied then
    (longer than one hashing piece here) is hashed like the rest."""
    basis = rand(3 * FOLLOW_STEP, 57)
    new = bytearray(basis)
    new[2 * FOLLOW_STEP + 5000 : 2 * FOLLOW_STEP + 9096] = rand(4096, 58)
    chunks = delta_chunks(tmp_path, basis, bytes(new))
    handed = record_handed(monkeypatch, bytes(new))
    patch_stream(tmp_path / "basis", chunks, tmp_path / "basis")
    assert (tmp_path / "basis").read_bytes() == new
    assert_contiguous(handed, len(new))


def test_a_hashing_thread_that_cannot_start_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    basis = rand(256 * KIB, 59)
    chunks = delta_chunks(tmp_path, basis, basis[:1000] + b"x" + basis[1000:])

    def refused(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(HashThread, "start", refused)
    with pytest.raises(RuntimeError, match="start new thread"):
        patch_stream(tmp_path / "basis", chunks, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["basis", "new"]


# -- delta formats --------------------------------------------------------------------------------


def test_a_receiver_of_format_1_gets_format_1_and_every_format_is_read(tmp_path: Path) -> None:
    """A receiver older than STORED literals asks for nothing (0) and gets format 1, which
    this side still reads; a peer asking for more than it knows gets the newest."""
    assert [agreed_format(n) for n in (0, 1, 2, 99)] == [1, 1, 2, DELTA_FORMAT]
    basis = rand(64 * KIB, 60)
    noise = rand(3000, 61)
    new = basis[:8192] + noise + basis[8192:]
    (tmp_path / "basis").write_bytes(basis)
    (tmp_path / "new").write_bytes(new)
    sig = make_signature(tmp_path / "basis")
    for fmt in (1, 2):
        stream = b"".join(delta_stream(sig, tmp_path / "new", delta_format=fmt))
        assert stream[4] == fmt and (b"R" + _varint(len(noise)) + noise in stream) == (fmt == 2)
        patch_stream(tmp_path / "basis", [stream], tmp_path / f"out{fmt}")
        assert (tmp_path / f"out{fmt}").read_bytes() == new


def test_a_stored_literal_in_a_format_1_stream_is_refused(tmp_path: Path) -> None:
    (tmp_path / "basis").write_bytes(rand(40_000, 62))
    sig = make_signature(tmp_path / "basis")
    header = Header(sig.block_size, sig.basis_length, sig.basis_hash, 4096)
    writer = WireWriter(header, delta_format=1)
    writer._add(b"R" + _varint(4096) + b"x" * 4096)
    writer.end(4096, xxhash.xxh3_128_digest(b"x" * 4096))
    with pytest.raises(DeltaError, match="unknown token 0x52"):
        patch_stream(tmp_path / "basis", writer.drain(final=True), tmp_path / "out")
    assert not (tmp_path / "out").exists()
