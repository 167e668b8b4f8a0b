"""The agents a caller talks to: a client's node, a migration's source, the neighbours that hold
pieces of it, the source a rollback asks to resume. A Peer owns its channel, its stub and the
deadline of every call, and turns gRPC's statuses into the project's errors (common/errors.py),
naming the node, in this one place for the agent and the client alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc

from migctl.common.errors import MigctlError, from_status
from migctl.proto import migctl_pb2_grpc as rpc

UNARY_TIMEOUT = 300.0  # a checkpoint of a large container can take minutes

T = TypeVar("T")
Connect = Callable[..., grpc.Channel]
"""open_channel(address, tls, server_name) with this agent's TLS: (address, *node name)."""


def status_error(node: str, address: str, err: grpc.RpcError) -> MigctlError:
    """NODE's gRPC status as the project's error class for it, naming NODE (`err.node`)."""
    code = err.code()
    message = err.details() or code.name
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and \
            not message.startswith("cannot reach"):
        # the transport's words ("Socket closed") do not say that it was the agent
        message = f"cannot reach the agent of {node} at {address} ({code.name}): {message}"
    return from_status(code, message, node)


class Peer:
    """One node's agent. NAME pins its certificate (the node must prove it is that node); an
    empty NAME, for a link measured by address alone, accepts any node of the CA."""

    def __init__(self, name: str, address: str, connect: Connect) -> None:
        self.name, self.address = name, address
        self.channel = connect(address, name) if name else connect(address)
        self.stub = rpc.AgentStub(self.channel)

    def call(self, method: str, request: Any, timeout: float | None = UNARY_TIMEOUT) -> Any:
        """The unary (or client-streaming) METHOD with REQUEST, within TIMEOUT seconds."""
        return self.guarded(lambda: getattr(self.stub, method)(request, timeout=timeout))

    def stream(self, method: str, request: Any, timeout: float | None) -> Iterator[Any]:
        """The server stream METHOD, its errors mapped as it is read."""
        return self.guarded_iter(getattr(self.stub, method)(request, timeout=timeout))

    def guarded(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except grpc.RpcError as err:
            raise status_error(self.name or "the peer", self.address, err) from err

    def guarded_iter(self, items: Iterable[T]) -> Iterator[T]:
        try:
            yield from items
        except grpc.RpcError as err:
            raise status_error(self.name or "the peer", self.address, err) from err

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
