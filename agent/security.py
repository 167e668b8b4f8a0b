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

Nothing here imports `agent.dataplane.channel`, so that module can build on this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from agent.errors import FailedPrecondition

TARGET_NAME = "migctl"  # DNS SAN carried by every node certificate (see module docstring)
_OVERRIDE = "grpc.ssl_target_name_override"


@dataclass(frozen=True)
class TLSFiles:
    """Where one identity's PEM files live: the CA to trust, and its own certificate and key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_dir(cls, directory: Path, name: str) -> TLSFiles:
        """`directory/ca.crt`, `directory/<name>.crt`, `directory/<name>.key` (the `certs` layout).

        Checked here, up front, so a missing file is reported by name at start-up rather than as
        an opaque handshake failure on the first call.
        """
        directory = Path(directory)
        files = cls(ca=directory / "ca.crt", cert=directory / f"{name}.crt",
                    key=directory / f"{name}.key")
        missing = [str(p) for p in (files.ca, files.cert, files.key) if not p.is_file()]
        if missing:
            raise FailedPrecondition(
                f"TLS file(s) missing: {', '.join(missing)}; create them with "
                f"`python -m agent.certs {directory} <node>... --client <name>` "
                f"(identity {name!r})")
        return files

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(ca, cert, key) PEM bytes, read now so re-issued files apply to the next channel."""
        return _read(self.ca), _read(self.cert), _read(self.key)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise FailedPrecondition(f"cannot read TLS file {path}: {e.strerror or e}") from e


def server_credentials(files: TLSFiles) -> grpc.ServerCredentials:
    """Serve with our certificate and refuse any caller without a certificate from our CA."""
    ca, cert, key = files.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=True)


def channel_credentials(files: TLSFiles) -> grpc.ChannelCredentials:
    """Trust only our CA and present our own certificate (the server requires one)."""
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=cert)


def secure_channel(address: str, files: TLSFiles, options: Sequence[tuple[str, Any]] = (),
                   server_name: str = TARGET_NAME) -> grpc.Channel:
    """A mutual-TLS channel to `address` that verifies the server as `server_name`, not its IP.

    `options` are passed through (e.g. `agent.dataplane.channel.OPTIONS`); any target-name
    override in them is replaced by `server_name`.
    """
    opts = [o for o in options if o[0] != _OVERRIDE]
    opts.append((_OVERRIDE, server_name))
    return grpc.secure_channel(address, channel_credentials(files), options=opts)


def peer_identity(context: grpc.ServicerContext) -> str:
    """The caller's certificate CN (node or client name) for logs; "" if it presented none."""
    values = context.auth_context().get("x509_common_name") or []
    return values[0].decode(errors="replace") if values else ""
