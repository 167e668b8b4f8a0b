"""The final pass in one stream: every file the destination still needs once the container is
frozen, each as a delta against a basis the destination offered before the freeze, or whole.

Both ends of `FinalSync`: the source's `serve` turns (path, file) pairs into chunks, the
destination's `receive` splits the stream back into files, each held to the size announced in
its header and checked (a delta against the whole-file hash it carries, a whole file against
its digest) before it is handed on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from migctl.agent.dataplane.files import digest, write_stream
from migctl.agent.dataplane.transfer import counted, ignore_bytes
from migctl.agent.delta import DeltaStats, Signature, delta_stream, patch_stream
from migctl.common.errors import DeltaError, Refused
from migctl.proto import migctl_pb2 as pb

CHUNK = 1 << 20


def serve(items: Iterable[tuple[str, Path]], offers: dict[str, Signature],
          touch: Callable[[], None] = lambda: None, delta_format: int = 1
          ) -> Iterator[pb.FinalChunk]:
    """The source's side: each (staging path, file) as a header, then its delta (in the
    format the destination reads) or content."""
    for rel, path in items:
        size = path.stat().st_size
        signature = offers.get(rel)
        if signature is not None:
            yield pb.FinalChunk(item=pb.FinalItem(path=rel, size=size, method="delta"))
            for data in delta_stream(signature, path, delta_format=delta_format):
                touch()
                yield pb.FinalChunk(data=data)
            continue
        yield pb.FinalChunk(item=pb.FinalItem(path=rel, size=size, method="whole",
                                              digest=digest(path)))
        with path.open("rb") as f:
            while data := f.read(CHUNK):
                touch()
                yield pb.FinalChunk(data=data)


@dataclass
class Received:
    path: str
    method: str
    result: int | DeltaStats
    seconds: float


def receive(stream: Iterable[pb.FinalChunk], dest_of: Callable[[pb.FinalItem], Path],
            basis_of: Callable[[str], Path | None],
            meter_of: Callable[[pb.FinalItem], Callable[[int], None]] = lambda _: ignore_bytes
            ) -> Iterator[Received]:
    """The destination's side: DEST_OF checks each header (path, size) and says where the file
    goes; BASIS_OF gives the basis of a delta; METER_OF what to tell the size of each chunk
    of a file (live progress). Yields each file once it is complete and verified; a path sent
    twice, data before a header or a check that fails raises."""
    chunks = iter(stream)
    pending: list[pb.FinalItem] = []
    seen: set[str] = set()

    def data() -> Iterator[bytes]:
        for chunk in chunks:
            if chunk.HasField("item"):
                pending.append(chunk.item)
                return
            yield chunk.data

    for first in chunks:
        if not first.HasField("item"):
            raise Refused("the final pass sent data before naming its file")
        pending.append(first.item)
        while pending:
            item = pending.pop()
            if item.path in seen:
                raise Refused(f"the final pass sent {item.path!r} twice")
            seen.add(item.path)
            dest = dest_of(item)
            start = time.monotonic()
            body = data()
            result = _one(item, dest, basis_of, counted(body, meter_of(item)))
            if next(body, None) is not None:
                raise Refused(f"the final pass sent more for {item.path!r} than its "
                              f"{item.method} holds")
            yield Received(item.path, item.method, result, time.monotonic() - start)
        return


def _one(item: pb.FinalItem, dest: Path, basis_of: Callable[[str], Path | None],
         data: Iterator[bytes]) -> int | DeltaStats:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if item.method == "delta":
        basis = basis_of(item.path)
        if basis is None:
            raise Refused(f"the final pass sent {item.path!r} as a delta against no basis "
                          "offered")
        # the basis is this node's own copy, checked when it arrived: not hashed again now
        return patch_stream(basis, data, dest, expect_length=item.size, verify_basis=False)
    if item.method != "whole":
        raise Refused(f"the final pass sent {item.path!r} by an unknown method "
                      f"{item.method!r}")
    got = write_stream(data, dest, max_bytes=item.size)
    if got != item.size:
        dest.unlink(missing_ok=True)
        raise DeltaError(f"{item.path}: received {got} bytes but the source announced "
                         f"{item.size}")
    if digest(dest) != item.digest:
        dest.unlink(missing_ok=True)
        raise DeltaError(f"{item.path}: received content does not match the source's digest")
    return got
