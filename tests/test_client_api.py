"""The Python client other services import (client.api): `migrate` returns the report, hands
every event to the callback in order, and an agent's status arrives as a typed error naming
the node. Two in-process fake agents behind the real role gate and mutual TLS; no lab.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from migctl.agent import certs
from migctl.agent.authz import Authorization
from migctl.agent.security import server_credentials
from migctl.client import api, cli
from migctl.common.peer import status_error
from migctl.common.tls import TLSFiles
from migctl.proto import migctl_pb2 as pb
from migctl.proto import migctl_pb2_grpc as rpc

EVENTS = [
    pb.MigrationEvent(phase_started=pb.PhaseReport(phase=pb.REQUEST)),
    pb.MigrationEvent(transfer=pb.TransferReport(kind="layer", item="sha256:ab", bytes=10)),
    pb.MigrationEvent(log="pre-flight checks passed"),
    pb.MigrationEvent(progress=pb.Progress(kind="volume snapshot", item="data",
                                           bytes_done=5, bytes_total=10)),
    pb.MigrationEvent(phase_done=pb.PhaseReport(phase=pb.REQUEST, seconds=0.5)),
]
REPORT = pb.MigrationReport(migration_id="m1", container="web", source_node="nodeA",
                            destination_node="nodeB", new_container_id="c0ffee")


@dataclass
class FakeAgent(rpc.AgentServicer):
    """Answers GetNode, Authorize and Migrate as told: FAIL maps an RPC to (code, message),
    raised after EVENTS when it is Migrate."""

    node: str
    fail: dict[str, tuple[grpc.StatusCode, str]] = field(default_factory=dict)
    report: bool = True
    migrations: list[pb.MigrateRequest] = field(default_factory=list)

    def _maybe_fail(self, name: str, context: grpc.ServicerContext) -> None:
        if name in self.fail:
            context.abort(*self.fail[name])

    def GetNode(self, request: Any, context: grpc.ServicerContext) -> pb.NodeInfo:
        self._maybe_fail("GetNode", context)
        return pb.NodeInfo(node=self.node)

    def Authorize(self, request: pb.AuthorizeRequest,
                  context: grpc.ServicerContext) -> pb.AuthorizeReply:
        self._maybe_fail("Authorize", context)
        return pb.AuthorizeReply(migration_id="m1", container_id="c1")

    def Migrate(self, request: pb.MigrateRequest,
                context: grpc.ServicerContext) -> Iterator[pb.MigrationEvent]:
        self.migrations.append(request)
        yield from EVENTS
        self._maybe_fail("Migrate", context)
        if self.report:
            yield pb.MigrationEvent(done=REPORT)


@dataclass
class Cluster:
    inventory: api.Inventory
    agents: dict[str, FakeAgent]


@pytest.fixture
def cluster(pki: Path) -> Iterator[Cluster]:
    servers, agents, nodes = [], {}, {}
    for name in ("nodeA", "nodeB"):
        agents[name] = FakeAgent(name)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                             interceptors=[Authorization()])
        rpc.add_AgentServicer_to_server(agents[name], server)
        files = TLSFiles.from_dir(certs.node_dir(pki, name), name)
        port = server.add_secure_port("127.0.0.1:0", server_credentials(files))
        server.start()
        servers.append(server)
        nodes[name] = api.Node(name, f"127.0.0.1:{port}")
    try:
        yield Cluster(api.Inventory(nodes, tls_dir=pki), agents)
    finally:
        for server in servers:
            server.stop(grace=None)


def test_migrate_returns_the_report_and_calls_back_in_order(cluster: Cluster) -> None:
    seen: list[pb.MigrationEvent] = []
    report = api.migrate(cluster.inventory, "web", "nodeA", "nodeB", on_event=seen.append,
                         mode="traditional", allow_privileged=True)
    assert report == REPORT
    assert seen == [*EVENTS, pb.MigrationEvent(done=REPORT)]
    [request] = cluster.agents["nodeB"].migrations
    assert (request.container, request.source_node, request.migration_id) == ("web", "nodeA",
                                                                             "m1")
    assert request.mode == pb.TRADITIONAL and request.allow_privileged


def test_migrate_without_a_callback(cluster: Cluster) -> None:
    assert api.migrate(cluster.inventory, "web", "nodeA", "nodeB") == REPORT


@pytest.mark.parametrize(("node", "rpc_name", "code", "cls"), [
    ("nodeA", "Authorize", grpc.StatusCode.NOT_FOUND, api.NotFound),
    ("nodeA", "Authorize", grpc.StatusCode.ALREADY_EXISTS, api.AlreadyExists),
    ("nodeB", "GetNode", grpc.StatusCode.UNAVAILABLE, api.Unavailable),
    ("nodeB", "Migrate", grpc.StatusCode.PERMISSION_DENIED, api.PermissionDenied),
    ("nodeB", "Migrate", grpc.StatusCode.FAILED_PRECONDITION, api.FailedPrecondition),
    ("nodeB", "Migrate", grpc.StatusCode.INVALID_ARGUMENT, api.InvalidArgument),
    ("nodeB", "Migrate", grpc.StatusCode.ABORTED, api.RuntimeFailure),
    ("nodeB", "Migrate", grpc.StatusCode.INTERNAL, api.MigctlError),
    ("nodeB", "Migrate", grpc.StatusCode.RESOURCE_EXHAUSTED, api.MigctlError),
    ("nodeB", "Migrate", grpc.StatusCode.DEADLINE_EXCEEDED, api.DeadlineExceeded),
    ("nodeB", "Migrate", grpc.StatusCode.UNIMPLEMENTED, api.Unimplemented),
])
def test_an_agent_status_is_a_typed_error_naming_the_node(
        cluster: Cluster, node: str, rpc_name: str, code: grpc.StatusCode, cls: type) -> None:
    cluster.agents[node].fail[rpc_name] = (code, "what the agent said")
    seen: list[pb.MigrationEvent] = []
    with pytest.raises(cls) as err:
        api.migrate(cluster.inventory, "web", "nodeA", "nodeB", on_event=seen.append)
    assert type(err.value) is cls
    assert isinstance(err.value, api.MigctlError)
    said = "what the agent said"
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        # the transport's words do not say who
        said = (f"cannot reach the agent of {node} at "
                f"{cluster.inventory.nodes[node].address} ({code.name}): {said}")
    assert (err.value.node, err.value.message, err.value.code) == (node, said, code)
    assert str(err.value) == f"{node}: {said}"
    # an error that ends the stream comes after the events that came before it
    assert seen == (EVENTS if rpc_name == "Migrate" else [])


def test_an_agent_that_does_not_answer_is_unavailable(cluster: Cluster, pki: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on once it is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nodes = dict(cluster.inventory.nodes, nodeB=api.Node("nodeB", f"127.0.0.1:{port}"))
    with pytest.raises(api.Unavailable) as err:
        api.migrate(api.Inventory(nodes, tls_dir=pki), "web", "nodeA", "nodeB")
    assert err.value.node == "nodeB"
    assert cluster.agents["nodeB"].migrations == []


def test_a_migration_that_ends_without_a_report_is_an_error(cluster: Cluster) -> None:
    cluster.agents["nodeB"].report = False
    with pytest.raises(api.MigctlError, match="nodeB ended the migration without a report"):
        api.migrate(cluster.inventory, "web", "nodeA", "nodeB")


def test_every_status_but_ok_has_a_class_that_says_it() -> None:
    for code in grpc.StatusCode:
        if code is grpc.StatusCode.OK:
            continue
        error = status_error("nodeA", "x:1", _Status(code, "why"))
        assert error.code is code and error.node == "nodeA"
        assert type(error).code in (code, grpc.StatusCode.INTERNAL)  # the base keeps its own


def test_the_client_raises_the_agents_own_error_classes() -> None:
    """One hierarchy: what an agent raises is what a client catches (the same classes)."""
    from migctl.common import errors

    assert api.Unavailable is errors.Unavailable and api.NotFound is errors.NotFound
    assert api.RuntimeFailure is errors.RuntimeFailure and api.MigctlError is errors.MigctlError
    local = errors.FailedPrecondition("a local refusal")
    assert (local.node, local.message) == ("", "a local refusal")


@dataclass
class _Status(grpc.RpcError):
    status: grpc.StatusCode
    text: str

    def code(self) -> grpc.StatusCode:
        return self.status

    def details(self) -> str:
        return self.text


def _cli(cluster: Cluster, tmp_path: Path, *args: str) -> int:
    inventory = tmp_path / "inventory.json"
    inventory.write_text(json.dumps({
        "tls_dir": str(cluster.inventory.tls_dir),
        "nodes": {n.name: {"address": n.address} for n in cluster.inventory.nodes.values()}}))
    with pytest.raises(SystemExit) as done:
        cli.main(["--inventory", str(inventory), *args])
    return done.value.code  # type: ignore[return-value]


def test_the_cli_prints_progress_and_the_report(cluster: Cluster, tmp_path: Path,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    assert _cli(cluster, tmp_path, "migrate", "--json", "--from", "nodeA", "--to", "nodeB",
                "web") == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["new_container_id"] == "c0ffee"
    assert err.splitlines() == ["▶ request", "  layer sha256:ab from : 10 B in 0.00 s ()",
                                "  pre-flight checks passed", "✓ request 0.50 s, 0 B"]


def test_the_cli_says_which_node_refused(cluster: Cluster, tmp_path: Path,
                                         capfd: pytest.CaptureFixture[str]) -> None:
    cluster.agents["nodeB"].fail["Migrate"] = (grpc.StatusCode.FAILED_PRECONDITION,
                                               "pre-flight check failed: no CRIU")
    assert _cli(cluster, tmp_path, "migrate", "-q", "--from", "nodeA", "--to", "nodeB",
                "web") == 1
    assert capfd.readouterr().err == ("migctl: error: nodeB: pre-flight check failed: "
                                       "no CRIU\n")
