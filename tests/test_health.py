"""The standard services every agent serves (agent.server `agent_server`): gRPC health follows
the node's engine and CRIU, reflection lists the contract, and both sit behind the same mutual
TLS and role gate as the Agent service. A real in-process server with real certificates; the
runtime is faked.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2 as hpb
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from migctl.agent import certs
from migctl.agent.authz import SERVICE
from migctl.agent.health import NodeHealth, unfit
from migctl.agent.security import NODE_OU, server_credentials
from migctl.agent.server import agent_server
from migctl.common.errors import Unavailable
from migctl.common.tls import TLSFiles, secure_channel
from migctl.proto import migctl_pb2_grpc as rpc
from tests.test_security import CLIENT, _forge

DEADLINE = 30  # only so a broken build fails instead of hanging; no assertion depends on it
SERVING, NOT_SERVING = hpb.HealthCheckResponse.SERVING, hpb.HealthCheckResponse.NOT_SERVING


@dataclass
class FakeRuntime:
    """Just what the health check asks: an engine that may stop answering, and CRIU."""

    answers: bool = True
    criu: str = "4.2.1"
    checkpoints: bool = True

    def ping(self) -> None:
        if not self.answers:
            raise Unavailable("cannot reach the engine: connection refused")

    def versions(self) -> tuple[str, str, bool]:
        self.ping()
        return "27.5.1", self.criu, self.checkpoints


@dataclass
class Agent:
    address: str
    runtime: FakeRuntime


@pytest.fixture
def agent(pki: Path) -> Iterator[Agent]:
    runtime = FakeRuntime()
    node_health = NodeHealth(runtime)  # type: ignore[arg-type]
    server = agent_server(rpc.AgentServicer(), node_health)
    files = TLSFiles.from_dir(certs.node_dir(pki, "nodeA"), "nodeA")
    port = server.add_secure_port("127.0.0.1:0", server_credentials(files))
    server.start()
    node_health.start(interval=0.05)
    try:
        yield Agent(f"127.0.0.1:{port}", runtime)
    finally:
        node_health.stop()
        server.stop(grace=None)


def _operator(pki: Path) -> TLSFiles:
    return TLSFiles.from_dir(pki, "client")


def _node(pki: Path) -> TLSFiles:
    return TLSFiles.from_dir(certs.node_dir(pki, "nodeB"), "nodeB")


def _check(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(hpb.HealthCheckRequest(service=service), timeout=DEADLINE).status


def _next_change(watch: Iterator[hpb.HealthCheckResponse], status: int) -> None:
    """Read the watch until STATUS (the first message is whatever held when it began)."""
    for reply in watch:
        if reply.status == status:
            return
    name = hpb.HealthCheckResponse.ServingStatus.Name(status)
    raise AssertionError(f"the watch ended before {name}")


@pytest.mark.parametrize("who", [_operator, _node])
def test_health_follows_the_engine(pki: Path, agent: Agent, who) -> None:
    with secure_channel(agent.address, who(pki)) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            hpb.HealthCheckRequest(service=SERVICE), timeout=DEADLINE)
        _next_change(watch, SERVING)
        assert _check(channel) == SERVING and _check(channel, SERVICE) == SERVING

        agent.runtime.answers = False
        # statuses change only when the answer does: the next message is the change
        assert next(watch).status == NOT_SERVING
        assert _check(channel) == NOT_SERVING and _check(channel, SERVICE) == NOT_SERVING

        agent.runtime.answers = True
        assert next(watch).status == SERVING
        assert _check(channel) == SERVING and _check(channel, SERVICE) == SERVING
        watch.cancel()


def test_unfit_names_what_is_missing() -> None:
    assert unfit(FakeRuntime()) == ""  # type: ignore[arg-type]
    assert "does not answer" in unfit(FakeRuntime(answers=False))  # type: ignore[arg-type]
    assert "CRIU" in unfit(FakeRuntime(criu=""))  # type: ignore[arg-type]
    assert "experimental" in unfit(FakeRuntime(checkpoints=False))  # type: ignore[arg-type]


def test_health_is_not_serving_without_usable_criu(pki: Path, agent: Agent) -> None:
    with secure_channel(agent.address, _operator(pki)) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(hpb.HealthCheckRequest(),
                                                         timeout=DEADLINE)
        _next_change(watch, SERVING)
        agent.runtime.checkpoints = False
        assert next(watch).status == NOT_SERVING
        agent.runtime.criu = ""
        agent.runtime.checkpoints = True
        assert _check(channel) == NOT_SERVING  # unfit for another reason: no message
        agent.runtime.criu = "4.2.1"
        assert next(watch).status == SERVING
        watch.cancel()


def test_before_the_first_check_the_node_is_not_serving() -> None:
    node_health = NodeHealth(FakeRuntime())  # type: ignore[arg-type]
    for service in NodeHealth.SERVICES:
        reply = node_health.servicer.Check(hpb.HealthCheckRequest(service=service), None)
        assert reply.status == NOT_SERVING
    node_health.check()
    assert node_health.servicer.Check(hpb.HealthCheckRequest(), None).status == SERVING


@pytest.mark.parametrize("who", [_operator, _node])
def test_reflection_lists_the_agent_service(pki: Path, agent: Agent, who) -> None:
    with secure_channel(agent.address, who(pki)) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert SERVICE in services
        assert "grpc.health.v1.Health" in services
        # and describes it: the methods of the contract
        db = ProtoReflectionDescriptorDatabase(channel)
        proto = db.FindFileContainingSymbol(SERVICE)
        assert "Migrate" in [m.name for m in proto.service[0].method]


def _refusals(channel: grpc.Channel) -> list[grpc.StatusCode]:
    """How health and reflection each refuse CHANNEL's caller."""
    codes = []
    for call in (_check, lambda ch: ProtoReflectionDescriptorDatabase(ch).get_services()):
        with pytest.raises(grpc.RpcError) as err:
            call(channel)
        codes.append(err.value.code())
    return codes


def test_a_caller_without_a_certificate_is_refused(pki: Path, agent: Agent) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.crt").read_bytes())
    with grpc.secure_channel(agent.address, creds,
                             options=[("grpc.ssl_target_name_override", "migctl")]) as channel:
        assert _refusals(channel) == [grpc.StatusCode.UNAVAILABLE] * 2


def test_a_certificate_without_a_role_is_refused_by_the_gate(pki: Path, agent: Agent,
                                                             tmp_path: Path) -> None:
    # signed by our CA, so the handshake passes; its parts disagree, so it has no role
    files = _forge(pki, "mallory", NODE_OU, [CLIENT], ["mallory", "migctl"], tmp_path)
    with secure_channel(agent.address, files) as channel:
        assert _refusals(channel) == [grpc.StatusCode.PERMISSION_DENIED] * 2
