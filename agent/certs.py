"""A small certificate authority for a lab or cluster: one CA, a certificate per node and client.

Layout of DIR, split so that no folder handed to an agent holds the CA key or another's key:

    DIR/ca.crt, DIR/<client>.crt, DIR/<client>.key     the operator's folder (its CLI reads it)
    DIR/private/ca.key                                 0700/0600; never given to an agent
    DIR/nodes/<node>/ca.crt, <node>.crt, <node>.key    0700; that agent's `--tls-dir`

Each folder is what `agent.security.TLSFiles.from_dir` reads (see `node_dir`). Keys are EC P-256
(the curve every gRPC/BoringSSL build accepts) written 0600. `init` moves the files of the old
flat layout (`DIR/ca.key`, `DIR/<node>.*`) to their places.

Node certificates serve *and* call (agents pull from each other), so they carry serverAuth and
clientAuth plus the DNS SANs `<node>` and `migctl` (the fixed name clients verify, see
`agent.security`). Client certificates carry clientAuth and `<client>` only, so they cannot pose
as an agent. The role is also spelled out in the subject's OU (`migctl-node`,
`migctl-operator`), which `agent.security.caller_of` requires to agree with EKU and SANs.

`init` is idempotent so it can run on every `lab up` or deploy: the CA is reused, certificates
that are still good are kept, only new names (or ones unusable with this CA) get issued. The CA
key is read only when something must be signed, so it may live offline once all certs exist.

Without copying keys: on a new node `request` makes its key and a request (NODE.csr); the
operator's `sign` returns the certificate for it; the node's key never leaves it
(`migctl certs request` / `migctl certs sign`).

CLI: `python -m migctl.agent.certs DIR NODE... [--client NAME]... [--days N] [--force]`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from migctl.agent.security import NODE_OU, OPERATOR_OU
from migctl.common.errors import FailedPrecondition, InvalidArgument
from migctl.common.tls import TARGET_NAME

CA_DAYS = 3650  # the CA outlives the certificates it signs, or they would all expire with it
_SKEW = dt.timedelta(minutes=5)  # tolerate nodes whose clocks lag the one that issued
_RENEW_BEFORE = dt.timedelta(days=1)  # reissue a cert about to expire rather than keep it
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_NODE_EKU = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
_CLIENT_EKU = [ExtendedKeyUsageOID.CLIENT_AUTH]


def node_dir(directory: Path, node: str) -> Path:
    """The folder of `directory` that node's agent gets as `--tls-dir`: its own files only."""
    return Path(directory) / "nodes" / node


def init(directory: Path, nodes: Sequence[str], clients: Sequence[str] = ("client",),
         days: int = 825, force: bool = False) -> None:
    """Create or complete the CA in `directory` and a certificate for each node and client.

    `force` regenerates the CA and every listed certificate (certificates of names not listed
    keep the old CA and stop being trusted).
    """
    directory = Path(directory)
    _check_names(nodes, clients)
    if days < 1:
        raise InvalidArgument(f"days must be at least 1, not {days}")
    directory.mkdir(parents=True, exist_ok=True)
    ca_crt, ca_key_path = directory / "ca.crt", directory / "private" / "ca.key"
    _private_dir(ca_key_path.parent)
    _migrate(directory, nodes, clients)

    ca_key: ec.EllipticCurvePrivateKey | None = None
    if force or not ca_crt.exists():
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _make_ca(ca_key, max(days, CA_DAYS))
        write(ca_key_path, _key_pem(ca_key), 0o600)  # key first: a cert never lacks its key
        write(ca_crt, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    else:
        try:
            ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
        except ValueError as e:
            raise FailedPrecondition(f"{ca_crt} is not a PEM certificate ({e}); "
                                     f"restore it or pass force=True (--force)") from e
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)

    roles = [(n, node_dir(directory, n), NODE_OU, _NODE_EKU, [n, TARGET_NAME]) for n in nodes]
    roles += [(c, directory, OPERATOR_OU, _CLIENT_EKU, [c]) for c in clients]
    for name, folder, ou, eku, sans in roles:
        crt, key_path = folder / f"{name}.crt", folder / f"{name}.key"
        if folder != directory:
            _private_dir(folder)
        if force or not _usable(crt, key_path, ca_cert, _subject(name, ou), eku, sans):
            if ca_key is None:
                ca_key = _load_ca_key(ca_key_path)
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _make_leaf(name, ou, sans, eku, key, ca_cert, ca_key, days)
            write(key_path, _key_pem(key), 0o600)
            write(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        if folder != directory and _read_or_none(folder / "ca.crt") != ca_pem:
            write(folder / "ca.crt", ca_pem, 0o644)


def request(directory: Path, node: str) -> Path:
    """On the node: its key, made here (0600; it never leaves the node), and a request for the
    operator's CA (NODE.csr, public). A key already there is kept, so a request after expiry
    renews the certificate of the same key. Returns the request's path."""
    directory = Path(directory)
    _check_names([node], [])
    directory.mkdir(parents=True, exist_ok=True)
    _private_dir(directory)
    key_path, csr_path = directory / f"{node}.key", directory / f"{node}.csr"
    if key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise FailedPrecondition(f"{key_path} is not an EC key: remove it to make a new one")
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        write(key_path, _key_pem(key), 0o600)
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        _subject(node, NODE_OU)).sign(key, hashes.SHA256())
    write(csr_path, csr.public_bytes(serialization.Encoding.PEM), 0o644)
    return csr_path


