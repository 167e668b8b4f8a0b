"""The established TCP connections a checkpoint restores, read from its images for the nudge of
their peers after a restore (netns.nudge): the addresses and ports of each IPv4 socket in
files.img, and where its receive queue stands in tcp-stream-<ino>.img.

The images come from the source: what they say is a claim. The nudge sends only to connections
the restored container's own socket table holds, so a made-up entry is never acted on."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from migctl.agent.runtime.criu import images_pb2 as img
from migctl.agent.runtime.criu.imagefile import entries, first, parse

FILES_MAGIC = 0x56303138
TCP_STREAM_MAGIC = 0x51465506
FD_INETSK = 4
TCP_ESTABLISHED = 1
MAX_FILES = 1 << 20  # one entry per open file of the container's processes


@dataclass(frozen=True)
class Connection:
    local: tuple[str, int]
    peer: tuple[str, int]
    rcv_nxt: int  # the next byte the container expects: the first its peer has not seen acked


def _address(words: list[int]) -> str:
    """An IPv4 address from CRIU's words: the address's bytes, read into a word on its host."""
    return socket.inet_ntoa(struct.pack("=I", words[0]))


def connections(images: Path) -> list[Connection]:
    """The established IPv4 TCP connections in IMAGES (Refused when an image cannot be read);
    one without its stream image is left out (CRIU would not restore it either)."""
    files = images / "files.img"
    if not files.is_file():
        return []
    found = []
    for data in entries(files, FILES_MAGIC, MAX_FILES):
        entry = parse(img.file_entry(), data, files.name)
        isk = entry.isk
        if (entry.type != FD_INETSK or isk.family != socket.AF_INET
                or isk.proto != socket.IPPROTO_TCP or isk.state != TCP_ESTABLISHED
                or len(isk.src_addr) != 1 or len(isk.dst_addr) != 1):
            continue
        stream = images / f"tcp-stream-{isk.ino:x}.img"
        got = first(stream, TCP_STREAM_MAGIC, img.tcp_stream_entry()) if stream.is_file() \
            else None
        if got is None or not got.HasField("inq_seq"):
            continue
        found.append(Connection((_address(isk.src_addr), isk.src_port & 0xFFFF),
                                (_address(isk.dst_addr), isk.dst_port & 0xFFFF), got.inq_seq))
    return found
