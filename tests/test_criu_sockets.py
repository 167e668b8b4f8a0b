"""The connections a checkpoint restores, read from its images for the nudge of their peers
(agent/runtime/criu/sockets.py): only established IPv4 TCP sockets with a stream image."""

from __future__ import annotations

import ipaddress
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


def words(address: str) -> list[int]:
    """The address as CRIU's host writes it: its bytes read into words."""
    raw = ipaddress.ip_address(address).packed
    return list(struct.unpack(f"={len(raw) // 4}I", raw))


def inet(ino: int, src: tuple[str, int], dst: tuple[str, int], state: int = 1,
         proto: int = socket.IPPROTO_TCP) -> bytes:
    family = socket.AF_INET6 if ":" in src[0] else socket.AF_INET
    return img.file_entry(type=4, isk=img.inet_sk_entry(
        ino=ino, family=family, proto=proto, state=state, src_port=src[1], dst_port=dst[1],
        src_addr=words(src[0]), dst_addr=words(dst[0]))).SerializeToString()


def stream(folder: Path, ino: int, seq: int, queued: bytes = b"") -> None:
    """Its entry, then the bytes of its queues, raw (as CRIU writes them)."""
    path = image(folder / f"tcp-stream-{ino:x}.img", TCP_STREAM_MAGIC,
                 img.tcp_stream_entry(inq_len=len(queued), inq_seq=seq).SerializeToString())
    with path.open("ab") as f:
        f.write(queued)


def test_only_established_ipv4_tcp_connections_with_their_stream_are_read(tmp_path) -> None:
    ctr, client = ("192.168.50.130", 6379), ("192.168.50.7", 40112)
    image(tmp_path / "files.img", FILES_MAGIC,
          img.file_entry(type=1).SerializeToString(),  # a regular file
          inet(0x11, ctr, client),
          inet(0x12, (ctr[0], 6379), ("0.0.0.0", 0), state=LISTEN),
          inet(0x13, ctr, client, proto=socket.IPPROTO_UDP),
          inet(0x14, ctr, ("192.168.50.8", 1), state=CLOSE_WAIT),
          inet(0x15, ctr, ("192.168.50.9", 2)),  # no stream image: CRIU would not restore it
          inet(0x1ab, ctr, ("192.168.50.10", 3)),
          inet(0x16, ("::ffff:192.168.50.130", 8080), ("::ffff:192.168.50.11", 4)),  # on "::"
          inet(0x17, ("fd00::2", 8080), ("fd00::3", 5)))  # IPv6 itself: not nudged
    for ino, seq in ((0x11, 0xFFFFFFF0), (0x12, 1), (0x13, 1), (0x14, 1), (0x1ab, 77),
                     (0x16, 5), (0x17, 6)):
        stream(tmp_path, ino, seq)
    stream(tmp_path, 0x1ab, 77, queued=b"*2\r\n$4\r\nINCR\r\n$1\r\nn\r\n" * 1000)
    assert connections(tmp_path) == [
        Connection(ctr, client, 0xFFFFFFF0),
        Connection(ctr, ("192.168.50.10", 3), 77),
        Connection(("192.168.50.130", 8080), ("192.168.50.11", 4), 5)]


def test_a_checkpoint_without_sockets_has_no_connections(tmp_path) -> None:
    assert connections(tmp_path) == []


@pytest.mark.parametrize("content", [b"garbage!", struct.pack("<II", 0x54564319, FILES_MAGIC)
                                     + struct.pack("<I", 1 << 30)])
def test_a_malformed_socket_image_is_refused(tmp_path, content: bytes) -> None:
    (tmp_path / "files.img").write_bytes(content)
    with pytest.raises(Refused, match="files.img"):
        connections(tmp_path)


def test_a_connection_named_again_and_again_is_read_once_and_only_its_streams_head(
        tmp_path, monkeypatch) -> None:
    """A hostile source names one socket thousands of times, its stream image carrying 8 MiB
    of queue: it is one connection, and the queue is never read (it was, once per entry, 16 GB
    in all, before the restore)."""
    entry = inet(0x11, ("10.0.0.2", 80), ("10.0.0.9", 4000))
    image(tmp_path / "files.img", FILES_MAGIC, *[entry] * 2000)
    stream(tmp_path, 0x11, 1, queued=b"q" * (8 << 20))
    read = 0
    real_read, real_open = Path.read_bytes, Path.open

    def counting(self: Path) -> bytes:
        nonlocal read
        data = real_read(self)
        read += len(data)
        return data

    class Counted:  # a file the images are read from, its bytes counted
        def __init__(self, f) -> None:
            self.f = f

        def __enter__(self) -> Counted:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def read(self, n: int = -1) -> bytes:
            nonlocal read
            data = self.f.read(n)
            read += len(data)
            return data

    monkeypatch.setattr(Path, "read_bytes", counting)
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: Counted(real_open(self, *a, **k)))
    assert connections(tmp_path) == [Connection(("10.0.0.2", 80), ("10.0.0.9", 4000), 1)]
    assert read < 1 << 20, f"{read} bytes read"


def test_a_stream_image_whose_head_lies_is_refused(tmp_path) -> None:
    image(tmp_path / "files.img", FILES_MAGIC, inet(0x11, ("10.0.0.2", 80), ("10.0.0.9", 1)))
    head = struct.pack("<III", 0x54564319, TCP_STREAM_MAGIC, 1 << 20)
    (tmp_path / "tcp-stream-11.img").write_bytes(head + b"x" * 100)
    with pytest.raises(Refused, match="tcp-stream-11.img announces an entry"):
        connections(tmp_path)
    (tmp_path / "tcp-stream-11.img").write_bytes(head[:8] + struct.pack("<I", 50) + b"x")
    with pytest.raises(Refused, match="truncated"):
        connections(tmp_path)
