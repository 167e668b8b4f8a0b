"""How long a neighbour gets before the destination falls back to the source.

A real gRPC server plays the neighbour; its first reply comes late, as a holder's does when it
must first export an image from its engine (`docker save`) before it can serve one layer.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from migctl.agent.catalog.registry import Holding
from migctl.agent.catalog.store import Store
from migctl.agent.migration import sourcing
from migctl.agent.migration.policy import Choice, Link, Links
from migctl.agent.migration.report import Report
from migctl.common.peer import Peer
from migctl.proto import migctl_pb2 as pb
from migctl.proto import migctl_pb2_grpc as rpc

LAYER = b"layer bytes " * 1000
DIFF_ID = "sha256:" + hashlib.sha256(LAYER).hexdigest()
FIRST_REPLY_S = 0.6  # the neighbour's delay before its first chunk


class LateHolder(rpc.AgentServicer):
    def ExportLayer(self, request: pb.LayerRef, context: Any) -> Iterator[pb.Chunk]:
        time.sleep(FIRST_REPLY_S)
        yield pb.Chunk(data=LAYER)

    def FetchHeld(self, request: pb.HeldRef, context: Any) -> Iterator[pb.Chunk]:
        time.sleep(FIRST_REPLY_S)
        yield pb.Chunk(data=LAYER)


class TheSource(Peer):
    """The migration's source, which serves every layer (counted)."""

    def __init__(self) -> None:  # no channel: nothing is called but ExportLayer
        self.name, self.address, self.asked = "nodeA", "", 0

    def stream(self, method: str, request: object, timeout: float | None
               ) -> Iterator[pb.Chunk]:
        assert method == "ExportLayer"
        self.asked += 1
        return iter([pb.Chunk(data=LAYER)])


class OneNode:
    pushed = False

    def __init__(self, address: str) -> None:
        self._address = address

    def address(self, node: str) -> str:
        assert node == "nodeC"
        return self._address


@pytest.fixture
def holder() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rpc.add_AgentServicer_to_server(LateHolder(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def _sourcing(address: str, tmp_path: Path) -> tuple[sourcing.Sourcing, list[str]]:
    logs: list[str] = []
    report = Report("m1", "svc", "nodeA", "nodeB",
                    emit=lambda e: logs.append(e.log) if e.HasField("log") else None)
    s = sourcing.Sourcing("nodeB", "nodeA", "m1", True, OneNode(address),  # type: ignore[arg-type]
                          Links(grpc.insecure_channel), Store(tmp_path / "store"),
                          lambda addr, node: grpc.insecure_channel(addr), report, pb.PRE_COPY)
    return s, logs


FAST = Link(rtt=0.001, throughput=1e9, load=0.0)


def test_a_layer_holder_gets_time_to_export_its_image(holder: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # a held file's holder is cut off after this; a layer's holder gets LAYER_EXPORT_S more
    monkeypatch.setattr(sourcing, "HOLDER_START_S", FIRST_REPLY_S / 3)
    s, logs = _sourcing(holder, tmp_path)
    choice = Choice(Holding(f"layer:{DIFF_ID}", "nodeC", 0.0, 0, DIFF_ID), FAST, "test")
    source = TheSource()
    s.fetch_layer(DIFF_ID, [choice], source, tmp_path / "layer.tar")
    assert source.asked == 0, logs
    assert (tmp_path / "layer.tar").read_bytes() == LAYER
    assert [t.origin for t in s.report.msg.transfers] == ["nodeC"]


def test_a_held_file_holder_that_is_slow_is_cut_off(holder: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sourcing, "HOLDER_START_S", FIRST_REPLY_S / 3)
    s, logs = _sourcing(holder, tmp_path)
    choice = Choice(Holding("rw:vol1", "nodeC", 1.0, len(LAYER), ""), FAST, "test")
    got = s.fetch_held("volume snapshot basis", "vol1", [choice], tmp_path / "basis.tar")
    assert got is None
    assert not (tmp_path / "basis.tar").exists()
    assert any("nodeC failed (nodeC: cannot reach the agent of nodeC" in line and
               "(DEADLINE_EXCEEDED)" in line for line in logs), logs
