"""Signatures (rsync's generator role): what the receiver knows about its basis file.

Binary format, version 1, little-endian::

    "MGSG" u8 version u8 flags(0) u16 reserved(0) u32 block_size u64 basis_length
    u64 block_count 16s basis_hash            -- 44-byte header
    block_count x u32 weak sums
    block_count x 16s strong hashes (xxh3_128)
    u64 xxh3_64 of everything above            -- catches corruption in transit

The last block may be shorter than ``block_size``; its sums cover only its own bytes.
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
from collections.abc import Iterable, Iterator

import xxhash

from migctl.agent.delta.checksum import (
    EMPTY_HASH,
    STRONG_SIZE,
    release,
    strong_digest,
    strong_hashes,
)
from migctl.common.errors import DeltaError

TYPE_CHECKING = False  # typing costs a delta process ~10 ms to import
if TYPE_CHECKING:
    import numpy as np

MAGIC = b"MGSG"
VERSION = 1
HEADER = struct.Struct("<4sBBHIQQ16s")
TRAILER = struct.Struct("<Q")
CHUNK_MAX = 1 << 20
DEFAULT_BLOCK_SIZE = 4096
MIN_BLOCK_SIZE = 8
MAX_BLOCK_SIZE = 1 << 20
_READ_STEP = 8 << 20
_CAP_FLOOR = 64 << 20  # signature_block_cap: a basis this large is always plausible


def check_block_size(block_size: int) -> None:
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(
            f"block size {block_size} is outside {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE} bytes"
        )


class Signature:
    """Per-block weak/strong sums of a basis plus its whole-file hash.

    Kept as the wire's bytes (``weak_raw``: little-endian u32 sums, ``strong_raw``: 16-byte
    hashes back to back), so parsing one and matching against it need no numpy; ``weak`` and
    ``strong`` are numpy views, made on first use. (A plain class: importing dataclasses
    costs every `migctl-delta` process about 25 ms of start-up.)
    """

    def __init__(self, block_size: int, basis_length: int, weak_raw: bytes, strong_raw: bytes,
                 basis_hash: bytes) -> None:
        self.block_size = block_size
        self.basis_length = basis_length
        self.weak_raw = weak_raw
        self.strong_raw = strong_raw
        self.basis_hash = basis_hash
        n = -(-self.basis_length // self.block_size)
        if len(self.weak_raw) != 4 * n or len(self.strong_raw) != STRONG_SIZE * n:
            raise ValueError(f"a signature of {self.basis_length} bytes has {n} blocks' sums")

    @functools.cached_property
    def weak(self) -> np.ndarray:
        """``(n,)`` uint32 weak sums."""
        import numpy as np

        return np.frombuffer(self.weak_raw, dtype="<u4").astype(np.uint32)

    @functools.cached_property
    def strong(self) -> np.ndarray:
        """``(n, 16)`` uint8 strong hashes (read-only)."""
        import numpy as np

        return np.frombuffer(self.strong_raw, dtype=np.uint8).reshape(-1, STRONG_SIZE)

    @classmethod
    def empty(cls, block_size: int = DEFAULT_BLOCK_SIZE) -> Signature:
        """Signature of "no basis": every delta against it is all literal."""
        check_block_size(block_size)
        return cls(block_size, 0, b"", b"", EMPTY_HASH)

    @property
    def block_count(self) -> int:
        return len(self.strong_raw) // STRONG_SIZE

    @property
    def wire_size(self) -> int:
        """Bytes of :meth:`to_chunks`' output (to size a transfer's deadline)."""
        return HEADER.size + len(self.weak_raw) + len(self.strong_raw) + TRAILER.size

    def to_chunks(self) -> Iterator[bytes]:
        """Serialise as chunks of at most 1 MiB (one gRPC message each)."""
        n = self.block_count
        header = HEADER.pack(
            MAGIC, VERSION, 0, 0, self.block_size, self.basis_length, n, self.basis_hash
        )
        body = (header, self.weak_raw, self.strong_raw)
        checksum = xxhash.xxh3_64()
        pending = bytearray()
        for part in body:
            for off in range(0, len(part), CHUNK_MAX):
                piece = part[off : off + CHUNK_MAX]
                checksum.update(piece)
                room = CHUNK_MAX - len(pending)
                pending += piece[:room]
                if len(pending) == CHUNK_MAX:
                    yield bytes(pending)
                    pending = bytearray(piece[room:])
        pending += TRAILER.pack(checksum.intdigest())
        if len(pending) > CHUNK_MAX:
            yield bytes(pending[:CHUNK_MAX])
            pending = pending[CHUNK_MAX:]
        yield bytes(pending)

    @classmethod
    def from_chunks(cls, chunks: Iterable[bytes], max_blocks: int | None = None) -> Signature:
        """Parse and validate; any inconsistency is a :class:`DeltaError`.

        The signature comes from a peer: a header announcing more than ``max_blocks`` blocks
        is refused as soon as it is parsed, and no chunk is kept that would take the buffer
        past the size the header announced, so a hostile stream costs at most one chunk.
        """
        data = bytearray()
        expected: int | None = None
        header: tuple | None = None
        for chunk in chunks:
            if not isinstance(chunk, bytes | bytearray | memoryview):
                raise DeltaError(f"signature chunk has type {type(chunk).__name__}")
            if expected is not None and len(data) + len(chunk) > expected:
                raise DeltaError("signature has trailing data")
            data += chunk
            if header is None and len(data) >= HEADER.size:
                header = _parse_header(data)
                if max_blocks is not None and header[2] > max_blocks:
                    raise DeltaError(
                        f"signature announces {header[2]} blocks; at most {max_blocks} "
                        "are plausible for this file"
                    )
                expected = HEADER.size + header[2] * (4 + STRONG_SIZE) + TRAILER.size
                if len(data) > expected:
                    raise DeltaError("signature has trailing data")
        if expected is None or header is None or len(data) != expected:
            raise DeltaError("signature is truncated")
        block_size, basis_length, n, basis_hash = header
        body = memoryview(data)[: expected - TRAILER.size]
        (checksum,) = TRAILER.unpack_from(data, expected - TRAILER.size)
        if xxhash.xxh3_64_intdigest(body) != checksum:
            raise DeltaError("signature is corrupted (checksum mismatch)")
        weak_end = HEADER.size + 4 * n
        weak = bytes(body[HEADER.size : weak_end])
        strong = bytes(body[weak_end:])
        body.release()
        return cls(block_size, basis_length, weak, strong, basis_hash)


def _parse_header(data: bytearray) -> tuple[int, int, int, bytes]:
    magic, version, flags, reserved, block_size, basis_length, n, basis_hash = HEADER.unpack_from(
        data
    )
    if magic != MAGIC:
        raise DeltaError("not a migctl signature (bad magic)")
    if version != VERSION:
        raise DeltaError(f"unsupported signature version {version}; expected {VERSION}")
    if flags or reserved or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise DeltaError("signature header is corrupted")
    if n != -(-basis_length // block_size):
        raise DeltaError("signature block count does not match its basis length")
    return block_size, basis_length, n, bytes(basis_hash)


def signature_block_cap(target_size: int, block_size: int) -> int:
    """The most blocks a useful basis signature may announce when the sender's file (the
    delta's target) has TARGET_SIZE bytes: ``max_blocks`` for :meth:`Signature.from_chunks`.

    A basis larger than the target is legitimate (a volume that shrank still shares blocks
    with its old snapshot), so the cap is generous: four times the target's blocks, and never
    under 64 MiB worth. Unbounded, though, a peer could make the sender buffer and match
    against a signature of any size.
    """
    check_block_size(block_size)
    blocks = -(-target_size // block_size)
    return max(4 * blocks, -(-_CAP_FLOOR // block_size))


def make_signature(
    basis_path: str | os.PathLike[str], block_size: int = DEFAULT_BLOCK_SIZE
) -> Signature:
    """Compute the signature of a basis file, streaming it through a mapping.

    Pages are dropped from the mapping as soon as they are summed, so a basis larger than
    RAM costs only the signature itself (20 bytes per block) plus one read step.
    """
    import numpy as np

    from migctl.agent.delta.weak import block_weak, weak_of

    check_block_size(block_size)
    L = block_size
    with open(basis_path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return Signature.empty(block_size)
        n_full, tail = divmod(size, L)
        n = n_full + (1 if tail else 0)
        weak = np.empty(n, dtype=np.uint32)
        strong: list[bytes] = []
        whole = xxhash.xxh3_128()
        step = max(1, _READ_STEP // L) * L
        with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm:
            view = memoryview(mm)
            try:
                for off in range(0, n_full * L, step):
                    count = min(step, n_full * L - off) // L
                    blocks = np.frombuffer(view[off : off + count * L], dtype=np.uint8)
                    weak[off // L : off // L + count] = block_weak(blocks.reshape(count, L))
                    del blocks
                    strong.append(strong_hashes(view, off, count, L))
                    whole.update(view[off : off + count * L])
                    release(mm, off, off + count * L)
                if tail:
                    last = view[n_full * L :]
                    weak[n_full] = weak_of(last)
                    strong.append(strong_digest(last))
                    whole.update(last)
                    del last
            finally:
                view.release()
    return Signature(L, size, weak.astype("<u4").tobytes(), b"".join(strong), whole.digest())
