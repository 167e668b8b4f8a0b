"""Mutual TLS on a real in-process gRPC server: who gets through, who is refused before any handler,
and which role (`caller_of`) a handler sees; the CA's directory layout and its migration.

No Docker and no lab: certificates come from `agent.certs.init` in a temporary directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from concurrent import futures
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from migctl.agent import certs
from migctl.agent.security import (
    NODE,
    NODE_OU,
    OPERATOR,
    OPERATOR_OU,
    Caller,
    caller_of,
    peer_identity,
    server_credentials,
)
from migctl.common.errors import FailedPrecondition, InvalidArgument, MigctlError
from migctl.common.tls import TLSFiles, channel_credentials, secure_channel

METHOD = "/migctl.test.Echo/Identity"
WHOAMI = "/migctl.test.Echo/Caller"
SERVER, CLIENT = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
DEADLINE = 10  # only so a broken build fails instead of hanging; no assertion depends on it


@dataclass
class Server:
    port: int
    calls: list[str] = field(default_factory=list)  # peer identity of every Identity call

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    certs.init(d, ["nodeA", "nodeB"], ["client"])
    return d


def _node(directory: Path, name: str) -> TLSFiles:
    """What an agent on `name` reads: its own folder, as `migctl lab` passes it (--tls-dir)."""
    return TLSFiles.from_dir(certs.node_dir(directory, name), name)


def _files(directory: Path, name: str) -> TLSFiles:
    """A node's files if `name` is a node of `directory`, else the client's in `directory`."""
    if certs.node_dir(directory, name).is_dir():
        return _node(directory, name)
    return TLSFiles.from_dir(directory, name)


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

    def whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
        caller = caller_of(context)
        return json.dumps(asdict(caller) if caller else None).encode()

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "migctl.test.Echo", {"Identity": grpc.unary_unary_rpc_method_handler(identity),
                             "Caller": grpc.unary_unary_rpc_method_handler(whoami)}),))
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
    yield from _serve(_node(pki, "nodeA"))


def _call(channel: grpc.Channel, payload: bytes = b"ping") -> bytes:
    with channel:
        return channel.unary_unary(METHOD)(payload, timeout=DEADLINE)


def _refused(channel: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        _call(channel)
    return err.value.code()


@pytest.mark.parametrize("name", ["client", "nodeB"])
def test_valid_certificate_reaches_the_handler(pki: Path, server: Server, name: str) -> None:
    assert _call(secure_channel(server.address, _files(pki, name))) == b"ping"
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
    node = _node(rogue, "nodeA")
    files = TLSFiles(ca=pki / "ca.crt", cert=node.cert, key=node.key)
    assert _refused(secure_channel(server.address, files)) == grpc.StatusCode.UNAVAILABLE
    assert server.calls == []


def test_insecure_channel_is_refused(server: Server) -> None:
    assert _refused(grpc.insecure_channel(server.address)) == grpc.StatusCode.UNAVAILABLE
    assert server.calls == []


def test_server_from_another_ca_is_not_trusted(pki: Path, rogue: Path) -> None:
    for srv in _serve(_node(rogue, "nodeA")):
        code = _refused(secure_channel(srv.address, TLSFiles.from_dir(pki, "client")))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert srv.calls == []


def test_client_certificate_cannot_pose_as_an_agent(pki: Path) -> None:
    """A client cert lacks the `migctl` SAN and serverAuth, so it cannot serve our clients."""
    for srv in _serve(TLSFiles.from_dir(pki, "client")):
        code = _refused(secure_channel(srv.address, _node(pki, "nodeB")))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert srv.calls == []


def test_channel_credentials_build(pki: Path) -> None:
    assert isinstance(channel_credentials(TLSFiles.from_dir(pki, "client")),
                      grpc.ChannelCredentials)


@pytest.mark.parametrize("missing", ["ca.crt", "nodeA.crt", "nodeA.key"])
def test_from_dir_names_the_missing_file(tmp_path: Path, missing: str) -> None:
    certs.init(tmp_path, ["nodeA"], [])
    (certs.node_dir(tmp_path, "nodeA") / missing).unlink()
    with pytest.raises(FailedPrecondition, match=missing.replace(".", r"\.")):
        _node(tmp_path, "nodeA")


# -- roles: what a handler learns about its caller ---------------------------------------------

def _whoami(address: str, files: TLSFiles) -> Caller | None:
    with secure_channel(address, files) as ch:
        data = json.loads(ch.unary_unary(WHOAMI)(b"", timeout=DEADLINE))
    return Caller(**data) if data else None


@pytest.mark.parametrize(("name", "expected"), [("nodeB", Caller("nodeB", NODE)),
                                                ("nodeA", Caller("nodeA", NODE)),
                                                ("client", Caller("client", OPERATOR))])
def test_caller_of_reads_the_role_from_the_certificate(pki: Path, server: Server, name: str,
                                                       expected: Caller) -> None:
    assert _whoami(server.address, _files(pki, name)) == expected


def _forge(directory: Path, name: str, ou: str | None, eku: list[x509.ObjectIdentifier],
           sans: list[str], out: Path) -> TLSFiles:
    """A certificate our CA really signed (its key from private/), but with a role of our choice."""
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    ca_key = certs._load_ca_key(directory / "private" / "ca.key")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certs._make_leaf(name, ou, sans, eku, key, ca_cert, ca_key, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / f"{name}.key").write_bytes(certs._key_pem(key))
    return TLSFiles(ca=directory / "ca.crt", cert=out / f"{name}.crt", key=out / f"{name}.key")


# every one carries clientAuth, so the handshake lets it through: only `caller_of` refuses it
FORGED = {
    "operator OU, node EKU": (OPERATOR_OU, [SERVER, CLIENT], ["mallory"]),
    "operator OU, migctl SAN": (OPERATOR_OU, [CLIENT], ["mallory", "migctl"]),
    "node OU, client EKU only": (NODE_OU, [CLIENT], ["mallory", "migctl"]),
    "node OU, no migctl SAN": (NODE_OU, [SERVER, CLIENT], ["mallory"]),
    "node OU, SAN lacks the CN": (NODE_OU, [SERVER, CLIENT], ["nodeB", "migctl"]),
    "no OU (issued before roles)": (None, [CLIENT], ["mallory"]),
    "no OU, node EKU and SANs": (None, [SERVER, CLIENT], ["mallory", "migctl"]),
    "unknown OU": ("migctl-admin", [CLIENT], ["mallory"]),
}


@pytest.mark.parametrize("case", FORGED)
def test_certificate_whose_role_parts_disagree_gets_no_role(pki: Path, server: Server,
                                                            tmp_path: Path, case: str) -> None:
    ou, eku, sans = FORGED[case]
    files = _forge(pki, "mallory", ou, eku, sans, tmp_path)
    assert _whoami(server.address, files) is None


class _Context:
    """Just enough of a ServicerContext for `caller_of`, for what a handshake would refuse."""

    def __init__(self, auth: dict[str, list[bytes]]) -> None:
        self.auth = auth

    def auth_context(self) -> dict[str, list[bytes]]:
        return self.auth


def test_caller_of_without_a_certificate_or_with_garbage_is_none(pki: Path,
                                                                 tmp_path: Path) -> None:
    assert caller_of(_Context({})) is None  # type: ignore[arg-type]
    assert caller_of(_Context({"x509_pem_cert": [b"not a certificate"]})) is None  # type: ignore[arg-type]
    files = _forge(pki, "mallory", NODE_OU, [SERVER], ["mallory", "migctl"], tmp_path)
    pem = files.cert.read_bytes()
    assert caller_of(_Context({"x509_pem_cert": [pem]})) is None  # type: ignore[arg-type]


def test_issued_certificates_carry_the_role_ou(pki: Path) -> None:
    def ou(path: Path) -> list[str]:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        return [a.value for a in cert.subject.get_attributes_for_oid(
            x509.NameOID.ORGANIZATIONAL_UNIT_NAME)]

    assert ou(_node(pki, "nodeA").cert) == [NODE_OU]
    assert ou(pki / "client.crt") == [OPERATOR_OU]


# -- the CA's directory ------------------------------------------------------------------------

def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _assert_layout(directory: Path, nodes: list[str]) -> None:
    """Each node folder holds exactly its own bundle; the CA key lives only under private/."""
    assert sorted(p.relative_to(directory).as_posix() for p in directory.rglob("ca.key")) \
        == ["private/ca.key"]
    assert _mode(directory / "private") == 0o700
    assert _mode(directory / "private" / "ca.key") == 0o600
    assert not list(directory.glob("node*.*"))  # no node's files in the operator's folder
    for n in nodes:
        folder = certs.node_dir(directory, n)
        assert sorted(p.name for p in folder.iterdir()) == sorted(["ca.crt", f"{n}.crt",
                                                                   f"{n}.key"])
        assert _mode(folder) == 0o700
        assert _mode(folder / f"{n}.key") == 0o600
        assert (folder / "ca.crt").read_bytes() == (directory / "ca.crt").read_bytes()
    for p in directory.rglob("*.key"):
        assert _mode(p) == 0o600, p
    assert not list(directory.rglob(".*.tmp"))


def test_init_layout_keeps_the_ca_key_apart(tmp_path: Path) -> None:
    certs.init(tmp_path, ["nodeA", "nodeB"], ["client"])
    assert sorted(p.name for p in tmp_path.iterdir()) \
        == ["ca.crt", "client.crt", "client.key", "nodes", "private"]
    assert sorted(p.name for p in (tmp_path / "nodes").iterdir()) == ["nodeA", "nodeB"]
    _assert_layout(tmp_path, ["nodeA", "nodeB"])


def test_init_tightens_loose_folder_modes(tmp_path: Path) -> None:
    certs.init(tmp_path, ["nodeA"])
    os.chmod(tmp_path / "private", 0o755)
    os.chmod(certs.node_dir(tmp_path, "nodeA"), 0o755)
    certs.init(tmp_path, ["nodeA"])
    _assert_layout(tmp_path, ["nodeA"])


def _flatten(directory: Path) -> None:
    """Turn a new layout back into the old flat one: ca.key and node files in `directory`."""
    os.replace(directory / "private" / "ca.key", directory / "ca.key")
    (directory / "private").rmdir()
    for folder in (directory / "nodes").iterdir():
        for p in folder.iterdir():
            if p.name != "ca.crt":
                os.replace(p, directory / p.name)
            else:
                p.unlink()
        folder.rmdir()
    (directory / "nodes").rmdir()


def test_init_migrates_the_old_flat_layout_and_keeps_the_ca(tmp_path: Path) -> None:
    certs.init(tmp_path, ["nodeA", "nodeB", "nodeC"], ["client"])
    # nodeA's certificate predates roles (no OU); nodeC is not listed on the next init
    ca_cert = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    ca_key = certs._load_ca_key(tmp_path / "private" / "ca.key")
    key = ec.generate_private_key(ec.SECP256R1())
    old = certs._make_leaf("nodeA", None, ["nodeA", "migctl"], [SERVER, CLIENT], key, ca_cert,
                           ca_key, 30).public_bytes(serialization.Encoding.PEM)
    folder_a = certs.node_dir(tmp_path, "nodeA")
    (folder_a / "nodeA.crt").write_bytes(old)
    (folder_a / "nodeA.key").write_bytes(certs._key_pem(key))
    _flatten(tmp_path)
    ca_key_pem = (tmp_path / "ca.key").read_bytes()
    before = _tree(tmp_path)
    os.chmod(tmp_path / "ca.key", 0o644)  # moved as is, but never left readable

    certs.init(tmp_path, ["nodeA", "nodeB"], ["client"])

    _assert_layout(tmp_path, ["nodeA", "nodeB", "nodeC"])
    after = _tree(tmp_path)
    assert after["ca.crt"] == before["ca.crt"]  # the same CA ...
    assert after["private/ca.key"] == ca_key_pem  # ... whose key moved
    assert after["client.key"] == before["client.key"]
    for n in ("nodeB", "nodeC"):  # good certificates moved, not reissued
        assert after[f"nodes/{n}/{n}.crt"] == before[f"{n}.crt"]
        assert after[f"nodes/{n}/{n}.key"] == before[f"{n}.key"]
    assert after["nodes/nodeA/nodeA.crt"] != old  # reissued with its OU, by the same CA
    new_a = x509.load_pem_x509_certificate(after["nodes/nodeA/nodeA.crt"])
    new_a.verify_directly_issued_by(ca_cert)
    for srv in _serve(_node(tmp_path, "nodeA")):
        assert _whoami(srv.address, TLSFiles.from_dir(tmp_path, "client")) \
            == Caller("client", OPERATOR)
        assert _whoami(srv.address, _node(tmp_path, "nodeB")) == Caller("nodeB", NODE)


def test_init_reissues_a_client_certificate_without_its_ou(tmp_path: Path) -> None:
    certs.init(tmp_path, ["nodeA"], ["client"])
    ca_cert = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    ca_key = certs._load_ca_key(tmp_path / "private" / "ca.key")
    key = ec.generate_private_key(ec.SECP256R1())
    old = certs._make_leaf("client", None, ["client"], [CLIENT], key, ca_cert, ca_key, 30)
    (tmp_path / "client.crt").write_bytes(old.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "client.key").write_bytes(certs._key_pem(key))
    certs.init(tmp_path, ["nodeA"], ["client"])
    new = x509.load_pem_x509_certificate((tmp_path / "client.crt").read_bytes())
    assert new.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value \
        == OPERATOR_OU


def test_init_drops_a_stale_top_level_copy_of_a_node_key(tmp_path: Path) -> None:
    certs.init(tmp_path, ["nodeA"])
    before = _tree(tmp_path)
    (tmp_path / "nodeA.key").write_bytes(b"left over")
    certs.init(tmp_path, ["nodeA"])
    assert _tree(tmp_path) == before


def test_init_refuses_two_different_ca_keys(tmp_path: Path) -> None:
    certs.init(tmp_path, ["nodeA"])
    (tmp_path / "ca.key").write_bytes(certs._key_pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(FailedPrecondition, match=r"ca\.key"):
        certs.init(tmp_path, ["nodeA"])
    # the same key at both places is just a leftover copy
    (tmp_path / "ca.key").write_bytes((tmp_path / "private" / "ca.key").read_bytes())
    certs.init(tmp_path, ["nodeA"])
    _assert_layout(tmp_path, ["nodeA"])


def test_init_is_idempotent_and_extends_with_the_same_ca(tmp_path: Path) -> None:
    certs.init(tmp_path, ["nodeA"])
    before = _tree(tmp_path)
    assert set(before) == {"ca.crt", "private/ca.key", "nodes/nodeA/ca.crt",
                           "nodes/nodeA/nodeA.crt", "nodes/nodeA/nodeA.key",
                           "client.crt", "client.key"}

    certs.init(tmp_path, ["nodeA", "nodeC"])
    after = _tree(tmp_path)
    assert {k: after[k] for k in before} == before  # CA and existing certs untouched
    assert {"nodes/nodeC/nodeC.crt", "nodes/nodeC/nodeC.key", "nodes/nodeC/ca.crt"} <= set(after)

    ca = x509.load_pem_x509_certificate(after["ca.crt"])
    node_c = x509.load_pem_x509_certificate(after["nodes/nodeC/nodeC.crt"])
    node_c.verify_directly_issued_by(ca)  # raises if another CA signed it
    sans = node_c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"nodeC", "migctl"}
    _assert_layout(tmp_path, ["nodeA", "nodeC"])


def test_init_force_starts_a_new_ca(tmp_path: Path) -> None:
    certs.init(tmp_path, ["nodeA"])
    ca = (tmp_path / "ca.crt").read_bytes()
    certs.init(tmp_path, ["nodeA"], force=True)
    assert (tmp_path / "ca.crt").read_bytes() != ca
    _assert_layout(tmp_path, ["nodeA"])  # nodeA's folder trusts the new CA


def test_init_reissues_a_cert_this_ca_did_not_sign(tmp_path: Path, rogue: Path) -> None:
    certs.init(tmp_path, ["nodeA"])
    theirs, ours = certs.node_dir(rogue, "nodeA"), certs.node_dir(tmp_path, "nodeA")
    foreign = (theirs / "nodeA.crt").read_bytes()
    (ours / "nodeA.crt").write_bytes(foreign)
    (ours / "nodeA.key").write_bytes((theirs / "nodeA.key").read_bytes())
    certs.init(tmp_path, ["nodeA"])
    assert (ours / "nodeA.crt").read_bytes() != foreign


def test_init_without_ca_key_keeps_good_certs_and_refuses_to_sign(tmp_path: Path) -> None:
    certs.init(tmp_path, ["nodeA"])
    (tmp_path / "private" / "ca.key").unlink()  # CA key moved offline
    certs.init(tmp_path, ["nodeA"])  # nothing to sign: fine
    with pytest.raises(FailedPrecondition, match=r"private/ca\.key"):
        certs.init(tmp_path, ["nodeA", "nodeB"])


@pytest.mark.parametrize("name", ["../evil", "ca", "migctl", "", "a/b"])
def test_init_rejects_unsafe_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidArgument):
        certs.init(tmp_path, [name])


def _join(ca: Path, node_dir: Path, node: str, argv_sign: tuple[str, ...] = ()) -> TLSFiles:
    """A node joins without any key travelling: `certs request` on the node, `certs sign` at
    the operator's CA, the certificate and ca.crt back into the node's folder."""
    from migctl.client import cli

    def run(*argv: str) -> None:
        with pytest.raises(SystemExit) as done:
            cli.main(list(argv))
        assert done.value.code == 0

    run("certs", "request", "--dir", str(node_dir), node)
    outbox = ca.parent / f"{node}-outbox"
    outbox.mkdir()
    (outbox / f"{node}.csr").write_bytes((node_dir / f"{node}.csr").read_bytes())
    run("certs", "sign", "--dir", str(ca), *argv_sign, str(outbox / f"{node}.csr"))
    assert sorted(p.name for p in outbox.iterdir()) == ["ca.crt", f"{node}.crt", f"{node}.csr"]
    for name in ("ca.crt", f"{node}.crt"):
        (node_dir / name).write_bytes((outbox / name).read_bytes())
    return TLSFiles.from_dir(node_dir, node)


def test_a_node_joins_by_request_and_its_key_never_leaves(tmp_path: Path) -> None:
    ca, node_dir = tmp_path / "ca", tmp_path / "nodeC-etc"
    certs.init(ca, ["nodeA"], ["client"])
    files = _join(ca, node_dir, "nodeC")
    assert _mode(node_dir / "nodeC.key") == 0o600 and _mode(node_dir) == 0o700
    assert not list(ca.rglob("nodeC.key")), "a key reached the operator's folder"
    crt = x509.load_pem_x509_certificate((node_dir / "nodeC.crt").read_bytes())
    key = serialization.load_pem_private_key((node_dir / "nodeC.key").read_bytes(), None)
    assert crt.public_key() == key.public_key()
    # an agent serving with it is trusted by the operator's client, and knows nodeA as a node
    with contextlib.ExitStack() as stack:
        state = stack.enter_context(contextlib.contextmanager(_serve)(files))
        address = f"127.0.0.1:{state.port}"
        assert _call(secure_channel(address, _files(ca, "client"), server_name="nodeC")) \
            == b"ping"
        assert _whoami(address, _node(ca, "nodeA")) == Caller("nodeA", NODE)
    # a request made again (renewal) keeps the key
    before = (node_dir / "nodeC.key").read_bytes()
    certs.request(node_dir, "nodeC")
    assert (node_dir / "nodeC.key").read_bytes() == before


def test_the_ca_decides_the_role_whatever_the_request_asks(tmp_path: Path) -> None:
    """A request asking for the operator's OU, extra names and a CA's powers gets a plain node
    certificate for its CN: the role comes from the CA, never from the request."""
    ca = tmp_path / "ca"
    certs.init(ca, ["nodeA"], ["client"])
    key = ec.generate_private_key(ec.SECP256R1())
    greedy = (x509.CertificateSigningRequestBuilder()
              .subject_name(x509.Name([
                  x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "migctl-operator"),
                  x509.NameAttribute(NameOID.COMMON_NAME, "nodeX")]))
              .add_extension(x509.SubjectAlternativeName([x509.DNSName("nodeA")]), False)
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
              .sign(key, hashes.SHA256()))
    node, pem = certs.sign(ca, greedy.public_bytes(serialization.Encoding.PEM))
    crt = x509.load_pem_x509_certificate(pem)
    assert node == "nodeX"
    assert crt.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.DNSName) == ["nodeX", "migctl"]
    assert not crt.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert crt.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == \
        "migctl-node"


@pytest.mark.parametrize("bad,why", [
    (b"not a request", "not a PEM certificate request"),
    ("tampered", "signature does not match"),
    ("rsa", "not EC P-256"),
    ("name", "invalid"),
])
def test_a_bad_request_is_refused_by_name(tmp_path: Path, bad, why: str) -> None:
    ca = tmp_path / "ca"
    certs.init(ca, ["nodeA"], ["client"])
    if isinstance(bad, str):
        key = rsa.generate_private_key(65537, 2048) if bad == "rsa" else \
            ec.generate_private_key(ec.SECP256R1())
        cn = "../etc" if bad == "name" else "nodeX"
        csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, cn)])).sign(key, hashes.SHA256())
        der = bytearray(csr.public_bytes(serialization.Encoding.DER))
        if bad == "tampered":
            der[-3] ^= 0xFF  # the signature's bytes
        bad = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM) \
            if bad == "tampered" else csr.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(MigctlError, match=why):
        certs.sign(ca, bad)