def sign(directory: Path, csr_pem: bytes, days: int = 825) -> tuple[str, bytes]:
    """At the operator's CA in DIRECTORY: a node certificate for a request's key and name, as
    (the node's name, its certificate's PEM). Only the key and the name come from the request,
    after its signature proves the key's holder made it; the role, extensions and validity are
    the CA's, whatever the request asks for."""
    if days < 1:
        raise InvalidArgument(f"days must be at least 1, not {days}")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as err:
        raise InvalidArgument(f"not a PEM certificate request: {err}") from None
    if not csr.is_signature_valid:
        raise InvalidArgument("the certificate request's signature does not match its key: "
                              "it was not made by the holder of that key")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise InvalidArgument("the certificate request's key is not EC P-256 (what "
                              "`migctl certs request` makes, and every gRPC build accepts)")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise InvalidArgument("the certificate request names no single node (CN)")
    node = names[0].value
    _check_names([node], [])
    directory = Path(directory)
    ca_cert = ca_certificate(directory)
    ca_key = _load_ca_key(directory / "private" / "ca.key")
    cert = _make_leaf_for(node, NODE_OU, [node, TARGET_NAME], _NODE_EKU, key, ca_cert, ca_key,
                          days)
    return node, cert.public_bytes(serialization.Encoding.PEM)


def ca_certificate(directory: Path) -> x509.Certificate:
    """The operator's CA certificate in DIRECTORY (what signs, and what nodes are given)."""
    ca_crt = Path(directory) / "ca.crt"
    try:
        return x509.load_pem_x509_certificate(ca_crt.read_bytes())
    except (OSError, ValueError) as err:
        raise FailedPrecondition(f"no CA certificate at {ca_crt} ({err}): run `migctl certs "
                                 "init` there first") from None


def _private_dir(path: Path) -> None:
    """Create `path` 0700, and tighten it if it already exists (mkdir's mode obeys the umask)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _migrate(directory: Path, nodes: Sequence[str], clients: Sequence[str]) -> None:
    """Move the old flat layout's CA key and node files out of the operator's folder.

    Node files are recognised by name (listed nodes) or by serverAuth (unlisted ones), so no node
    key stays in `directory`; an unlisted node's folder also gets the ca.crt its cert needs.
    """
    _move(directory / "ca.key", directory / "private" / "ca.key", 0o600, drop_stale=False)
    old = {n for n in nodes if (directory / f"{n}.key").exists()
           or (directory / f"{n}.crt").exists()}
    old |= {p.stem for p in directory.glob("*.crt")
            if p.stem != "ca" and p.stem not in clients and _NAME.fullmatch(p.stem)
            and _serves(p)}
    for n in sorted(old):
        folder = node_dir(directory, n)
        _private_dir(folder)
        _move(directory / f"{n}.key", folder / f"{n}.key", 0o600, drop_stale=True)
        _move(directory / f"{n}.crt", folder / f"{n}.crt", 0o644, drop_stale=True)
        if n not in nodes and (directory / "ca.crt").is_file() \
                and not (folder / "ca.crt").exists():
            write(folder / "ca.crt", (directory / "ca.crt").read_bytes(), 0o644)


def _move(old: Path, new: Path, mode: int, drop_stale: bool) -> None:
    """Move `old` to `new`; if `new` already exists, it wins and `old` goes.

    Unless `old` differs and not `drop_stale`: two different CA keys are for a human to sort
    out, whereas a stale node file may go (`init` checks the one in place, reissues if needed).
    """
    if not old.exists():
        return
    if not new.exists():
        os.replace(old, new)  # one file system: the file is never in both places or in neither
        os.chmod(new, mode)
    elif drop_stale or old.read_bytes() == new.read_bytes():
        old.unlink()
    else:
        raise FailedPrecondition(f"{old} (old layout) and {new} both exist and differ: put the "
                                 f"key of {old.parent / 'ca.crt'} at {new}, remove {old}")


def check_node_name(node: str) -> None:
    """InvalidArgument unless NODE can name a node's files and certificate."""
    _check_names([node], [])


