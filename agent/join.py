"""A new node gets its certificate with a one-time token, without a key or a file copied by hand
(as `incus cluster join` does): the operator mints a token for the node's name, the node makes
its key and a request, and the operator's join service signs it.

    operator:  migctl certs token nodeD --server ops:50050      (prints the token)
               migctl certs serve --listen 0.0.0.0:50050        (signs while it runs)
    nodeD:     migctl certs join TOKEN --dir /etc/migctl/tls

The token holds the node's name, the service's address, a 256-bit secret and the SHA-256 of
the CA's certificate. Nothing on the wire needs secrecy (a request and certificates are
public), only proof: the node's request carries an HMAC by the secret, so the service signs
only for the token's holder and the token's name; the reply carries one too, and the CA it
names must have the token's fingerprint, so a node never trusts an impostor's CA. A token is
spent by its first good request, and expires (TOKEN_TTL_S). The CA key stays with the service;
the node's key never leaves the node.

One JSON line each way over TCP: {"node", "csr", "mac"} -> {"crt", "ca", "mac"} or {"error"}.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import secrets
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from migctl.agent import certs
from migctl.common.errors import FailedPrecondition, InvalidArgument, MigctlError, Refused

log = logging.getLogger(__name__)

PREFIX = "migctl-join1:"
TOKEN_TTL_S = 3600.0  # a token not used within the hour is refused
MAX_LINE = 64 << 10  # a request or reply is a few KB
IO_TIMEOUT_S = 10.0  # for a whole request or reply
MAX_HANDLERS = 16  # requests served at once; more are told to try again
PENDING = "joins"  # the CA folder's tokens not spent yet, one file per node (0600)


@dataclass(frozen=True)
class Token:
    node: str
    server: str
    secret: bytes
    ca_sha256: str

    def encode(self) -> str:
        body = {"node": self.node, "server": self.server, "ca": self.ca_sha256,
                "secret": base64.urlsafe_b64encode(self.secret).decode()}
        return PREFIX + base64.urlsafe_b64encode(json.dumps(body).encode()).decode()

    @classmethod
    def decode(cls, text: str) -> Token:
        if not text.strip().startswith(PREFIX):
            raise InvalidArgument(f"not a join token (it starts with {PREFIX!r})")
        try:
            body = json.loads(base64.urlsafe_b64decode(text.strip()[len(PREFIX):]))
            token = cls(str(body["node"]), str(body["server"]),
                        base64.urlsafe_b64decode(body["secret"]), str(body["ca"]))
        except (ValueError, KeyError, TypeError) as err:
            raise InvalidArgument(f"the join token is damaged: {err}") from None
        if len(token.secret) != 32 or len(token.ca_sha256) != 64:
            raise InvalidArgument("the join token is damaged: its secret or fingerprint is "
                                  "not of the right size")
        certs.check_node_name(token.node)
        return token


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of a certificate's DER (what `openssl x509 -fingerprint -sha256` shows)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _mac(secret: bytes, *parts: str) -> str:
    return hmac.new(secret, "\0".join(parts).encode(), hashlib.sha256).hexdigest()


def mint(ca_dir: Path, node: str, server: str, ttl: float = TOKEN_TTL_S) -> str:
    """At the operator's CA: a token for NODE to join through the service at SERVER. Minting
    again for the same node replaces (and so revokes) the token before."""
    certs.check_node_name(node)
    if ttl <= 0:
        raise InvalidArgument(f"a token's lifetime must be positive, not {ttl}")
    token = Token(node, server, secrets.token_bytes(32),
                  fingerprint(certs.ca_certificate(ca_dir)))
    record = {"secret": token.secret.hex(), "expires": time.time() + ttl}
    with _pending(ca_dir) as pending:
        certs.write(pending / f"{node}.json", json.dumps(record).encode(), 0o600)
    return token.encode()


@contextlib.contextmanager
def _pending(ca_dir: Path) -> Iterator[Path]:
    """The folder of pending tokens, locked: a token minted again while a request for the one
    before is signed waits, so that the old one is never spent on the new one's file."""
    pending = Path(ca_dir) / "private" / PENDING
    pending.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(pending / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield pending


def answer(ca_dir: Path, line: bytes, days: int) -> dict[str, str]:
    """The service's reply to one request LINE: the node's certificate, or why not."""
    try:
        req = json.loads(line)
        node, csr, mac = str(req["node"]), str(req["csr"]), str(req["mac"])
    except (ValueError, KeyError, TypeError, RecursionError):
        return {"error": "the request is not a join request"}
    try:
        certs.check_node_name(node)
    except MigctlError as err:
        return {"error": str(err)}
    with _pending(ca_dir) as pending:
        record_path = pending / f"{node}.json"
        try:
            record = json.loads(record_path.read_bytes())
            secret = bytes.fromhex(record["secret"])
        except (OSError, ValueError, KeyError, TypeError):
            return {"error": f"no token is pending for {node} (never minted, or spent)"}
        if not hmac.compare_digest(_mac(secret, "request", node, csr), mac):
            return {"error": f"the request for {node} is not signed by its token"}
        if time.time() > float(record.get("expires", 0)):
            record_path.unlink(missing_ok=True)
            return {"error": f"{node}'s token expired: mint another"}
        try:
            signed_node, crt = certs.sign(ca_dir, csr.encode(), days=days)
        except MigctlError as err:
            return {"error": f"the request for {node}: {err}"}
        if signed_node != node:  # the token names the node: not to be spent on another name
            return {"error": f"the token is {node}'s, the request is for {signed_node}"}
        record_path.unlink()  # spent: one certificate per token
    ca = certs.ca_certificate(ca_dir).public_bytes(serialization.Encoding.PEM).decode()
    log.info("join: signed a certificate for %s (%d days)", node, days)
    return {"crt": crt.decode(), "ca": ca, "mac": _mac(secret, "reply", node, crt.decode(), ca)}


class Service(socketserver.ThreadingTCPServer):
    """The operator's join service: one request per connection, at most MAX_HANDLERS at once,
    each within IO_TIMEOUT_S (a slow or silent client holds nothing longer)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], ca_dir: Path, days: int = 825) -> None:
        self.ca_dir, self.days = Path(ca_dir), days
        self.handlers = threading.BoundedSemaphore(MAX_HANDLERS)
        super().__init__(address, _Handler)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server = self.server
        assert isinstance(server, Service)
        if not server.handlers.acquire(blocking=False):
            self._send({"error": "the join service is busy: try again"})
            return
        try:
            line = self._line(time.monotonic() + IO_TIMEOUT_S)
            reply = (answer(server.ca_dir, line, server.days) if line is not None
                     else {"error": f"no complete request within {IO_TIMEOUT_S:.0f} s and "
                                    f"{MAX_LINE} bytes"})
        finally:
            server.handlers.release()
        if "error" in reply:
            log.warning("join from %s refused: %s", self.client_address[0], reply["error"])
        self._send(reply)

    def _line(self, deadline: float) -> bytes | None:
        """One line, read before DEADLINE and within MAX_LINE; None otherwise."""
        data = b""
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0 or len(data) > MAX_LINE:
                return None
            self.request.settimeout(left)
            try:
                chunk = self.request.recv(16 << 10)
            except OSError:
                return None
            if not chunk:
                return None
            data += chunk
        line = data.split(b"\n", 1)[0]
        return line if len(line) <= MAX_LINE else None

    def _send(self, reply: dict[str, str]) -> None:
        with contextlib.suppress(OSError):
            self.request.settimeout(IO_TIMEOUT_S)
            self.request.sendall(json.dumps(reply).encode() + b"\n")


def join(token_text: str, tls_dir: Path) -> Path:
    """On the new node: its key (made here, kept if present), a request signed by the token,
    and the certificate and CA the service returns, checked against the token, in TLS_DIR (what
    the agent's --tls-dir reads). Returns the certificate's path."""
    token = Token.decode(token_text)
    tls_dir = Path(tls_dir)
    csr = certs.request(tls_dir, token.node).read_text()
    host, _, port = token.server.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidArgument(f"the join token's service address {token.server!r} is not "
                              "HOST:PORT")
    request = {"node": token.node, "csr": csr, "mac": _mac(token.secret, "request", token.node,
                                                             csr)}
    try:
        with socket.create_connection((host.strip("[]"), int(port)),
                                      timeout=IO_TIMEOUT_S) as s:
            s.sendall(json.dumps(request).encode() + b"\n")
            line = s.makefile("rb").readline(MAX_LINE + 1)
    except OSError as err:
        raise FailedPrecondition(f"cannot reach the join service at {token.server}: "
                                 f"{err}") from None
    try:
        reply = json.loads(line)
    except (ValueError, RecursionError):
        reply = None
    if not isinstance(reply, dict):
        raise Refused(f"the join service at {token.server} did not answer a join")
    if "error" in reply:
        raise Refused(f"the join service refused: {str(reply['error'])[:500]}")
    crt, ca = str(reply.get("crt", "")), str(reply.get("ca", ""))
    if not hmac.compare_digest(_mac(token.secret, "reply", token.node, crt, ca),
                               str(reply.get("mac", ""))):
        raise Refused(f"the reply from {token.server} is not signed by the token: not the "
                      "operator's join service")
    try:  # exactly one certificate each: a second CA in ca.crt would be trusted too
        cas = x509.load_pem_x509_certificates(ca.encode())
        certificates = x509.load_pem_x509_certificates(crt.encode())
    except ValueError as err:
        raise Refused(f"the join service returned no certificate: {err}") from None
    if len(cas) != 1 or len(certificates) != 1:
        raise Refused(f"the join service returned {len(cas)} CA and {len(certificates)} node "
                      "certificates: one of each is a join's answer")
    ca_cert, cert = cas[0], certificates[0]
    if fingerprint(ca_cert) != token.ca_sha256:
        raise Refused("the CA the join service returned is not the one the token names")
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if [n.value for n in names] != [token.node]:
        raise Refused(f"the certificate returned is not {token.node}'s")
    key = serialization.load_pem_private_key((tls_dir / f"{token.node}.key").read_bytes(),
                                             password=None)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise Refused(f"the certificate returned is not the CA's: {err}") from None
    if cert.public_key() != key.public_key():
        raise Refused("the certificate returned is not for this node's key")
    # what was checked is written, re-encoded: nothing else the reply held
    certs.write(tls_dir / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    certs.write(tls_dir / f"{token.node}.crt", cert.public_bytes(serialization.Encoding.PEM),
                0o644)
    (tls_dir / f"{token.node}.csr").unlink(missing_ok=True)
    return tls_dir / f"{token.node}.crt"


def serve(address: str, ca_dir: Path, days: int) -> None:
    """Run the join service at ADDRESS (HOST:PORT) until interrupted."""
    host, _, port = address.rpartition(":")
    with Service((host.strip("[]") or "0.0.0.0", int(port)), ca_dir, days) as service:
        log.info("join service on %s for the CA in %s", address, ca_dir)
        service.serve_forever()

