"""CRIU's image files as the destination reads them: magics, then size-prefixed entries, read
with limits, each failure a refusal (the images come from a source that is not trusted)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

from google.protobuf.message import Message

from migctl.common.errors import Refused

IMG_COMMON_MAGIC = 0x54564319
CORE_MAGIC = 0x55053847
PSTREE_MAGIC = 0x50273030
SECCOMP_MAGIC = 0x64413049
MNTS_MAGIC = 0x55563928
IDS_MAGIC = 0x54432030
CGROUP_MAGIC = 0x59383330
MAX_ENTRY = 1 << 20  # a core entry is a few KB, a seccomp image a few filters of 32 KB


def entries(path: Path, magic: int, limit: int, max_entry: int = MAX_ENTRY
            ) -> Iterator[bytes]:
    """The entries of a CRIU image (after its two magics: a little-endian size, then that
    many bytes), at most LIMIT of them, each of MAX_ENTRY bytes at most. Read as they are
    taken: what follows the entries a caller takes is not read (a stream image's queues)."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8 or struct.unpack("<II", head) != (IMG_COMMON_MAGIC, magic):
            raise Refused(f"checkpoint image {path.name} is not the CRIU image it is named for")
        count = 0
        while prefix := f.read(4):
            if len(prefix) < 4:
                raise Refused(f"checkpoint image {path.name} is truncated")
            (size,) = struct.unpack("<I", prefix)
            if size > max_entry:
                raise Refused(f"checkpoint image {path.name} announces an entry of {size} "
                              "bytes")
            data = f.read(size)
            if len(data) < size:
                raise Refused(f"checkpoint image {path.name} is truncated: it announces an "
                              f"entry of {size} bytes")
            count += 1
            if count > limit:
                raise Refused(f"checkpoint image {path.name} holds more than {limit} entries")
            yield data


def parse(message: Message, data: bytes, name: str) -> Message:
    try:
        message.ParseFromString(data)
    except Exception as err:  # noqa: BLE001 - any decoding failure is a refusal
        raise Refused(f"checkpoint image {name} cannot be read: {err}") from None
    return message


M = TypeVar("M", bound=Message)


def first(path: Path, magic: int, message: M) -> M | None:
    """PATH's one entry, read into MESSAGE; None when it holds none."""
    found = list(entries(path, magic, 1))
    return parse(message, found[0], path.name) if found else None


def required(images: Path, name: str, magic: int, message: M, listed: str) -> M:
    """NAME's one entry, which CRIU reads for LISTED ("thread 7"): refused when the file is
    missing or empty."""
    path = images / name
    if not path.is_file():
        raise Refused(f"checkpoint {images.name} lists {listed} but has no {name}")
    got = first(path, magic, message)
    if got is None:
        raise Refused(f"checkpoint image {name} holds no entry")
    return got
