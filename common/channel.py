"""gRPC channels and servers with the limits every stream of ours relies on."""

from __future__ import annotations

import grpc

from migctl.common.tls import TARGET_NAME, TLSFiles, secure_channel

MAX_MESSAGE = 16 << 20  # signature and delta messages stay near 1 MiB; this leaves headroom

OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def open_channel(address: str, tls: TLSFiles, server_name: str = TARGET_NAME) -> grpc.Channel:
    """A channel to an agent: always mutual TLS, with our certificate as identity. SERVER_NAME
    pins the node the caller means to reach (any node of our CA when not given)."""
    return secure_channel(address, tls, OPTIONS, server_name=server_name)
