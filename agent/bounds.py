"""How much of an agent one caller may hold: RPCs in flight, and time between stream messages.

A valid certificate proves who calls, not that it will ever send what it opened a stream
for. Without bounds, 40 silent streams from one node key held every worker of the server,
and the operator's GetNode timed out. This gate sits behind the role gate (agent.authz):
  - a caller (one certificate) has at most PER_CALLER_RPCS calls in flight; the server at most
    SERVER_RPCS (grpc's own limit), so that others always find a worker;
  - a client stream's first message must come within FIRST_MESSAGE_S, and each later one
    within the method's NEXT_MESSAGE_S: otherwise the call is cancelled and its worker freed;
    the Agent service's unary requests are read the same way (_read_by_us).
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from migctl.agent.authz import SERVICE
from migctl.agent.security import caller_of

PER_CALLER_RPCS = 48
"""Calls one certificate may have in flight. A destination's migration holds about eight at
its source (the hold, the page tunnel, four transfers, a probe, a checkpoint), and the fault
tests run five migrations between the same two nodes at once."""
SERVER_RPCS = 160
"""Calls the server takes at once (grpc answers RESOURCE_EXHAUSTED beyond): every caller's
limit can never add up to all of it while workers remain for the others."""
SERVER_WORKERS = SERVER_RPCS
FIRST_MESSAGE_S = 10.0
"""A client stream's first message names its migration, checked before anything else."""
NEXT_MESSAGE_S: dict[str, float | None] = {
    "Hold": 10.0,         # beats every 0.25 s: ten seconds of silence is a dead destination
    "OfferBases": 60.0,   # signatures, chunk after chunk
    "FetchDelta": 60.0,
    "PageTunnel": None,   # bound to a live migration: opened in pre-copy, used at the freeze
}
DEFAULT_NEXT_MESSAGE_S = 60.0
WATCH_PERIOD_S = 0.2


class _Watch:
    """One thread for every waiting stream: cancels the calls whose wait ran out."""

    def __init__(self) -> None:
        self._waits: dict[int, tuple[float, grpc.ServicerContext]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float, context: grpc.ServicerContext) -> int:
        key = next(self._ids)
        with self._lock:
            self._waits[key] = (time.monotonic() + seconds, context)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stream-watch",
                                                daemon=True)
                self._thread.start()
        return key

    def disarm(self, key: int) -> None:
        with self._lock:
            self._waits.pop(key, None)

    def _run(self) -> None:
        while True:
            time.sleep(WATCH_PERIOD_S)
            now = time.monotonic()
            with self._lock:
                late = [k for k, (deadline, _) in self._waits.items() if deadline < now]
                contexts = [self._waits.pop(k)[1] for k in late]
            for context in contexts:
                context.cancel()


_WATCH = _Watch()


def bounded(requests: Iterator[Any], context: grpc.ServicerContext, first: float,
            then: float | None) -> Iterator[Any]:
    """REQUESTS, each waited for at most FIRST (the first) or THEN seconds (None: forever)."""
    limit: float | None = first
    while True:
        key = _WATCH.arm(limit, context) if limit is not None else None
        try:
            message = next(requests)
        except StopIteration:
            return
        finally:
            if key is not None:
                _WATCH.disarm(key)
        yield message
        limit = then


class Bounds(grpc.ServerInterceptor):
    def __init__(self, per_caller: int = PER_CALLER_RPCS) -> None:
        self.per_caller = per_caller
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()

    def _enter(self, who: str) -> bool:
        with self._lock:
            if self._in_flight.get(who, 0) >= self.per_caller:
                return False
            self._in_flight[who] = self._in_flight.get(who, 0) + 1
            return True

    def _leave(self, who: str) -> None:
        with self._lock:
            left = self._in_flight.get(who, 1) - 1
            if left:
                self._in_flight[who] = left
            else:
                self._in_flight.pop(who, None)

    def intercept_service(self, continuation: Callable, details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        name = details.method.rpartition("/")[2]
        then = NEXT_MESSAGE_S.get(name, DEFAULT_NEXT_MESSAGE_S)
        streamed = handler.request_streaming
        if not streamed and details.method.startswith(f"/{SERVICE}/"):
            handler = _read_by_us(handler)  # its one request is waited for with a deadline

        def guard(behaviour: Callable) -> Callable:
            @functools.wraps(behaviour)
            def limited(request: Any, context: grpc.ServicerContext, *args: Any,
                        **kwargs: Any) -> Any:
                caller = caller_of(context)
                who = caller.name if caller else "?"
                if not self._enter(who):
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"{who} has {self.per_caller} calls in flight here already; "
                                  "retry when one has ended")
                if not context.add_callback(lambda: self._leave(who)):
                    self._leave(who)  # the call already ended
                if handler.request_streaming:
                    request = bounded(request, context, FIRST_MESSAGE_S, then)
                return behaviour(request, context, *args, **kwargs)

            return limited

        kind = ("stream" if handler.request_streaming else "unary") + "_" + (
            "stream" if handler.response_streaming else "unary")
        return handler._replace(**{kind: guard(getattr(handler, kind))})


def _read_by_us(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """HANDLER of a unary request, served as a request stream: grpc's server reads a unary
    request in a worker before any interceptor sees the call, so a caller that never sent it
    held the worker for good (165 such calls from one node key starved the operator). Read as
    a stream, the one request is waited for under FIRST_MESSAGE_S like any first message. The
    wire is the same: a request stream of one message."""
    behaviour = handler.unary_stream if handler.response_streaming else handler.unary_unary

    def first(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        request = next(requests, None)
        if request is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call sent no request")
        return behaviour(request, context)

    make = (grpc.stream_stream_rpc_method_handler if handler.response_streaming
            else grpc.stream_unary_rpc_method_handler)
    return make(first, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
