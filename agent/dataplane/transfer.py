"""The destination's side of the data plane: pulling whole files and deltas from a peer."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from migctl.agent.dataplane.files import digest, write_stream
from migctl.agent.delta import DELTA_FORMAT, DeltaStats, Signature, patch_stream
from migctl.common.errors import DeltaError
from migctl.proto import migctl_pb2 as pb
from migctl.proto import migctl_pb2_grpc as rpc


def counted(chunks: Iterable[bytes], on_bytes: Callable[[int], None]) -> Iterator[bytes]:
    """CHUNKS as they are, ON_BYTES told the size of each (live progress)."""
    for data in chunks:
        on_bytes(len(data))
        yield data


def ignore_bytes(_: int) -> None:
    pass


def fetch_whole(peer: rpc.AgentStub, migration_id: str, path: str, dest: Path,
                expect_digest: str = "", size: int | None = None,
                timeout: float | None = None,
                on_bytes: Callable[[int], None] = ignore_bytes) -> int:
    """Pull a staged file whole; verify it against EXPECT_DIGEST when the peer gave one.

    With SIZE (as announced beforehand) the peer must send exactly that many bytes: it is cut
    off as soon as it sends more, and a short file is refused too.
    """
    ref = pb.FileRef(migration_id=migration_id, path=path)
    got = write_stream(counted((c.data for c in peer.FetchFile(ref, timeout=timeout)), on_bytes),
                       dest, max_bytes=size)
    if size is not None and got != size:
        dest.unlink(missing_ok=True)
        raise DeltaError(f"{path}: received {got} bytes but the source announced {size}")
    if expect_digest and digest(dest) != expect_digest:
        dest.unlink(missing_ok=True)
        raise DeltaError(f"{path}: received content does not match the source's digest")
    return got


def fetch_delta(peer: rpc.AgentStub, migration_id: str, path: str, basis: Path,
                signature: Signature, dest: Path, size: int | None = None,
                timeout: float | None = None,
                on_bytes: Callable[[int], None] = ignore_bytes) -> DeltaStats:
    """Pull a staged file as a delta against BASIS, whose SIGNATURE was computed beforehand.

    The patch step verifies the rebuilt file against the sender's whole-file hash, so a wrong
    basis or a corrupted stream raises instead of writing DEST; with SIZE (as announced
    beforehand) a delta announcing another length is refused before anything is written.
    """

    dest.parent.mkdir(parents=True, exist_ok=True)

    def requests() -> Iterator[pb.DeltaRequest]:
        yield pb.DeltaRequest(target=pb.FileRef(migration_id=migration_id, path=path),
                              delta_format=DELTA_FORMAT)
        for part in signature.to_chunks():
            yield pb.DeltaRequest(signature=part)

    chunks = counted((c.data for c in peer.FetchDelta(requests(), timeout=timeout)), on_bytes)
    return patch_stream(basis, chunks, dest, expect_length=size)
