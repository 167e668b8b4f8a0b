"""What one caller may hold of an agent (agent.bounds): a node key opening silent streams no
longer starves the agent (second red team, 5). Real agents in this process (tests.inprocess)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import migctl.agent.bounds as bounds
from migctl.agent import certs
from migctl.common.channel import open_channel
from migctl.common.tls import TLSFiles
from migctl.proto import migctl_pb2 as pb
from migctl.proto import migctl_pb2_grpc as rpc
from tests.inprocess import agents

SILENT = 60  # more than the 32 workers an agent had, more than one caller's limit


def stub(pki: Path, address: str, identity: str) -> rpc.AgentStub:
    folder = certs.node_dir(pki, identity) if identity.startswith("node") else pki
    return rpc.AgentStub(open_channel(address, TLSFiles.from_dir(folder, identity),
                                      server_name="nodeA"))


def test_silent_streams_of_one_node_key_do_not_starve_the_agent(
        pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bounds, "FIRST_MESSAGE_S", 2.0)
    with agents(pki, tmp_path) as cluster:
        address = cluster.inventory.nodes["nodeA"].address
        hostile = stub(pki, address, "nodeB")
        never = threading.Event()

        def silence() -> Iterator[pb.DeltaRequest]:
            never.wait()  # opens the stream, never sends its first message
            yield pb.DeltaRequest()

        codes: list[grpc.StatusCode] = []
        lock = threading.Lock()

        def open_one() -> None:
            try:
                list(hostile.FetchDelta(silence(), timeout=60))
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
            with lock:
                codes.append(code)

        threads = [threading.Thread(target=open_one, daemon=True) for _ in range(SILENT)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # every stream opened (the workers they hold are taken)
        operator = stub(pki, address, "client")
        start = time.monotonic()
        info = operator.GetNode(pb.GetNodeRequest(), timeout=5)
        print(f"\n[bounds] GetNode beside {SILENT} silent streams: "
              f"{time.monotonic() - start:.2f} s")
        assert info.node == "nodeA"
        for t in threads:
            t.join(timeout=30)
        never.set()
        assert not any(t.is_alive() for t in threads), "a silent stream was never cut"
        refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        cut = codes.count(grpc.StatusCode.CANCELLED)
        assert refused == SILENT - bounds.PER_CALLER_RPCS, codes
        assert cut == bounds.PER_CALLER_RPCS, codes
        # the caller's slots are free again: a stream that speaks is served as before
        err = None
        try:
            list(hostile.FetchDelta(iter([pb.DeltaRequest(target=pb.FileRef(
                migration_id="0123456789abcdef", path="x"))]), timeout=10))
        except grpc.RpcError as e:
            err = e
        assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED, err


def test_silent_unary_calls_do_not_starve_the_agent_either(
        pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A unary call whose request never comes (found in review: grpc read it in a worker
    before any interceptor saw the call, and 165 of them made the operator's GetNode
    RESOURCE_EXHAUSTED). The same wire as a request stream that never sends."""
    monkeypatch.setattr(bounds, "FIRST_MESSAGE_S", 2.0)
    with agents(pki, tmp_path) as cluster:
        address = cluster.inventory.nodes["nodeA"].address
        channel = open_channel(address, TLSFiles.from_dir(certs.node_dir(pki, "nodeB"), "nodeB"),
                               server_name="nodeA")
        silent_get_node = channel.stream_unary(
            "/migctl.v1.Agent/GetNode",
            request_serializer=pb.GetNodeRequest.SerializeToString,
            response_deserializer=pb.NodeInfo.FromString)
        never = threading.Event()

        def silence() -> Iterator[pb.GetNodeRequest]:
            never.wait()
            yield pb.GetNodeRequest()

        codes: list[grpc.StatusCode] = []
        lock = threading.Lock()

        def open_one() -> None:
            try:
                silent_get_node(silence(), timeout=60)
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
            with lock:
                codes.append(code)

        threads = [threading.Thread(target=open_one, daemon=True) for _ in range(165)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        info = stub(pki, address, "client").GetNode(pb.GetNodeRequest(), timeout=5)
        assert info.node == "nodeA"
        for t in threads:
            t.join(timeout=30)
        never.set()
        assert not any(t.is_alive() for t in threads), "a silent call was never cut"
        assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}, \
            codes
        # and an honest unary call of that node is served as before
        assert stub(pki, address, "nodeB").GetNode(pb.GetNodeRequest(), timeout=5).node == \
            "nodeA"


class FakeContext:
    """What bounded() needs of a call: cancel, which ends the wait for the next message."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


def messages(ctx: FakeContext, first_after: float) -> Iterator[str]:
    time.sleep(first_after)
    yield "first"
    if ctx.cancelled.wait(30):  # silent until the call is cancelled, as a gRPC stream is
        raise grpc.RpcError("cancelled")
    yield "too late"


def test_a_stream_that_goes_silent_midway_is_cut() -> None:
    ctx = FakeContext()
    start = time.monotonic()
    seen = []
    with pytest.raises(grpc.RpcError):
        for m in bounds.bounded(messages(ctx, 0.1), ctx, first=2.0, then=1.0):  # type: ignore
            seen.append(m)
    assert seen == ["first"] and ctx.cancelled.is_set()
    assert time.monotonic() - start < 10


def test_a_first_message_that_never_comes_is_cut_and_a_timely_one_is_not() -> None:
    ctx = FakeContext()
    with pytest.raises(grpc.RpcError):
        list(bounds.bounded(messages(ctx, 0.0), ctx, first=1.0, then=0.5))  # type: ignore
    late = FakeContext()
    slow = messages(late, 3.0)  # the first message after 3 s: over a 1 s limit
    with pytest.raises(grpc.RpcError):
        list(bounds.bounded(slow, late, first=1.0, then=None))  # type: ignore
    assert late.cancelled.is_set()
    patient = FakeContext()
    stream = bounds.bounded(messages(patient, 0.2), patient, first=1.0, then=None)  # type: ignore
    assert next(stream) == "first"
    time.sleep(1.5)  # no limit after the first message: nothing is cut
    assert not patient.cancelled.is_set()


def test_a_caller_over_its_limit_is_told_why(pki: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    gate = bounds.Bounds(per_caller=1)
    assert gate._enter("nodeB") and not gate._enter("nodeB") and gate._enter("nodeA")
    gate._leave("nodeB")
    assert gate._enter("nodeB")
