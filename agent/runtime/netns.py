"""Work inside a network namespace from a thread of the agent, the announcement a restored
container's addresses need, and the probe that finds an address already answering on a
segment.

A thread that enters a namespace with setns(2) stays in it, and sockets it makes belong to it;
the rest of the agent is untouched. That is cheaper than a process, and it needs nothing in the
container: images without a shell or `ip` are the common case.

Why announce: while a container is restored, the engine has already published its ports, and
the first client packet to the new address makes the node's kernel ask (ARP) for a neighbour
that does not answer yet. Later packets wait in that neighbour entry's queue, and the kernel
asks again only after its retransmit time (1 s): measured on the lab, clients got their first
answer 0.3-0.6 s after the container ran. A gratuitous ARP from the container as soon as it
runs fills every waiting entry on its segment (the node's bridge, other containers), and the
queued packets go out at once.
"""

from __future__ import annotations

import ctypes
import fcntl
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

CLONE_NEWNET = 0x40000000
SIOCGIFADDR = 0x8915
SIOCGIFHWADDR = 0x8927
ETH_P_ARP = 0x0806
ARPHRD_ETHER = 1
ANNOUNCE_S = 1.0  # the most an announcement may hold up a restored container's report

T = TypeVar("T")


def inside(netns: Path, fn: Callable[[], T], name: str = "netns",
           timeout: float | None = None) -> T:
    """FN's result, computed by a thread that entered NETNS (its exception is raised here);
    TimeoutError after TIMEOUT seconds (the thread then ends on its own)."""
    result: list[T | BaseException] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(netns) as ns:
                if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {netns}")
            result.append(fn())
        except BaseException as err:  # noqa: BLE001 - raised in the caller's thread
            result.append(err)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        raise TimeoutError(f"{name} in {netns} took over {timeout} s")
    got = result[0]
    if isinstance(got, BaseException):
        raise got
    return got


def garp_frame(mac: bytes, ip: bytes) -> bytes:
    """A gratuitous ARP request: "IP is at MAC", to everyone on the segment."""
    return (b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP)
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + b"\x00" * 6 + ip)


def _addresses(name: str) -> tuple[bytes, bytes] | None:
    """(MAC, IPv4) of interface NAME in this thread's namespace; None when it has no IPv4."""
    request = struct.pack("256s", name.encode()[:15])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            ip = fcntl.ioctl(s.fileno(), SIOCGIFADDR, request)[20:24]
            hw = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, request)
        except OSError:
            return None
    family, mac = struct.unpack_from("H", hw, 16)[0], hw[18:24]
    return (mac, ip) if family == ARPHRD_ETHER and any(mac) else None


def announce(netns: Path, addresses: set[str]) -> list[str]:
    """Send a gratuitous ARP for each of ADDRESSES (IPv4, as the engine assigned them) that an
    Ethernet interface of NETNS holds; returns "name ip" of those announced. Only those: what
    the container configured itself (say, its neighbour's address) is never spoken for."""
    def send() -> list[str]:
        done = []
        for _, name in socket.if_nameindex():
            got = _addresses(name) if name != "lo" else None
            if got is None or socket.inet_ntoa(got[1]) not in addresses:
                continue
            mac, ip = got
            try:
                with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
                    raw.bind((name, ETH_P_ARP))
                    raw.send(garp_frame(mac, ip))
            except OSError:  # this interface is down: the others are still announced
                continue
            done.append(f"{name} {socket.inet_ntoa(ip)}")
        return done

    return inside(netns, send, name="announce", timeout=ANNOUNCE_S)


def arp_frame(mac: bytes, sender: bytes, target: bytes) -> bytes:
    """An ARP request from MAC, as SENDER, for TARGET, to everyone on the segment (a probe, as
    RFC 5227's, has the sender 0.0.0.0: no neighbour learns anything from it)."""
    return (b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP)
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + sender + b"\x00" * 6 + target)


def probe(interface: str, address: str, timeout: float, tries: int = 2) -> str:
    """The MAC of whoever answers for ADDRESS on INTERFACE's segment (this namespace's), by ARP
    probes sent TRIES times within TIMEOUT seconds; "" when nobody did."""
    target = socket.inet_aton(address)
    got = _addresses(interface)
    mac = got[0] if got is not None else _hwaddr(interface)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as raw:
        raw.bind((interface, ETH_P_ARP))
        deadline = time.monotonic() + timeout
        for i in range(tries):
            raw.send(arp_frame(mac, b"\x00" * 4, target))
            until = deadline - (tries - 1 - i) * timeout / tries
            while (left := until - time.monotonic()) > 0:
                raw.settimeout(left)
                try:
                    frame = raw.recv(128)
                except TimeoutError:
                    break
                if len(frame) < 42 or frame[12:14] != struct.pack("!H", ETH_P_ARP):
                    continue
                op, sender_mac, sender_ip = struct.unpack_from("!H", frame, 20)[0], \
                    frame[22:28], frame[28:32]
                if op in (1, 2) and sender_ip == target and sender_mac != mac:
                    return ":".join(f"{b:02x}" for b in sender_mac)
    return ""


def _hwaddr(name: str) -> bytes:
    request = struct.pack("256s", name.encode()[:15])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, request)[18:24]
