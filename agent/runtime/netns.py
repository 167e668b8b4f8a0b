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

Why nudge: a client whose request was lost in the downtime has backed off its retransmission
timer (0.2 s, 0.4, 0.8...), and with connections kept it waits out the current step after the
container runs again: a stall of up to the downtime again. An ICMP host unreachable that quotes
its first unacknowledged segment makes Linux take one doubling off (RFC 6069's revert, the
kernel's tcp_ld_RTO_revert) and retransmit at once when the reverted timer has expired
(bench/rto_revert.py: 0.001 s instead of 0.8-2.8 s). Other systems ignore it; a peer that asked
for IP_RECVERR sees it as a soft error.
"""

from __future__ import annotations

import ctypes
import fcntl
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from migctl.agent.runtime.criu.sockets import MAX_CONNECTIONS, Connection, ipv4

CLONE_NEWNET = 0x40000000
SIOCGIFADDR = 0x8915
SIOCGIFHWADDR = 0x8927
ETH_P_ARP = 0x0806
ARPHRD_ETHER = 1
ANNOUNCE_S = 1.0  # the most an announcement may hold up a restored container's report
RTO_REVERTS = 10  # ICMP messages per connection, one per doubling: 0.2 s grown to 200 s
TCP_ESTABLISHED = "01"

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


def checksum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF


def unreachable(src: tuple[str, int], dst: tuple[str, int], seq: int) -> bytes:
    """An ICMP host unreachable (RFC 792) quoting a segment from SRC to DST with sequence
    number SEQ: its IP header and the first 8 bytes of its TCP header."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, socket.IPPROTO_TCP, 0,
                     socket.inet_aton(src[0]), socket.inet_aton(dst[0]))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    body = (struct.pack("!BBHI", 3, 1, 0, 0) + ip
            + struct.pack("!HHI", src[1], dst[1], seq & 0xFFFFFFFF))
    return body[:2] + struct.pack("!H", checksum(body)) + body[4:]


def established(table: str) -> set[tuple[tuple[str, int], tuple[str, int]]]:
    """(local, peer) of each established IPv4 connection of a /proc/net/tcp or tcp6 TABLE
    (in tcp6, those with IPv4-mapped addresses)."""
    def endpoint(field: str) -> tuple[str | None, int]:
        address, port = field.split(":")
        words = [int(address[i:i + 8], 16) for i in range(0, len(address), 8)]
        return ipv4(words), int(port, 16)

    found = set()
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == TCP_ESTABLISHED:
            (la, lp), (pa, pp) = endpoint(fields[1]), endpoint(fields[2])
            if la is not None and pa is not None:
                found.add(((la, lp), (pa, pp)))
    return found


def nudge(netns: Path, connections: Iterable[Connection]) -> list[str]:
    """Make the peer of each of CONNECTIONS that NETNS really holds established retransmit
    now (see above); returns "peer" of those nudged. A connection the socket table does not
    hold (the images claimed it), or whose peer is in the container, gets nothing."""
    def send() -> list[str]:
        net = Path("/proc/thread-self/net")
        live = established((net / "tcp").read_text())
        if (net / "tcp6").exists():
            live |= established((net / "tcp6").read_text())
        ours = {local[0] for local, _ in live} | {"0.0.0.0"}
        done = []
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as raw:
            for c in dict.fromkeys(connections):  # each once, whatever the images repeat
                if ((c.local, c.peer) not in live or c.peer[0] in ours
                        or c.peer[0].startswith("127.") or len(done) >= MAX_CONNECTIONS):
                    continue
                frame = unreachable(c.peer, c.local, c.rcv_nxt)
                try:
                    for _ in range(RTO_REVERTS):
                        raw.sendto(frame, (c.peer[0], 0))
                except OSError:  # no route to this one: the others are still nudged
                    continue
                done.append(f"{c.peer[0]}:{c.peer[1]}")
        return done

    return inside(netns, send, name="nudge", timeout=ANNOUNCE_S)
