"""Delta wire format (rsync's token.c role): what the sender emits and the receiver trusts.

Layout, all integers little-endian, ``varint`` = unsigned LEB128::

    header   "MGDL" u8 version u8 flags(0) u32 block_size u64 basis_length 16s basis_hash
             u64 new_length                                  (repeated, and checked, in END)
    COPY     b"C" varint first_block varint block_count     run of consecutive basis blocks
    LITERAL  b"L" varint raw_length varint zstd_length zstd_frame
    STORED   b"R" varint raw_length raw_bytes               a literal zstd could not shrink
    END      b"E" u64 new_length 16s new_hash (xxh3_128)    must be the last byte of the stream

The stream is cut into chunks on token boundaries (<= 1 MiB each, ~256 KiB typical) so each
chunk fits one gRPC message, but the decoder treats the chunks as one byte stream and does not
depend on where they were cut.  Every length is bounded before anything is allocated, so a
corrupted or hostile stream costs at most ~1 MiB and ends in :class:`DeltaError`.

Incompressible literals (random data, encrypted or already compressed pages) go out STORED:
no frame overhead, nothing to decompress, and a receiver that meets no compressed literal
never loads zstandard (~10 ms of a patch command's start-up).
"""

from __future__ import annotations

import struct
from collections import namedtuple
from collections.abc import Iterable, Iterator

from migctl.common.errors import DeltaError

MAGIC = b"MGDL"
VERSION = 2
"""The newest delta format: 2 added STORED literals.  A reader takes every format up to it;
a writer writes the one its receiver asked for (:func:`agreed_format`)."""
HEADER = struct.Struct("<4sBBIQ16sQ")
END = struct.Struct("<Q16s")

TAG_COPY = 0x43
TAG_LITERAL = 0x4C
TAG_STORED = 0x52
TAG_END = 0x45

CHUNK_TARGET = 256 << 10
"""Chunks are emitted once they hold this much: big enough to amortise per-message costs."""
CHUNK_MAX = 1 << 20
"""Hard cap of one chunk (the gRPC message size the transport is configured for)."""
LITERAL_MAX = CHUNK_MAX - (64 << 10)
"""Largest raw literal in one token: its zstd frame plus token header still fits a chunk."""
MAX_BLOCK_SIZE = 1 << 20
ZSTD_LEVEL = 1
"""Fast level: literals are mostly fresh memory pages or random data where ratio barely moves."""


# namedtuple, not typing.NamedTuple: typing costs a delta process ~10 ms to import
Header = namedtuple("Header", "block_size basis_length basis_hash new_length")
Header.new_length.__doc__ = "Known up front so the receiver can preallocate (or refuse early)."
Copy = namedtuple("Copy", "index count")
Literal = namedtuple("Literal", "data")
End = namedtuple("End", "length digest")


Token = Copy | Literal | End


def agreed_format(asked: int) -> int:
    """The format to write for a receiver that reads formats up to ASKED (a peer's number: 0,
    from a receiver older than the question, means 1; more than this side knows, VERSION)."""
    return min(max(asked, 1), VERSION)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class WireWriter:
    """Buffers tokens and hands out chunks; one instance per delta stream."""

    def __init__(self, header: Header, *, level: int = ZSTD_LEVEL, delta_format: int = VERSION
                 ) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._ready: list[bytes] = []
        import zstandard

        self._zstd = zstandard.ZstdCompressor(level=level, write_checksum=False)
        self.wire_bytes = 0
        if not 1 <= delta_format <= VERSION:
            raise ValueError(f"no delta format {delta_format}")
        self._stored = delta_format >= 2
        self._add(HEADER.pack(MAGIC, delta_format, 0, *header))

    def copy(self, index: int, count: int) -> None:
        self._add(bytes([TAG_COPY]) + _varint(index) + _varint(count))

    def literal(self, raw: bytes | memoryview) -> None:
        """Compress and append one literal of at most :data:`LITERAL_MAX` bytes."""
        if len(raw) > LITERAL_MAX:
            raise ValueError("literal too large for one token")
        frame = self._zstd.compress(raw)
        if len(frame) < len(raw) or not self._stored:
            self.literal_frame(len(raw), frame)
        else:
            self._add(bytes([TAG_STORED]) + _varint(len(raw)), bytes(raw))

    def literal_frame(self, raw_length: int, frame: bytes) -> None:
        """Append a literal compressed elsewhere (e.g. by a worker thread)."""
        head = bytes([TAG_LITERAL]) + _varint(raw_length) + _varint(len(frame))
        self._add(head, frame)

    def end(self, length: int, digest: bytes) -> None:
        self._add(bytes([TAG_END]) + END.pack(length, digest))
        self._flush()

    def drain(self, final: bool = False) -> list[bytes]:
        """Chunks completed so far (the caller yields them); ``final`` also cuts the last one."""
        if final:
            self._flush()
        ready, self._ready = self._ready, []
        return ready

    def _add(self, *pieces: bytes) -> None:
        size = sum(len(p) for p in pieces)
        if self._size and self._size + size > CHUNK_MAX:
            self._flush()
        self._parts.extend(pieces)
        self._size += size
        if self._size >= CHUNK_TARGET:
            self._flush()

    def _flush(self) -> None:
        if not self._parts:
            return
        chunk = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts = []
        self._size = 0
        self.wire_bytes += len(chunk)
        self._ready.append(chunk)


