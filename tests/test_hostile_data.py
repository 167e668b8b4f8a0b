"""A hostile peer agent: every archive, signature, delta and file it sends is refused unless it
is exactly what an honest peer could have sent, before anything is written on this side."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import migctl.agent.delta.match as match_module
import migctl.agent.delta.patch as patch_module
from migctl.agent.dataplane import archive
from migctl.agent.dataplane.files import write_stream
from migctl.agent.dataplane.transfer import fetch_delta, fetch_whole
from migctl.agent.delta import (
    DELTA_FORMAT,
    Signature,
    delta_stream,
    make_signature,
    patch_stream,
    signature_block_cap,
)
from migctl.agent.delta.signature import EMPTY_HASH, HEADER, MAGIC, VERSION
from migctl.agent.delta.wire import CHUNK_MAX, Header, WireWriter
from migctl.common.errors import DeltaError, Refused
from migctl.proto import migctl_pb2 as pb

MIB = 1 << 20

# -- volume archives ----------------------------------------------------------------------------

REG, DIR, SYM, LNK = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE
FIFO, CHR, BLK = tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE
OUTSIDE = "<outside>"  # replaced by the absolute path of a file next to the volume
NEXT = "<next>"  # replaced by the directory holding the volume (and OUTSIDE)


def here(name: str, outside: Path) -> str:
    return name.replace(OUTSIDE, str(outside)).replace(NEXT, str(outside.parent))


def build(path: Path, entries: list[tuple], outside: Path,
          pax: dict[str, str] | None = None) -> None:
    """ENTRIES are (name, type[, linkname or content]) in archive order; PAX headers go on
    each."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, *rest in entries:
            ti = tarfile.TarInfo(here(name, outside))
            ti.type, ti.mode = kind, 0o755 if kind == DIR else 0o644
            ti.pax_headers.update(pax or {})
            data = b""
            if kind in (SYM, LNK):
                ti.linkname = here(rest[0], outside)
            elif kind == REG:
                data = rest[0] if rest else b"evil"
            elif kind in (CHR, BLK):
                ti.devmajor, ti.devminor = 1, 3
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data) if data else None)


def tree(root: Path) -> dict[str, object]:
    """Everything under ROOT, links as their targets: compared before and after a restore."""
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = ("->", os.readlink(p))
        elif p.is_dir():
            out[rel] = "dir"
        elif p.is_file():
            out[rel] = (p.read_bytes(), p.stat().st_nlink)
        else:  # never read a FIFO a hostile archive may have made: it would block
            out[rel] = ("special", p.lstat().st_mode)
    return out


