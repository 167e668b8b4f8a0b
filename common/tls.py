"""A caller's side of mutual TLS, shared by the client and the agent: an identity's PEM files,
and a channel that verifies the server as a node of our CA by name, never by address (the
target-name rule is explained in agent/security.py, which serves with the same files)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from migctl.common.errors import FailedPrecondition

TARGET_NAME = "migctl"  # DNS SAN carried by every node certificate (agent/security.py)
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
                f"`python -m migctl.agent.certs DIR <node>... --client <name>` (identity {name!r}; "
                f"an agent's folder is DIR/nodes/<node>, a client's is DIR)")
        return files

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(ca, cert, key) PEM bytes, read now so re-issued files apply to the next channel."""
        return _read(self.ca), _read(self.cert), _read(self.key)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise FailedPrecondition(f"cannot read TLS file {path}: {e.strerror or e}") from e


def channel_credentials(files: TLSFiles) -> grpc.ChannelCredentials:
    """Trust only our CA and present our own certificate (the server requires one)."""
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=cert)


def secure_channel(address: str, files: TLSFiles, options: Sequence[tuple[str, Any]] = (),
                   server_name: str = TARGET_NAME) -> grpc.Channel:
    """A mutual-TLS channel to `address` that verifies the server as `server_name`, not its IP.

    `options` are passed through (e.g. `migctl.common.channel.OPTIONS`); any target-name
    override in them is replaced by `server_name`.
    """
    opts = [o for o in options if o[0] != _OVERRIDE]
    opts.append((_OVERRIDE, server_name))
    return grpc.secure_channel(address, channel_credentials(files), options=opts)
