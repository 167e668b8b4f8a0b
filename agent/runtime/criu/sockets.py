"""The established TCP connections over IPv4 a checkpoint restores, read from its images for
the nudge of their peers after a restore (netns.nudge): the addresses and ports of each inet
socket in files.img, and where its receive queue stands in tcp-stream-<ino>.img.

The images come from the source: what they say is a claim. The nudge sends only to connections
the restored container's own socket table holds, so a made-up entry is never acted on."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from migctl.agent.runtime.criu import images_pb2 as img
from migctl.agent.runtime.criu.imagefile import entries, parse
from migctl.common.errors import Refused

FILES_MAGIC = 0x56303138
TCP_STREAM_MAGIC = 0x51465506
FD_INETSK = 4
TCP_ESTABLISHED = 1
MAX_FILES = 1 << 20  # one entry per open file of the container's processes
MAX_CONNECTIONS = 4096  # what the nudge acts on at most (each costs a few small packets)
MAX_STREAM_ENTRY = 4096  # a stream entry is a few dozen bytes


@dataclass(frozen=True)
class Connection:
    local: tuple[str, int]
    peer: tuple[str, int]
    rcv_nxt: int  # the next byte the container expects: the first its peer has not seen acked


def ipv4(words: list[int]) -> str | None:
    """The IPv4 address in CRIU's words (the address's bytes, read into words on its host):
    one word, or an IPv6 socket's four holding an IPv4-mapped address (servers that listen on
    "::" take IPv4 clients so, busybox nc for one); None for any other."""
    raw = struct.pack(f"={len(words)}I", *words)
    if len(raw) == 4:
        return socket.inet_ntoa(raw)
    if len(raw) == 16:
        mapped = ipaddress.IPv6Address(raw).ipv4_mapped
        return str(mapped) if mapped is not None else None
    return None


def connections(images: Path) -> list[Connection]:
    """The established IPv4 TCP connections in IMAGES, each once, at most MAX_CONNECTIONS
    (Refused when an image cannot be read); one without its stream image is left out (CRIU
    would not restore it either)."""
    files = images / "files.img"
    if not files.is_file():
        return []
    found: dict[int, Connection] = {}
    for data in entries(files, FILES_MAGIC, MAX_FILES):
        entry = parse(img.file_entry(), data, files.name)
        isk = entry.isk
        if (entry.type != FD_INETSK or isk.family not in (socket.AF_INET, socket.AF_INET6)
                or isk.proto != socket.IPPROTO_TCP or isk.state != TCP_ESTABLISHED
                or isk.ino in found):
            continue
        local, peer = ipv4(list(isk.src_addr)), ipv4(list(isk.dst_addr))
        if local is None or peer is None:
            continue
        got = stream_entry(images / f"tcp-stream-{isk.ino:x}.img")
        if got is None or not got.HasField("inq_seq"):
            continue
        found[isk.ino] = Connection((local, isk.src_port & 0xFFFF), (peer, isk.dst_port & 0xFFFF),
                                    got.inq_seq)
        if len(found) >= MAX_CONNECTIONS:
            break
    return list(found.values())


def stream_entry(path: Path) -> img.tcp_stream_entry | None:
    """The entry at the head of a stream image, read alone: the queues' bytes follow it raw,
    as much as the socket held, and are not read."""
    if not path.is_file():
        return None
    with contextlib.closing(entries(path, TCP_STREAM_MAGIC, 1, MAX_STREAM_ENTRY)) as found:
        data = next(found, None)
    if data is None:
        raise Refused(f"checkpoint image {path.name} holds no entry")
    return parse(img.tcp_stream_entry(), data, path.name)
