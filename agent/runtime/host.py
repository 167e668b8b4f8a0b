"""What this node has, whatever engine runs its containers: the CRIU the agent runs itself
(page servers, lazy pages), and the ports its own processes hold."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

CRIU_BIN = "/opt/migctl/bin"  # where scripts/setup.sh puts the CRIU it probed


def criu_path() -> str | None:
    """The CRIU this node's engine uses, for the agent's own CRIU processes (page servers)."""
    return shutil.which("criu", path=f"{CRIU_BIN}:{os.environ.get('PATH', '')}")


def host_listeners() -> set[tuple[str, str, int]]:
    """(protocol, address, port) of every TCP socket listening, and UDP socket bound and not
    connected, in this node's network namespace: what a container publishing that port would
    collide with. Read from /proc/net (psutil would walk every process's files for owners
    this does not need)."""
    found = set()
    for proto, table in (("tcp", "tcp"), ("tcp", "tcp6"), ("udp", "udp"), ("udp", "udp6")):
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if (state != "0A") if proto == "tcp" else not remote.endswith(":0000"):
                continue  # tcp: not listening (0A); udp: a connected (client) socket
            address, port = local.split(":")
            found.add((proto, _proc_address(address), int(port, 16)))
    return found


def _proc_address(hexa: str) -> str:
    """An address as /proc/net prints it: each 32-bit word in the host's byte order."""
    raw = bytes.fromhex(hexa)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