HOSTILE = {
    "hard link outside, then a file of its name": [("x", LNK, "../outside"), ("x", REG)],
    "absolute hard link, then a file of its name": [("x", LNK, OUTSIDE), ("x", REG)],
    "hard link to /etc, then a file of its name": [("x", LNK, "/etc/x"), ("x", REG)],
    "hard link to a later member": [("a", LNK, "b"), ("b", REG)],
    "hard link to itself": [("a", LNK, "a")],
    "hard link to a symlink": [("s", SYM, OUTSIDE), ("h", LNK, "s"), ("h", REG)],
    "hard link to a symlink alone": [("s", SYM, OUTSIDE), ("h", LNK, "s")],
    "hard link to a directory": [("d", DIR), ("h", LNK, "d")],
    "hard link to a missing member": [("h", LNK, "nowhere")],
    "hard link through a symlink": [("s", SYM, NEXT), ("h", LNK, "s/outside"), ("h", REG)],
    "duplicate a and ./a": [("a", REG, b"one"), ("./a", REG, b"two")],
    "duplicate a/ and a": [("a/", DIR), ("a", REG)],
    "symlink outside, then a file of its name": [("x", SYM, OUTSIDE), ("x", REG)],
    "symlink outside, then ./x": [("x", SYM, OUTSIDE), ("./x", REG)],
    "hard link, then a file of its name": [("f", REG, b"ok"), ("h", LNK, "f"), ("h", REG)],
    "directory after its content": [("d/f", REG), ("d", SYM, OUTSIDE)],
    "character device": [("null", CHR)],
    "block device": [("disk", BLK)],
    "unknown type": [("odd", b"Z")],
    "entry below a symlink": [("s", SYM, NEXT), ("s/outside", REG)],
    "entry below a relative symlink": [("s", SYM, ".."), ("s/outside", REG)],
    "entry below a hard link": [("f", REG, b"ok"), ("h", LNK, "f"), ("h/x", REG)],
    "entry below a regular file": [("f", REG, b"ok"), ("f/x", REG)],
    "absolute name": [(OUTSIDE, REG)],
    "dot-dot name": [("../outside", REG)],
    "dot-dot inside a name": [("d/../../outside", REG)],
    "the volume itself, not first": [("a", REG), (".", DIR)],
    "the volume itself as a file": [(".", REG)],
    "an attribute of a namespace never copied": [("a", REG)],  # pax header set in the test
    "a FIFO with a user attribute": [("p", FIFO)],
    "an mtime of other digits": [("a", REG)],
    "sparse extents nested deep": [("a", REG)],
}
PAX = {
    "an attribute of a namespace never copied": {"MIGCTL.xattr.trusted.overlay.redirect": "2f"},
    "a FIFO with a user attribute": {"MIGCTL.xattr.user.x": "01"},
    "an mtime of other digits": {"MIGCTL.mtime": "\u00b2"},
    "sparse extents nested deep": {"MIGCTL.sparse": "[" * 5000 + "]" * 5000, "MIGCTL.size": "4"},
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_archives_are_refused_before_anything_is_touched(
    tmp_path: Path, case: str
) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"secret")
    volume = tmp_path / "vol"
    volume.mkdir()
    (volume / "keep").write_text("volume data")
    (volume / "sub").mkdir()
    os.symlink("keep", volume / "sub" / "link")
    before = tree(volume)
    bad = tmp_path / "bad.tar"
    build(bad, HOSTILE[case], outside, pax=PAX.get(case))

    with pytest.raises(Refused, match="hostile entry") as err:
        archive.restore(bad, volume)

    assert "'" in str(err.value), "the message must name the entry"
    assert tree(volume) == before, "a refused archive must change nothing"
    assert outside.read_bytes() == b"secret" and outside.stat().st_nlink == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar", "outside", "vol"]