def _check_names(nodes: Sequence[str], clients: Sequence[str]) -> None:
    """Names become file names and DNS SANs: keep them to one safe path component."""
    if isinstance(nodes, str) or isinstance(clients, str):
        raise InvalidArgument("nodes and clients are lists of names, not a single string")
    names = [*nodes, *clients]
    for n in names:
        if not _NAME.fullmatch(n) or n in ("ca", TARGET_NAME):
            raise InvalidArgument(
                f"invalid certificate name {n!r}: use letters, digits, '.', '_', '-' "
                f"(max 63, not 'ca' or {TARGET_NAME!r})")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InvalidArgument(f"names listed twice (a node and a client share files): {dup}")


def _usable(crt: Path, key_path: Path, ca_cert: x509.Certificate, subject: x509.Name,
            eku: list[x509.ObjectIdentifier], sans: list[str]) -> bool:
    """Keep an existing pair only if this CA signed it, it matches its key, lasts, and names
    exactly the subject (so the role's OU), EKU and SANs that `init` would issue now.
    """
    if not (crt.is_file() and key_path.is_file()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert.verify_directly_issued_by(ca_cert)
        roles = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        names = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    except (ValueError, TypeError, UnsupportedAlgorithm, InvalidSignature,
            x509.ExtensionNotFound):
        return False
    same_key = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    fresh = cert.not_valid_after_utc - _RENEW_BEFORE > _now()
    return (same_key and fresh and cert.subject == subject and set(roles) == set(eku)
            and set(names) == set(sans))


def _serves(crt: Path) -> bool:
    """Whether `crt` is a node certificate (serverAuth), to find old-layout node files."""
    try:
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    return ExtendedKeyUsageOID.SERVER_AUTH in eku


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _load_ca_key(path: Path) -> ec.EllipticCurvePrivateKey:
    if not path.is_file():
        raise FailedPrecondition(
            f"{path} is missing but new certificates must be signed: put the CA key back, "
            f"or pass force=True (--force) to start a new CA and reissue every certificate")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FailedPrecondition(f"{path} is not an EC private key")
    return key


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _make_ca(key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "migctl CA")])
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )


def _subject(name: str, ou: str | None) -> x509.Name:
    """CN = the node or client name; OU = its role (None: the pre-role layout, for tests)."""
    attrs = [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou)] if ou else []
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _make_leaf(name: str, ou: str | None, sans: list[str], eku: list[x509.ObjectIdentifier],
               key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
               ca_key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    return _make_leaf_for(name, ou, sans, eku, key.public_key(), ca_cert, ca_key, days)


def _make_leaf_for(name: str, ou: str | None, sans: list[str],
                   eku: list[x509.ObjectIdentifier], public: ec.EllipticCurvePublicKey,
                   ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                   days: int) -> x509.Certificate:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(_subject(name, ou))
        .issuer_name(ca_cert.subject).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write(path: Path, data: bytes, mode: int) -> None:
    """Atomic replace; the mode is set before any byte lands, so a key is never world-readable."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as f:
            os.fchmod(f.fileno(), mode)  # os.open's mode is filtered by the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m migctl.agent.certs",
                                description=__doc__.split("\n")[0])
    p.add_argument("directory", type=Path,
                   help="ca.crt and client files; private/ca.key; nodes/<node>/ per node")
    p.add_argument("nodes", nargs="+", help="node names (server+client certificates)")
    p.add_argument("--client", action="append", dest="clients",
                   help="client name (repeatable; default: client)")
    p.add_argument("--days", type=int, default=825, help="validity of issued certificates")
    p.add_argument("--force", action="store_true", help="new CA, reissue every listed cert")
    args = p.parse_args(argv)
    try:
        init(args.directory, args.nodes, args.clients or ["client"], args.days, args.force)
    except (InvalidArgument, FailedPrecondition) as e:
        sys.exit(f"certs: {e}")


if __name__ == "__main__":
    main()