class _ByteStream:
    """Reads exact byte counts from a chunk iterator without joining the whole stream."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buf: bytes | bytearray | memoryview = b""
        self._pos = 0
        self.consumed = 0

    def _next_chunk(self) -> bool:
        for chunk in self._chunks:
            if not isinstance(chunk, bytes | bytearray | memoryview):
                raise DeltaError(f"delta chunk has type {type(chunk).__name__}, expected bytes")
            if len(chunk):
                self._buf = chunk
                self._pos = 0
                return True
        return False

    def read(self, n: int) -> memoryview:
        avail = len(self._buf) - self._pos
        if avail >= n:
            start = self._pos
            self._pos += n
            self.consumed += n
            return memoryview(self._buf)[start : start + n]
        out = bytearray(memoryview(self._buf)[self._pos :])
        while len(out) < n:
            if not self._next_chunk():
                raise DeltaError("delta stream is truncated")
            take = min(n - len(out), len(self._buf))
            out += memoryview(self._buf)[:take]
            self._pos = take
        self.consumed += n
        return memoryview(out)

    def byte(self) -> int:
        if self._pos >= len(self._buf) and not self._next_chunk():
            raise DeltaError("delta stream is truncated")
        value = self._buf[self._pos]
        self._pos += 1
        self.consumed += 1
        return value

    def varint(self) -> int:
        value = 0
        for shift in range(0, 63, 7):
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
        raise DeltaError("delta stream has an over-long integer")

    def at_end(self) -> bool:
        return self._pos >= len(self._buf) and not self._next_chunk()


class WireReader:
    """Validating decoder: the header on construction, then tokens up to and including END."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._stream = _ByteStream(chunks)
        self._zstd = None  # loaded with the first compressed literal
        raw = self._stream.read(HEADER.size)
        magic, version, flags, block_size, basis_length, basis_hash, new_length = HEADER.unpack(raw)
        if magic != MAGIC:
            raise DeltaError("not a migctl delta stream (bad magic)")
        if not 1 <= version <= VERSION:
            raise DeltaError(f"unsupported delta format version {version}; expected 1 to "
                             f"{VERSION}")
        self.delta_format = version
        if flags != 0 or not 0 < block_size <= MAX_BLOCK_SIZE:
            raise DeltaError("delta header is corrupted")
        self.header = Header(block_size, basis_length, bytes(basis_hash), new_length)

    @property
    def wire_bytes(self) -> int:
        return self._stream.consumed

    def tokens(self) -> Iterator[Token]:
        stream = self._stream
        while True:
            tag = stream.byte()
            if tag == TAG_COPY:
                index = stream.varint()
                count = stream.varint()
                if count == 0:
                    raise DeltaError("delta has an empty copy instruction")
                yield Copy(index, count)
            elif tag == TAG_LITERAL:
                yield Literal(self._literal())
            elif tag == TAG_STORED and self.delta_format >= 2:
                raw_length = stream.varint()
                if not 0 < raw_length <= LITERAL_MAX:
                    raise DeltaError("delta literal has an impossible length")
                yield Literal(bytes(stream.read(raw_length)))
            elif tag == TAG_END:
                length, digest = END.unpack(stream.read(END.size))
                if not stream.at_end():
                    raise DeltaError("delta stream has data after its end marker")
                yield End(length, bytes(digest))
                return
            else:
                raise DeltaError(f"delta stream has an unknown token 0x{tag:02x}")

    def _literal(self) -> bytes:
        stream = self._stream
        raw_length = stream.varint()
        frame_length = stream.varint()
        if not 0 < raw_length <= LITERAL_MAX or not 0 < frame_length <= CHUNK_MAX:
            raise DeltaError("delta literal has an impossible length")
        frame = stream.read(frame_length)
        import zstandard

        if self._zstd is None:
            self._zstd = zstandard.ZstdDecompressor()
        try:
            declared = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as exc:
            raise DeltaError(f"delta literal is not a zstd frame: {exc}") from exc
        if declared != raw_length:
            raise DeltaError("delta literal has the wrong length")
        try:
            data = self._zstd.decompress(frame, max_output_size=raw_length)
        except zstandard.ZstdError as exc:
            raise DeltaError(f"delta literal does not decompress: {exc}") from exc
        if len(data) != raw_length:
            raise DeltaError("delta literal has the wrong length")
        return data
