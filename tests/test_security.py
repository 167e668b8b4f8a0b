"""Mutual TLS on a real in-process gRPC server: who gets through, who is refused before any handler.

No Docker and no lab: certificates come from `agent.certs.init` in a temporary directory.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from agent import certs
from agent.errors import FailedPrecondition, InvalidArgument
from agent.security import (
    TLSFiles,
    channel_credentials,
    peer_identity,
    secure_channel,
    server_credentials,
)

METHOD = "/migctl.test.Echo/Identity"
DEADLINE = 10  # only so a broken build fails instead of hanging; no assertion depends on it


@dataclass
class Server:
    port: int
    calls: list[str] = field(default_factory=list)  # peer identity of every handled call

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    certs.init(d, ["nodeA", "nodeB"], ["client"])
    return d


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same names, another CA: what an attacker with their own CA could produce."""
    d = tmp_path_factory.mktemp("rogue")
    certs.init(d, ["nodeA"], ["client"])
    return d


def _serve(files: TLSFiles) -> Iterator[Server]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    state = Server(port=0)

    def identity(request: bytes, context: grpc.ServicerContext) -> bytes:
        state.calls.append(peer_identity(context))
        return request

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "migctl.test.Echo", {"Identity": grpc.unary_unary_rpc_method_handler(identity)}),))
    state.port = server.add_secure_port("127.0.0.1:0", server_credentials(files))
    assert state.port
    server.start()
    try:
        yield state
    finally:
        server.stop(grace=None)


@pytest.fixture
def server(pki: Path) -> Iterator[Server]:
    """An agent on nodeA."""
    yield from _serve(TLSFiles.from_dir(pki, "nodeA"))


def _call(channel: grpc.Channel, payload: bytes = b"ping") -> bytes:
    with channel:
        return channel.unary_unary(METHOD)(payload, timeout=DEADLINE)


def _refused(channel: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        _call(channel)
    return err.value.code()


@pytest.mark.parametrize("name", ["client", "nodeB"])
def test_valid_certificate_reaches_the_handler(pki: Path, server: Server, name: str) -> None:
    assert _call(secure_channel(server.address, TLSFiles.from_dir(pki, name))) == b"ping"
    assert server.calls == [name]


def test_node_name_can_be_pinned(pki: Path, server: Server) -> None:
    files = TLSFiles.from_dir(pki, "client")
    assert _call(secure_channel(server.address, files, server_name="nodeA")) == b"ping"
    # nodeA's certificate does not name nodeB: the client refuses to talk to it
    assert _refused(secure_channel(server.address, files, server_name="nodeB")) \
        == grpc.StatusCode.UNAVAILABLE
    assert server.calls == ["client"]


def test_stale_target_override_in_options_is_replaced(pki: Path, server: Server) -> None:
    opts = [("grpc.max_receive_message_length", 1 << 20),
            ("grpc.ssl_target_name_override", "somewhere-else")]
    ch = secure_channel(server.address, TLSFiles.from_dir(pki, "client"), opts)
    assert _call(ch, b"x" * 1000) == b"x" * 1000


def test_client_without_certificate_is_refused(pki: Path, server: Server) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.crt").read_bytes())
    ch = grpc.secure_channel(server.address, creds,
                             options=[("grpc.ssl_target_name_override", "migctl")])
    assert _refused(ch) == grpc.StatusCode.UNAVAILABLE
    assert server.calls == []


def test_certificate_from_another_ca_is_refused(pki: Path, rogue: Path, server: Server) -> None:
    # the rogue client trusts our CA, so only the server's check of its certificate refuses it
    files = TLSFiles(ca=pki / "ca.crt", cert=rogue / "client.crt", key=rogue / "client.key")
    assert _refused(secure_channel(server.address, files)) == grpc.StatusCode.UNAVAILABLE
    assert server.calls == []


def test_insecure_channel_is_refused(server: Server) -> None:
    assert _refused(grpc.insecure_channel(server.address)) == grpc.StatusCode.UNAVAILABLE
    assert server.calls == []


def test_server_from_another_ca_is_not_trusted(pki: Path, rogue: Path) -> None:
    for srv in _serve(TLSFiles.from_dir(rogue, "nodeA")):
        code = _refused(secure_channel(srv.address, TLSFiles.from_dir(pki, "client")))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert srv.calls == []


def test_client_certificate_cannot_pose_as_an_agent(pki: Path) -> None:
    """A client cert lacks the `migctl` SAN and serverAuth, so it cannot serve our clients."""
    for srv in _serve(TLSFiles.from_dir(pki, "client")):
        code = _refused(secure_channel(srv.address, TLSFiles.from_dir(pki, "nodeB")))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert srv.calls == []


def test_channel_credentials_build(pki: Path) -> None:
    assert isinstance(channel_credentials(TLSFiles.from_dir(pki, "client")),
                      grpc.ChannelCredentials)


@pytest.mark.parametrize("missing", ["ca.crt", "nodeA.crt", "nodeA.key"])
def test_from_dir_names_the_missing_file(tmp_path: Path, missing: str) -> None:
    certs.init(tmp_path, ["nodeA"], [])
    (tmp_path / missing).unlink()
    with pytest.raises(FailedPrecondition, match=missing.replace(".", r"\.")):
        TLSFiles.from_dir(tmp_path, "nodeA")


def test_init_is_idempotent_and_extends_with_the_same_ca(tmp_path: Path) -> None:
    certs.init(tmp_path, ["nodeA"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"ca.crt", "ca.key", "nodeA.crt", "nodeA.key",
                           "client.crt", "client.key"}

    certs.init(tmp_path, ["nodeA", "nodeC"])
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert {k: after[k] for k in before} == before  # CA and existing certs untouched
    assert {"nodeC.crt", "nodeC.key"} <= set(after)

    ca = x509.load_pem_x509_certificate(after["ca.crt"])
    node_c = x509.load_pem_x509_certificate(after["nodeC.crt"])
    node_c.verify_directly_issued_by(ca)  # raises if another CA signed it
    sans = node_c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"nodeC", "migctl"}

    for p in tmp_path.glob("*.key"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert not list(tmp_path.glob(".*.tmp"))


def test_init_force_starts_a_new_ca(tmp_path: Path) -> None:
    certs.init(tmp_path, ["nodeA"])
    ca = (tmp_path / "ca.crt").read_bytes()
    certs.init(tmp_path, ["nodeA"], force=True)
    assert (tmp_path / "ca.crt").read_bytes() != ca


def test_init_reissues_a_cert_this_ca_did_not_sign(tmp_path: Path, rogue: Path) -> None:
    certs.init(tmp_path, ["nodeA"])
    foreign = (rogue / "nodeA.crt").read_bytes()
    (tmp_path / "nodeA.crt").write_bytes(foreign)
    (tmp_path / "nodeA.key").write_bytes((rogue / "nodeA.key").read_bytes())
    certs.init(tmp_path, ["nodeA"])
    assert (tmp_path / "nodeA.crt").read_bytes() != foreign


def test_init_without_ca_key_keeps_good_certs_and_refuses_to_sign(tmp_path: Path) -> None:
    certs.init(tmp_path, ["nodeA"])
    (tmp_path / "ca.key").unlink()  # CA key moved offline
    certs.init(tmp_path, ["nodeA"])  # nothing to sign: fine
    with pytest.raises(FailedPrecondition, match=r"ca\.key"):
        certs.init(tmp_path, ["nodeA", "nodeB"])


@pytest.mark.parametrize("name", ["../evil", "ca", "migctl", "", "a/b"])
def test_init_rejects_unsafe_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidArgument):
        certs.init(tmp_path, [name])
