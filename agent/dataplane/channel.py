"""gRPC channels and servers with the limits every stream of ours relies on."""

from __future__ import annotations

import grpc

MAX_MESSAGE = 16 << 20  # signature and delta messages stay near 1 MiB; this leaves headroom

OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def open_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=OPTIONS)