def test_refusal_says_why(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    volume = tmp_path / "vol"
    volume.mkdir()
    reasons = {
        "hard link outside, then a file of its name": "'x'.*outside the volume",
        "hard link to a later member": "'a'.*hard link to 'b'.*earlier regular file",
        "duplicate a and ./a": "'./a'.*repeats an earlier",
        "character device": "'null'.*device",
        "entry below a symlink": "'s/outside'.*below 's'",
    }
    for case, why in reasons.items():
        build(tmp_path / "bad.tar", HOSTILE[case], outside)
        with pytest.raises(Refused, match=why):
            archive.restore(tmp_path / "bad.tar", volume)


def test_benign_archive_restores_exactly(tmp_path: Path) -> None:
    good = tmp_path / "good.tar"
    build(good, [
        ("d", DIR),
        ("d/f", REG, b"file in a dir"),
        ("./top", REG, b"top"),
        ("abs", SYM, "/etc/hostname"),  # a volume may hold these: nothing extracts through it
        ("rel", SYM, "d/f"),
        ("hard", LNK, "d/f"),
        ("d/e", DIR),
        ("d/e/hard2", LNK, "./top"),
    ], tmp_path / "outside")
    volume = tmp_path / "vol"
    volume.mkdir()
    (volume / "stale").write_text("must go")

    archive.restore(good, volume)

    assert tree(volume) == {
        "abs": ("->", "/etc/hostname"),
        "d": "dir",
        "d/e": "dir",
        "d/e/hard2": (b"top", 2),
        "d/f": (b"file in a dir", 2),
        "hard": (b"file in a dir", 2),
        "rel": ("->", "d/f"),
        "top": (b"top", 2),
    }
    assert os.path.samefile(volume / "hard", volume / "d/f")


def test_snapshot_of_a_volume_with_hard_links_and_a_fifo_restores(tmp_path: Path) -> None:
    """Our own snapshots pass the checks: hard links and FIFOs are kept."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "one").write_bytes(b"shared")
    os.link(src / "a" / "one", src / "z-two")
    os.symlink("/etc/hostname", src / "abs")
    os.mkfifo(src / "pipe")
    archive.snapshot(src, tmp_path / "snap.tar")
    volume = tmp_path / "vol"
    volume.mkdir()

    archive.restore(tmp_path / "snap.tar", volume)

    assert sorted(tree(volume)) == ["a", "a/one", "abs", "pipe", "z-two"]
    assert stat.S_ISFIFO((volume / "pipe").lstat().st_mode)
    assert os.path.samefile(volume / "a" / "one", volume / "z-two")


# -- signatures ---------------------------------------------------------------------------------


def test_signature_announcing_2_60_blocks_is_refused_after_one_chunk() -> None:
    block_size = 8
    blocks = 1 << 60
    header = HEADER.pack(MAGIC, VERSION, 0, 0, block_size, blocks * block_size, blocks,
                         bytes(16))
    pulled = 0

    def chunks() -> Iterator[bytes]:
        nonlocal pulled
        pulled += 1
        yield header + bytes(CHUNK_MAX - len(header))
        for _ in range(8):  # a bounded flood: an unfixed parser fails on "truncated" instead
            pulled += 1
            yield bytes(CHUNK_MAX)

    with pytest.raises(DeltaError, match=f"announces {blocks} blocks"):
        Signature.from_chunks(chunks(), max_blocks=signature_block_cap(10 * MIB, 4096))
    assert pulled == 1


def test_signature_cap_admits_honest_signatures_only(tmp_path: Path) -> None:
    (tmp_path / "basis").write_bytes(os.urandom(100_000))
    sig = make_signature(tmp_path / "basis", 64)
    n = sig.block_count
    back = Signature.from_chunks(sig.to_chunks(), max_blocks=n)
    assert back.block_count == n and bytes(back.strong) == bytes(sig.strong)
    with pytest.raises(DeltaError, match=f"announces {n} blocks; at most {n - 1}"):
        Signature.from_chunks(sig.to_chunks(), max_blocks=n - 1)


def test_signature_stream_never_grows_past_its_announced_size(tmp_path: Path) -> None:
    (tmp_path / "basis").write_bytes(os.urandom(50_000))
    good = b"".join(make_signature(tmp_path / "basis").to_chunks())
    for extra in ([good + b"x"], [good, b"x"], [good[:100], good[100:] + bytes(CHUNK_MAX)]):
        with pytest.raises(DeltaError, match="trailing"):
            Signature.from_chunks(extra)


def test_signature_block_cap() -> None:
    assert signature_block_cap(0, 4096) == (64 * MIB) // 4096
    assert signature_block_cap(1 << 30, 4096) == 4 * ((1 << 30) // 4096)
    assert signature_block_cap(4097 * 10_000, 4097) == 40_000
    # a volume that shrank to a quarter still deltas against its old snapshot
    assert signature_block_cap(256 * MIB, 4096) * 4096 >= 1 << 30


# -- deltas and whole files ---------------------------------------------------------------------


def tiny_delta_announcing(new_length: int) -> list[bytes]:
    """A few hundred bytes on the wire that announce a NEW_LENGTH-byte file."""
    writer = WireWriter(Header(4096, 0, EMPTY_HASH, new_length))
    writer.literal(b"x" * 400)
    writer.end(new_length, bytes(16))
    return writer.drain(final=True)


def test_delta_announcing_another_length_is_refused_before_any_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reserved: list[int] = []
    monkeypatch.setattr(patch_module, "_preallocate", lambda fd, n: reserved.append(n))
    chunks = tiny_delta_announcing(400 * MIB)
    assert sum(len(c) for c in chunks) < 1024

    with pytest.raises(DeltaError, match=f"announces {400 * MIB} bytes but the file was "
                                         "announced as 442"):
        patch_stream(None, chunks, tmp_path / "out", expect_length=442)

    assert reserved == [] and list(tmp_path.iterdir()) == []


def test_delta_with_the_announced_length_applies(tmp_path: Path) -> None:
    (tmp_path / "basis").write_bytes(os.urandom(30_000))
    new = (tmp_path / "basis").read_bytes()[:20_000] + b"changed" * 100
    (tmp_path / "new").write_bytes(new)
    sig = make_signature(tmp_path / "basis")
    patch_stream(tmp_path / "basis", delta_stream(sig, tmp_path / "new"), tmp_path / "out",
                 expect_length=len(new))
    assert (tmp_path / "out").read_bytes() == new
    with pytest.raises(DeltaError, match="announces"):
        patch_stream(tmp_path / "basis", delta_stream(sig, tmp_path / "new"),
                     tmp_path / "out2", expect_length=len(new) + 1)
    assert not (tmp_path / "out2").exists()


def test_write_stream_stops_at_the_first_chunk_over_max_bytes(tmp_path: Path) -> None:
    pulled = 0

    def flood() -> Iterator[bytes]:
        nonlocal pulled
        for _ in range(100):
            pulled += 1
            yield b"z" * 10

    with pytest.raises(DeltaError, match="more than the 15 bytes"):
        write_stream(flood(), tmp_path / "f", max_bytes=15)
    assert pulled == 2 and list(tmp_path.iterdir()) == []
    assert write_stream([b"z" * 10, b"z" * 5], tmp_path / "f", max_bytes=15) == 15


class FakePeer:
    """Stands in for a peer's AgentStub: sends what it is told, records the timeouts."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.timeouts: list[float | None] = []
        self.sent = 0

    def _send(self) -> Iterator[pb.Chunk]:
        for data in self.chunks:
            self.sent += 1
            yield pb.Chunk(data=data)

    def FetchFile(self, ref: pb.FileRef, timeout: float | None = None) -> Iterator[pb.Chunk]:
        self.timeouts.append(timeout)
        return self._send()

    def FetchDelta(self, requests: Iterator[pb.DeltaRequest], timeout: float | None = None
                   ) -> Iterator[pb.Chunk]:
        self.timeouts.append(timeout)
        self.requests = list(requests)
        return self._send()


def test_fetch_whole_wants_exactly_the_announced_size(tmp_path: Path) -> None:
    dest = tmp_path / "got" / "file"
    peer = FakePeer([b"a" * 100, b"b" * 100])
    assert fetch_whole(peer, "m1", "f", dest, "", 200, 30.0) == 200  # type: ignore[arg-type]
    assert dest.read_bytes() == b"a" * 100 + b"b" * 100 and peer.timeouts == [30.0]
    dest.unlink()

    flood = FakePeer([b"a" * 100] * 50)
    with pytest.raises(DeltaError, match="more than the 150 bytes"):
        fetch_whole(flood, "m1", "f", dest, size=150)  # type: ignore[arg-type]
    assert flood.sent == 2 and list(dest.parent.iterdir()) == []

    with pytest.raises(DeltaError, match="received 200 bytes but the source announced 300"):
        fetch_whole(FakePeer([b"a" * 200]), "m1", "f", dest, size=300)  # type: ignore[arg-type]
    assert list(dest.parent.iterdir()) == []


def test_fetch_delta_refuses_a_delta_of_another_length(tmp_path: Path) -> None:
    peer = FakePeer(tiny_delta_announcing(400 * MIB))
    dest = tmp_path / "got" / "file"
    with pytest.raises(DeltaError, match="announces"):
        fetch_delta(peer, "m1", "f", None, Signature.empty(), dest,  # type: ignore[arg-type]
                    442, 5.0)
    assert peer.timeouts == [5.0] and list(dest.parent.iterdir()) == []
    assert peer.requests[0].delta_format == DELTA_FORMAT  # asks for the newest it reads


@pytest.mark.parametrize("announced", [64 << 30, 1 << 62])
def test_delta_announcing_a_huge_length_fails_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, announced: int
) -> None:
    """Without a length to check against (the command's use), a header promising more than
    any mapping holds (or a large one the output is mapped at, to be hashed as written) ends
    in a clear error and no file.  Preallocation is left out: on a disk with more free space
    than announced it would reserve it (until the failure), which is another test's matter."""
    monkeypatch.setattr(patch_module, "_preallocate", lambda fd, n: None)
    with pytest.raises(DeltaError, match=f"rebuilt file has 400 bytes but the delta promised "
                                         f"{announced}"):
        patch_stream(None, tiny_delta_announcing(announced), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# -- a signature crafted against the sender's block index ----------------------------------------


def chaining_heads(m: int, rng: np.random.Generator) -> np.ndarray:
    """64-bit values that, used as int dict keys (an int hashes to itself), make a dict of
    2^m slots probe along one long chain on every insert: 60 % fill one stretch of the probe
    cycle i -> 5i + 1, the rest start elsewhere and perturb their way onto that stretch."""
    size = 1 << m
    mask = size - 1
    filler = np.empty(int(0.6 * size), dtype=np.uint64)
    c = 0
    for k in range(len(filler)):
        filler[k] = c
        c = (5 * c + 1) & mask
    taken = np.zeros(size, dtype=bool)
    taken[filler] = True
    cand = np.arange(size, 1 << 21, dtype=np.uint64)
    i, p, ok = cand & np.uint64(mask), cand.copy(), np.ones(len(cand), dtype=bool)
    ok &= taken[i]
    while p.any():
        p >>= np.uint64(5)
        i = (i * np.uint64(5) + p + np.uint64(1)) & np.uint64(mask)
        ok &= taken[i]
    attackers = cand[ok]
    rng.shuffle(attackers)
    return np.concatenate([filler, attackers[: (2 * size) // 3 - len(filler) - 16]])


def dict_probes(hashes: list[int], size: int, cap: int) -> int:
    """Collisions met inserting HASHES into CPython's open-addressed table of SIZE slots
    (its probe sequence: i = hash & mask, then i = 5i + perturb + 1, perturb >>= 5)."""
    used, mask, probes = bytearray(size), size - 1, 0
    for h in hashes:
        h &= (1 << 64) - 1
        i, perturb = h & mask, h
        while used[i]:
            probes += 1
            if probes > cap:
                return probes
            perturb >>= 5
            i = (i * 5 + perturb + 1) & mask
        used[i] = 1
    return probes


def test_a_signature_cannot_make_the_block_index_chain() -> None:
    """A hostile receiver picks the strong hashes its signature announces.  Keys whose hash
    it could predict (ints: 64-bit heads) let it chain every insert (seconds for 100 000
    blocks, minutes at the block cap, with the GIL held); the index's keys must hash as the
    peer cannot foresee.  Counted on CPython's probe sequence, not timed."""
    m = 14
    rng = np.random.default_rng(3)
    heads = chaining_heads(m, rng)
    n = len(heads)
    strong = np.empty((n, 2), dtype=np.uint64)
    strong[:, 0] = heads
    strong[:, 1] = rng.integers(0, 1 << 63, n, dtype=np.uint64)
    weak = rng.integers(0, 1 << 32, n, dtype=np.uint32).astype("<u4").tobytes()
    sig = Signature(4096, n * 4096, weak, strong.tobytes(), b"\1" * 16)
    assert dict_probes([int(h) for h in heads], 1 << m, cap=10 * n) > 10 * n  # the attack
    index = match_module._Index(sig)
    assert len(index.blocks) == n
    assert dict_probes([hash(k) for k in index.blocks], 1 << m, cap=10 * n) <= 2 * n


def test_what_the_kernel_refuses_at_extraction_is_a_refusal(tmp_path: Path) -> None:
    """An ACL value the kernel finds invalid passes the checks (its bytes are the kernel's to
    read) and fails at setxattr: a Refused, which the migration rolls back, not a crash."""
    bad = tmp_path / "bad.tar"
    build(bad, [("a", REG)], tmp_path / "outside",
          pax={"MIGCTL.xattr.system.posix_acl_access": "00"})
    volume = tmp_path / "vol"
    volume.mkdir()
    with pytest.raises(Refused, match="could not be extracted as archived"):
        archive.restore(bad, volume)


def test_a_file_from_before_1970_moves(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "old").write_text("punched cards")
    os.utime(src / "old", ns=(-86_400 * 10**9 - 5, -86_400 * 10**9 - 5))
    archive.snapshot(src, tmp_path / "snap.tar")
    volume = tmp_path / "vol"
    volume.mkdir()
    archive.restore(tmp_path / "snap.tar", volume)
    assert (volume / "old").stat().st_mtime_ns == -86_400 * 10**9 - 5
