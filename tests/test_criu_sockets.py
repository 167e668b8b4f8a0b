"""The connections a checkpoint restores, read from its images for the nudge of their peers
(agent/runtime/criu/sockets.py): only established IPv4 TCP sockets with a stream image."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from migctl.agent.runtime.criu import images_pb2 as img
from migctl.agent.runtime.criu.sockets import (
    FILES_MAGIC,
    TCP_STREAM_MAGIC,
    Connection,
    connections,
)
from migctl.common.errors import Refused
from tests.criu_kit import write as image

LISTEN, CLOSE_WAIT = 10, 8


def word(address: str) -> int:
    return struct.unpack("=I", socket.inet_aton(address))[0]


def inet(ino: int, src: tuple[str, int], dst: tuple[str, int], state: int = 1,
         family: int = socket.AF_INET, proto: int = socket.IPPROTO_TCP) -> bytes:
    return img.file_entry(type=4, isk=img.inet_sk_entry(
        ino=ino, family=family, proto=proto, state=state, src_port=src[1], dst_port=dst[1],
        src_addr=[word(src[0])], dst_addr=[word(dst[0])])).SerializeToString()


def stream(folder: Path, ino: int, seq: int) -> None:
    image(folder / f"tcp-stream-{ino:x}.img", TCP_STREAM_MAGIC,
          img.tcp_stream_entry(inq_len=0, inq_seq=seq).SerializeToString())


def test_only_established_ipv4_tcp_connections_with_their_stream_are_read(tmp_path) -> None:
    ctr, client = ("192.168.50.130", 6379), ("192.168.50.7", 40112)
    image(tmp_path / "files.img", FILES_MAGIC,
          img.file_entry(type=1).SerializeToString(),  # a regular file
          inet(0x11, ctr, client),
          inet(0x12, (ctr[0], 6379), ("0.0.0.0", 0), state=LISTEN),
          inet(0x13, ctr, client, proto=socket.IPPROTO_UDP),
          inet(0x14, ctr, ("192.168.50.8", 1), state=CLOSE_WAIT),
          inet(0x15, ctr, ("192.168.50.9", 2)),  # no stream image: CRIU would not restore it
          inet(0x1ab, ctr, ("192.168.50.10", 3)))
    for ino, seq in ((0x11, 0xFFFFFFF0), (0x12, 1), (0x13, 1), (0x14, 1), (0x1ab, 77)):
        stream(tmp_path, ino, seq)
    assert connections(tmp_path) == [
        Connection(ctr, client, 0xFFFFFFF0),
        Connection(ctr, ("192.168.50.10", 3), 77)]


def test_a_checkpoint_without_sockets_has_no_connections(tmp_path) -> None:
    assert connections(tmp_path) == []


@pytest.mark.parametrize("content", [b"garbage!", struct.pack("<II", 0x54564319, FILES_MAGIC)
                                     + struct.pack("<I", 1 << 30)])
def test_a_malformed_socket_image_is_refused(tmp_path, content: bytes) -> None:
    (tmp_path / "files.img").write_bytes(content)
    with pytest.raises(Refused, match="files.img"):
        connections(tmp_path)
