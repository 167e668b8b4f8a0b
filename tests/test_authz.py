"""The role gate on a real in-process gRPC server: each RPC answers only the roles the table
names, for every RPC of the contract (the servicer behind the gate is the generated base class,
so a call that passes the gate ends in UNIMPLEMENTED and one that does not in PERMISSION_DENIED).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from migctl.agent import certs
from migctl.agent.authz import ROLES, Authorization, allowed
from migctl.agent.security import NODE, OPERATOR, server_credentials
from migctl.common.tls import TLSFiles, secure_channel
from migctl.proto import migctl_pb2 as pb
from migctl.proto import migctl_pb2_grpc as rpc

METHODS = pb.DESCRIPTOR.services_by_name["Agent"].methods_by_name


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    certs.init(d, ["nodeA", "nodeB"], ["client"])
    return d


@pytest.fixture(scope="module")
def address(pki: Path) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         interceptors=[Authorization()])
    rpc.add_AgentServicer_to_server(rpc.AgentServicer(), server)
    port = server.add_secure_port("127.0.0.1:0",
                                  server_credentials(TLSFiles.from_dir(certs.node_dir(pki, "nodeA"),
                                                                       "nodeA")))
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_every_rpc_of_the_contract_has_a_rule() -> None:
    assert set(METHODS) == set(ROLES)
    assert allowed("/migctl.v1.Agent/Unknown") == frozenset()
    assert allowed("/other.Service/GetNode") == frozenset()


def _call(channel: grpc.Channel, name: str) -> grpc.StatusCode:
    method = METHODS[name]
    request = getattr(pb, method.input_type.name)()
    path = f"/migctl.v1.Agent/{name}"
    ser, de = request.SerializeToString, lambda b: b
    if method.client_streaming:
        call = (channel.stream_stream(path, ser, de) if method.server_streaming
                else channel.stream_unary(path, ser, de))
        result = call(iter([request]), timeout=10)
    else:
        call = (channel.unary_stream(path, ser, de) if method.server_streaming
                else channel.unary_unary(path, ser, de))
        result = call(request, timeout=10)
    try:
        list(result) if method.server_streaming else None
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("identity,role", [("nodeB", NODE), ("client", OPERATOR)])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_rpc_answers_only_its_roles(pki: Path, address: str, identity: str, role: str,
                                         name: str) -> None:
    folder = certs.node_dir(pki, identity) if role == NODE else pki
    with secure_channel(address, TLSFiles.from_dir(folder, identity)) as channel:
        try:
            code = _call(channel, name)
        except grpc.RpcError as err:
            code = err.code()
    expected = (grpc.StatusCode.UNIMPLEMENTED if role in ROLES[name]
                else grpc.StatusCode.PERMISSION_DENIED)
    assert code == expected, (name, identity)


def test_node_and_operator_certificates_do_not_stand_in_for_each_other() -> None:
    assert NODE not in ROLES["Migrate"] and NODE not in ROLES["Authorize"]
    assert NODE not in ROLES["DescribeContainer"]
    for name in ("Begin", "Checkpoint", "FetchFile", "FetchDelta", "Resume", "Release",
                 "Commit", "SnapshotVolume", "FetchHeld"):
        assert OPERATOR not in ROLES[name], name
