"""A restored container announces its addresses (agent/runtime/netns.py), on real namespaces.

Two namespaces joined by a veth pair play the node (its bridge side) and the container."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from migctl.agent.dataplane.pages import PrivateNetns
from migctl.agent.runtime.criu.sockets import Connection
from migctl.agent.runtime.docker import isolate_network, refuse_new_connections
from migctl.agent.runtime.netns import announce, established, inside, nudge, probe

NODE_IP, CTR_IP = "10.77.0.1", "10.77.0.2"
SERVE = ("import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, "
         "socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 8099)); s.listen(1); "
         "c, _ = s.accept(); c.sendall(b'hi'); c.close()")


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def pair():
    tag = threading.get_ident() % 100000
    node, ctr = PrivateNetns(f"migctl-garp-node-{tag}"), PrivateNetns(f"migctl-garp-ctr-{tag}")
    try:
        ip("link", "add", "veth-ctr", "netns", node.name, "type", "veth", "peer", "name",
           "eth0", "netns", ctr.name)
        for ns, dev, addr in ((node, "veth-ctr", NODE_IP), (ctr, "eth0", CTR_IP)):
            ip("-n", ns.name, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns.name, "link", "set", dev, "up")
        yield node, ctr
    finally:
        node.remove()
        ctr.remove()


def mac_of(ns: PrivateNetns, dev: str) -> str:
    return ip("-n", ns.name, "-br", "link", "show", dev).split()[2]


def neighbour(ns: PrivateNetns) -> str:
    return ip("-n", ns.name, "neigh", "show", CTR_IP, "dev", "veth-ctr").strip()


def test_a_neighbour_holding_the_old_copy_s_address_learns_the_new_one(pair) -> None:
    node, ctr = pair
    ip("-n", node.name, "neigh", "add", CTR_IP, "lladdr", "02:00:00:00:00:99", "dev",
       "veth-ctr", "nud", "stale")
    assert announce(ctr.path, {CTR_IP}) == [f"eth0 {CTR_IP}"]
    for _ in range(100):
        if mac_of(ctr, "eth0") in neighbour(node):
            break
        time.sleep(0.02)
    assert mac_of(ctr, "eth0") in neighbour(node), neighbour(node)


def test_packets_waiting_for_the_address_go_out_on_the_announcement(pair) -> None:
    """The lab's case: a client's SYN waits in the node's unresolved neighbour entry. Here the
    container never answers ARP, so only the announcement can let the connection through."""
    node, ctr = pair
    subprocess.run(["ip", "netns", "exec", ctr.name, "sysctl", "-qw",
                    "net.ipv4.conf.eth0.arp_ignore=8"], check=True)
    server = subprocess.Popen(["nsenter", f"--net={ctr.path}", sys.executable, "-c", SERVE])
    got: list[bytes | BaseException] = []

    def client() -> None:
        def connect() -> bytes:
            with socket.create_connection((CTR_IP, 8099), timeout=10) as s:
                return s.recv(2)
        try:
            got.append(inside(node.path, connect))
        except OSError as err:
            got.append(err)

    try:
        for _ in range(200):  # the server listens
            if "8099" in subprocess.run(["nsenter", f"--net={ctr.path}", "ss", "-ltn"],
                                        capture_output=True, text=True).stdout:
                break
            time.sleep(0.02)
        waiting = threading.Thread(target=client)
        waiting.start()
        for _ in range(200):
            if "INCOMPLETE" in neighbour(node):
                break
            time.sleep(0.01)
        assert "INCOMPLETE" in neighbour(node)
        announce(ctr.path, {CTR_IP})
        waiting.join()
        assert got == [b"hi"]
    finally:
        server.kill()
        server.wait()


def test_a_namespace_with_only_its_loopback_announces_nothing(pair) -> None:
    node, _ = pair
    ip("-n", node.name, "link", "del", "veth-ctr")
    assert announce(node.path, {NODE_IP}) == []


def test_only_the_addresses_the_engine_assigned_are_announced(pair) -> None:
    """A container that took another address (it may, with NET_ADMIN: say its neighbour's)
    does not get the agent to claim that address for it on the segment."""
    node, ctr = pair
    ip("-n", node.name, "neigh", "add", "10.77.0.9", "lladdr", "02:00:00:00:00:99", "dev",
       "veth-ctr", "nud", "stale")
    ip("-n", ctr.name, "addr", "flush", "dev", "eth0")
    ip("-n", ctr.name, "addr", "add", "10.77.0.9/24", "dev", "eth0")
    assert announce(ctr.path, {CTR_IP}) == []
    time.sleep(0.2)
    assert "02:00:00:00:00:99" in ip("-n", node.name, "neigh", "show", "10.77.0.9")


def test_a_probe_finds_who_answers_for_an_address_and_nobody_for_a_free_one(pair) -> None:
    """The destination's check after the freeze (freeze.probe_addresses): an address another
    host answers for on the segment is named with that host's MAC; a free one is ""."""
    node, ctr = pair
    assert inside(node.path, lambda: probe("veth-ctr", CTR_IP, 0.5)) == mac_of(ctr, "eth0")
    assert inside(node.path, lambda: probe("veth-ctr", "10.77.0.3", 0.2)) == ""


def test_a_probe_hears_no_answer_from_a_copy_cut_off_its_network(pair) -> None:
    """The paused source's copy is isolated (no ARP, nothing in or out) before its final
    checkpoint: it no longer answers for its address, and answers again once given back."""
    node, ctr = pair
    isolate_network(ctr.path, True)
    isolate_network(ctr.path, True)  # idempotent
    try:
        assert inside(node.path, lambda: probe("veth-ctr", CTR_IP, 0.3)) == ""
        with pytest.raises(TimeoutError):  # not even refused: nothing answers
            inside(node.path, lambda: socket.create_connection((CTR_IP, 9), timeout=0.5))
    finally:
        isolate_network(ctr.path, False)
    with pytest.raises(ConnectionRefusedError):  # its kernel answers again
        inside(node.path, lambda: socket.create_connection((CTR_IP, 9), timeout=5))
    assert inside(node.path, lambda: probe("veth-ctr", CTR_IP, 0.5)) == mac_of(ctr, "eth0")
    assert "DROP" not in subprocess.run(["nsenter", f"--net={ctr.path}", "iptables", "-t",
                                         "raw", "-S"], capture_output=True, text=True).stdout


def test_a_paused_copy_that_closes_its_connections_resets_them_at_once(pair) -> None:
    """Its clients' open connections are reset (they fail over now, not when the copy is
    released), and new ones too until a rollback takes them again."""
    node, ctr = pair
    server = subprocess.Popen(["nsenter", f"--net={ctr.path}", sys.executable, "-c",
                               SERVE.replace("c.sendall(b'hi'); c.close()",
                                             "import time; time.sleep(30)")])
    try:
        for _ in range(200):
            if "8099" in subprocess.run(["nsenter", f"--net={ctr.path}", "ss", "-ltn"],
                                        capture_output=True, text=True).stdout:
                break
            time.sleep(0.02)

        def held_then_reset() -> str:
            with socket.create_connection((CTR_IP, 8099), timeout=5) as s:
                time.sleep(0.2)  # accepted by now
                refuse_new_connections(ctr.path, True)
                s.settimeout(5)
                try:
                    s.recv(1)
                except OSError as err:
                    return type(err).__name__  # (inside raises what it is given)
            return "nothing"

        assert inside(node.path, held_then_reset) == "ConnectionResetError"
        with pytest.raises(ConnectionRefusedError):  # a new one: reset, not left waiting
            inside(node.path, lambda: socket.create_connection((CTR_IP, 8099), timeout=5))
        refuse_new_connections(ctr.path, False)
        inside(node.path, lambda: socket.create_connection((CTR_IP, 8099), timeout=5).close())
    finally:
        server.kill()
        server.wait()


def tcp_backoff(s: socket.socket) -> int:
    """tcpi_backoff of S's TCP_INFO: how many times its retransmission timer has doubled."""
    return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[4]


def rcv_nxt(s: socket.socket) -> int:
    """What a restored socket's CRIU image says (tcp_stream_entry.inq_seq), read as CRIU does."""
    s.setsockopt(socket.IPPROTO_TCP, 19, 1)  # TCP_REPAIR
    s.setsockopt(socket.IPPROTO_TCP, 20, 1)  # TCP_REPAIR_QUEUE: the receive queue
    seq = struct.unpack("I", s.getsockopt(socket.IPPROTO_TCP, 21, 4))[0]  # TCP_QUEUE_SEQ
    s.setsockopt(socket.IPPROTO_TCP, 19, 0)
    return seq


@pytest.fixture(params=["ipv4", "dual-stack"])
def backed_off(pair, request):
    """A client (in the node's namespace) whose byte to the container was dropped until its
    retransmission timer doubled three times, as in a migration's downtime; the path is back.
    Yields (client socket, the container's end as its image would name it). The server listens
    on IPv4, or on "::" and takes the IPv4 client on an IPv6 socket (busybox nc does)."""
    node, ctr = pair
    server = inside(ctr.path, lambda: socket.create_server((CTR_IP, 8099))
                    if request.param == "ipv4" else
                    socket.create_server(("::", 8099), family=socket.AF_INET6,
                                         dualstack_ipv6=True))
    client = inside(node.path, lambda: socket.create_connection((CTR_IP, 8099), timeout=5))
    conn, (address, port, *_) = server.accept()
    peer = (address.removeprefix("::ffff:"), port)
    drop = ["ip", "netns", "exec", ctr.name, "iptables", "-w", "5"]
    rule = ["INPUT", "-p", "tcp", "--dport", "8099", "-j", "DROP"]
    try:
        subprocess.run([*drop, "-I", *rule], check=True)
        client.sendall(b"b")
        deadline = time.monotonic() + 60  # 1.4 s unloaded (0.2 + 0.4 + 0.8)
        while tcp_backoff(client) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tcp_backoff(client) >= 3
        subprocess.run([*drop, "-D", *rule], check=True)
        yield client, Connection((CTR_IP, 8099), peer, rcv_nxt(conn))
    finally:
        for s in (client, conn, server):
            s.close()


def test_a_nudge_makes_a_backed_off_peer_retransmit_at_once(pair, backed_off) -> None:
    """RFC 6069's revert: every doubling is taken off the client's timer, and it sends its byte
    again now (its backoff reads 0, or 1 after that retransmission)."""
    _, ctr = pair
    client, kept = backed_off
    assert nudge(ctr.path, [kept]) == [f"{NODE_IP}:{kept.peer[1]}"]
    assert tcp_backoff(client) <= 1


@pytest.mark.parametrize("claim", ["another peer", "another port"])
def test_a_connection_the_container_does_not_hold_is_never_nudged(pair, backed_off,
                                                                  claim: str) -> None:
    """The images name the connections; only those the restored container's own socket table
    holds get a message (a hostile source cannot aim them elsewhere)."""
    _, ctr = pair
    client, kept = backed_off
    made_up = {"another peer": Connection(kept.local, ("10.77.0.3", kept.peer[1]), kept.rcv_nxt),
               "another port": Connection(kept.local, (NODE_IP, kept.peer[1] + 1),
                                          kept.rcv_nxt)}[claim]
    assert nudge(ctr.path, [made_up]) == []
    assert tcp_backoff(client) >= 3


@pytest.mark.parametrize("address", [CTR_IP, "127.0.0.1"])
def test_a_connection_inside_the_container_is_live_but_never_nudged(pair, address) -> None:
    """Both ends are in the container (its own address, or loopback): both were restored, no
    peer outside waits."""
    _, ctr = pair
    inside(ctr.path, lambda: subprocess.run(["ip", "link", "set", "lo", "up"], check=True))
    server = inside(ctr.path, lambda: socket.create_server((address, 8100)))
    client = inside(ctr.path, lambda: socket.create_connection((address, 8100), timeout=5))
    conn, _ = server.accept()
    try:
        kept = Connection((address, 8100), client.getsockname(), 1)
        live = inside(ctr.path, lambda: established(
            Path("/proc/thread-self/net/tcp").read_text()))
        assert (kept.local, kept.peer) in live  # so only the inside rule keeps it out
        assert nudge(ctr.path, [kept]) == []
    finally:
        for s in (client, conn, server):
            s.close()
