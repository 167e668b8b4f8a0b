"""The experiment behind the nudge of kept connections' peers (agent/runtime/netns.py): does an
ICMP host-unreachable that quotes a client's unacknowledged segment make a backed-off Linux
client retransmit at once (RFC 6069, the kernel's tcp_ld_RTO_revert)?

Two network namespaces joined by a veth: a client sends a byte the server's namespace drops
for DOWN seconds (the client backs off, as it does during a migration's downtime); then the
path comes back and, with --icmp N, the server's side sends N such ICMP messages quoting the
client's sequence number (the server socket's rcv_nxt, read in TCP repair mode, as a restored
socket's is in its CRIU image). Printed: when the byte arrived after the path came back.

    .venv/bin/python bench/rto_revert.py --down 2.5 [--icmp 8]

Measured here (kernel 6.18), seconds from the path's return to the byte's arrival:
down 1.7: 1.632 without, 0.155 with 8; down 2.5: 0.807 / 0.001; down 4.0: 2.767 / 0.001.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import socket
import struct
import subprocess
import threading
import time

from migctl.agent.runtime.netns import unreachable

CLIENT, SERVER = "migctl-x-cli", "migctl-x-srv"
CLIENT_IP, SERVER_IP, PORT = "10.88.0.1", "10.88.0.2", 9000
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_RECV_QUEUE = 19, 20, 21, 1


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


def enter(ns: str) -> None:
    """This thread into namespace NS (its sockets are made there)."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000)
    finally:
        os.close(fd)


def rcv_nxt(sock: socket.socket) -> int:
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
    seq = struct.unpack("I", sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, 4))[0]
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 0)
    return seq


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--down", type=float, default=2.5)
    p.add_argument("--icmp", type=int, default=0)
    args = p.parse_args()
    for ns in (CLIENT, SERVER):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    sh("ip", "netns", "add", CLIENT)
    sh("ip", "netns", "add", SERVER)
    try:
        run(args.down, args.icmp)
    finally:
        for ns in (CLIENT, SERVER):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def run(down: float, icmp: int) -> None:
    sh("ip", "link", "add", "vc", "netns", CLIENT, "type", "veth", "peer", "name", "vs",
       "netns", SERVER)
    for ns, dev, ip in ((CLIENT, "vc", CLIENT_IP), (SERVER, "vs", SERVER_IP)):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
    state: dict = {"arrived": threading.Event(), "ready": threading.Event(),
                   "go": threading.Event()}

    def server() -> None:
        enter(SERVER)
        with socket.socket() as s:
            s.bind((SERVER_IP, PORT))
            s.listen(1)
            conn, _ = s.accept()
            state["server"] = conn
            while data := conn.recv(100):
                if b"b" in data:
                    state["at"] = time.monotonic()
                    state["arrived"].set()

    def client() -> None:
        enter(CLIENT)
        with socket.create_connection((SERVER_IP, PORT)) as c:
            c.sendall(b"a")
            time.sleep(0.3)
            state["ready"].set()
            state["go"].wait()
            c.sendall(b"b")
            state["arrived"].wait(30)

    threading.Thread(target=server, daemon=True).start()
    time.sleep(0.3)
    threading.Thread(target=client, daemon=True).start()
    state["ready"].wait(10)
    drop = ["ip", "netns", "exec", SERVER, "iptables", "-w", "2"]
    rule = ["INPUT", "-p", "tcp", "--dport", str(PORT), "-j", "DROP"]
    sh(*drop, "-I", *rule)
    state["go"].set()
    time.sleep(down)
    sh(*drop, "-D", *rule)
    back = time.monotonic()
    if icmp:
        def revert() -> None:
            enter(SERVER)
            conn = state["server"]
            frame = unreachable((CLIENT_IP, conn.getpeername()[1]), (SERVER_IP, PORT),
                                rcv_nxt(conn))
            with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as raw:
                for _ in range(icmp):
                    raw.sendto(frame, (CLIENT_IP, 0))

        t = threading.Thread(target=revert)
        t.start()
        t.join()
    state["arrived"].wait(15)
    at = state.get("at")
    print(f"down {down} s, {icmp} ICMP: the byte arrived "
          f"{(at - back) if at else float('nan'):.3f} s after the path came back")


if __name__ == "__main__":
    main()
