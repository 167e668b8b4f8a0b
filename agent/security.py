"""Mutual TLS for every gRPC hop: agents and clients prove themselves with certificates of one CA.

Target-name verification: certificates name *nodes*, not addresses. Lab and edge nodes change
IPs (DHCP, namespaces re-created, NAT), so a certificate bound to an IP or DNS name of the moment
would need reissuing whenever the network moves. Instead every node certificate carries the fixed
DNS SAN ``migctl`` (``TARGET_NAME``) plus its own node name, and `secure_channel` sets
``grpc.ssl_target_name_override`` so the TLS handshake checks the server's certificate against
that name instead of the dialled address. The chain is still fully verified against our CA, so
what a client learns is "the peer holds a node key issued by our CA" whatever its IP. Client
certificates do not carry ``migctl`` (nor serverAuth), so a stolen operator certificate cannot
impersonate an agent. When the caller knows which node it means to reach (the inventory does),
it may pass ``server_name=<node>`` to pin that node, which every node certificate also carries.

The server side requires and verifies a client certificate from the same CA
(``require_client_auth=True``): a caller without one never reaches a handler.

Roles (zero trust: what a caller may do follows from its certificate, not from where it calls
from): `agent.certs` puts the role in the subject's OU, ``migctl-node`` or ``migctl-operator``,
and `caller_of` accepts that role only when the EKU and SANs say the same thing (a node serves
and calls and is named ``migctl``; an operator only calls and is never named ``migctl``). A
certificate whose parts disagree, or one issued before roles existed, yields no role: refuse it.

What a caller needs too (its identity's files, a verified channel) is in migctl.common.tls.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from migctl.common.errors import FailedPrecondition
from migctl.common.tls import TARGET_NAME, TLSFiles

log = logging.getLogger(__name__)

NODE = "node"  # an agent: serves, and calls other agents (pulls)
OPERATOR = "operator"  # a CLI or other client: calls agents, never serves
NODE_OU = "migctl-node"  # subject OU that `agent.certs` writes for each role
OPERATOR_OU = "migctl-operator"
_PEM_KEY = "x509_pem_cert"  # gRPC's auth-context entry for the verified peer's leaf certificate


def server_credentials(files: TLSFiles) -> grpc.ServerCredentials:
    """Serve with our certificate and refuse any caller without a certificate from our CA."""
    ca, cert, key = files.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=True)


class ServerIdentity:
    """The certificate an agent serves with, taken again from its files on reload() (SIGHUP):
    a renewed certificate applies to the next connection, without a restart. Outgoing
    channels read the files anew each time already (channel_credentials)."""

    def __init__(self, files: TLSFiles) -> None:
        self.files = files
        self._asked = threading.Event()
        self._initial = self._configuration()

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        ca, cert, key = self.files.read()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def reload(self) -> None:
        self._asked.set()

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Asked by grpc before each handshake; None keeps the configuration it has."""
        if not self._asked.is_set():
            return None
        self._asked.clear()
        try:
            configuration = self._configuration()
        except (OSError, FailedPrecondition) as err:
            log.error("certificate reload failed, serving the one before: %s", err)
            return None
        log.info("serving the certificate in %s again, as reloaded", self.files.cert)
        return configuration

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._initial, self._fetch,
                                                   require_client_authentication=True)


def peer_identity(context: grpc.ServicerContext) -> str:
    """The caller's certificate CN (node or client name) for logs; "" if it presented none."""
    values = context.auth_context().get("x509_common_name") or []
    return values[0].decode(errors="replace") if values else ""


@dataclass(frozen=True)
class Caller:
    """Who called, as its certificate proves: the CN and the role (`NODE` or `OPERATOR`)."""

    name: str
    role: str


def caller_of(context: grpc.ServicerContext) -> Caller | None:
    """The verified caller's name and role; None (refuse the call) if its certificate has none.

    The handshake already checked the chain against our CA, so only the role is decided here.
    """
    values = context.auth_context().get(_PEM_KEY) or []
    return _caller_of_pem(values[0]) if values else None


@functools.lru_cache(maxsize=1024)  # a handful of certs make every call: parse each once
def _caller_of_pem(pem: bytes) -> Caller | None:
    try:
        cert = x509.load_pem_x509_certificate(pem)
        eku = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        sans = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    except (ValueError, x509.ExtensionNotFound):
        return None
    cn = _only(cert.subject, NameOID.COMMON_NAME)
    ou = _only(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
    if not cn:
        return None
    server, client = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    if ou == NODE_OU and {server, client} <= eku and TARGET_NAME in sans and cn in sans:
        return Caller(cn, NODE)
    if ou == OPERATOR_OU and eku == {client} and TARGET_NAME not in sans:
        return Caller(cn, OPERATOR)
    return None


def _only(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    """The attribute's value if the name has exactly one: two OUs would make the role ambiguous."""
    attrs = name.get_attributes_for_oid(oid)
    return attrs[0].value if len(attrs) == 1 and isinstance(attrs[0].value, str) else None
