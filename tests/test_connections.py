"""Connections survive a migration, on the real lab: a Redis server on the lab's network `lan`
(macvlan: one segment across the nodes) keeps its address at the destination, CRIU carries
its established TCP connections, and real clients on the host see no error.

The clients speak Redis's protocol over plain sockets, so that every byte is theirs to check:
INCR answers the next integer, so a reply that does not follow the one before is state lost.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from migctl.agent.runtime.netns import inside
from migctl.lab.nodes import LAN_NETWORK, SWITCH_NS, Lab
from migctl.lab.workloads import (
    REDIS_IMAGE,
    ensure_redis_image,
    on_segment,
    remove_everywhere,
    wait_for_redis,
)
from tests.conftest import CACHE, LabHandle, migctl, migrate_json
from tests.test_faults import agent_log, agent_log_size

pytestmark = pytest.mark.lab

NAME = "keepredis"
PORT = 6379
HOOKS = "tests.agent_hooks"


def command(*words: str | bytes) -> bytes:
    parts = [w if isinstance(w, bytes) else w.encode() for w in words]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def read_line(sock: socket.socket, buf: bytearray) -> bytes:
    while b"\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\r\n")
    buf[:] = rest
    return line


def incr(sock: socket.socket, buf: bytearray, key: str) -> int:
    sock.sendall(command("INCR", key))
    line = read_line(sock, buf)
    if not line.startswith(b":"):
        raise AssertionError(f"INCR answered {line!r}")
    return int(line[1:])


def connect(address: str, timeout: float = 30) -> socket.socket:
    return socket.create_connection((address, PORT), timeout=timeout)


@dataclass
class Pinger:
    """One connection, an INCR every 10 ms: every reply must be the one before plus one."""

    address: str
    key: str = "ping"
    replies: list[tuple[float, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Pinger:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        buf = bytearray()
        try:
            with connect(self.address) as sock:
                while not self._stop.wait(0.01):
                    self.replies.append((time.monotonic(), incr(sock, buf, self.key)))
        except (OSError, AssertionError) as err:
            self.errors.append(f"{type(err).__name__}: {err}")

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(60)

    def longest_stall(self) -> float:
        times = [t for t, _ in self.replies]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)

    def check(self) -> None:
        assert self.errors == [], self.errors
        values = [v for _, v in self.replies]
        assert values == list(range(values[0], values[0] + len(values))), \
            "a reply did not follow the one before"


@pytest.fixture
def redis_on_lan(lab: LabHandle) -> Iterator[str]:
    """Redis on nodeA's `lan` network: its address, which the host reaches directly."""
    remove_everywhere(lab.docker, [NAME], [])
    a = lab.docker["nodeA"]
    ensure_redis_image(a, CACHE)
    address = on_segment(a.containers.run(REDIS_IMAGE, name=NAME, detach=True,
                                          network=LAN_NETWORK), LAN_NETWORK)
    wait_for_redis(address, PORT)
    yield address
    remove_everywhere(lab.docker, [NAME], [])


def address_at(lab: LabHandle, node: str) -> str:
    c = lab.docker[node].containers.get(NAME)
    assert c.status == "running", c.status
    return c.attrs["NetworkSettings"]["Networks"][LAN_NETWORK]["IPAddress"]


def move(*options: str, to: str = "nodeB") -> dict:
    return migrate_json("--connections", "keep", *options, "--from", "nodeA", "--to", to, NAME)


@pytest.mark.parametrize("memory", ["delta", "page-server", "post-copy"])
def test_a_client_sending_every_10ms_sees_no_error(lab: LabHandle, redis_on_lan: str,
                                                   memory: str) -> None:
    pinger = Pinger(redis_on_lan).start()
    time.sleep(0.5)
    since = agent_log_size("nodeB")
    report = move("--memory-transfer", memory)
    time.sleep(1.0)  # it goes on at nodeB
    pinger.stop()
    pinger.check()
    assert report["connections"] == "kept"
    assert address_at(lab, "nodeB") == redis_on_lan
    # the destination read the client's connection from the checkpoint and nudged it (its
    # effect, a stall of the downtime, is bench/connections.py's to measure)
    assert "nudged 1 of 1 kept connection(s)" in agent_log("nodeB", since)
    after = [t for t, _ in pinger.replies]
    assert len(after) > 50
    print(f"\n[connections {memory}] longest stall {pinger.longest_stall():.3f} s, downtime "
          f"{report['downtime_seconds']:.3f} s")


def test_an_idle_connection_with_keepalive_survives(lab: LabHandle, redis_on_lan: str) -> None:
    with connect(redis_on_lan) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, value in ((socket.TCP_KEEPIDLE, 1), (socket.TCP_KEEPINTVL, 1),
                           (socket.TCP_KEEPCNT, 3)):
            sock.setsockopt(socket.IPPROTO_TCP, opt, value)
        buf = bytearray()
        assert incr(sock, buf, "idle") == 1
        move("--memory-transfer", "delta")
        time.sleep(4)  # keepalive probes went to the new node, and were answered
        assert incr(sock, buf, "idle") == 2


def test_a_hundred_connections_at_once_survive(lab: LabHandle, redis_on_lan: str) -> None:
    socks = [connect(redis_on_lan) for _ in range(100)]
    bufs = [bytearray() for _ in socks]
    try:
        assert [incr(s, b, f"k{i}") for i, (s, b) in enumerate(zip(socks, bufs,
                                                                       strict=True))] == [1] * 100
        move("--memory-transfer", "delta")
        assert [incr(s, b, f"k{i}") for i, (s, b) in enumerate(zip(socks, bufs,
                                                                       strict=True))] == [2] * 100
    finally:
        for s in socks:
            s.close()


def test_a_large_response_in_flight_arrives_whole_and_in_order(lab: LabHandle,
                                                               redis_on_lan: str) -> None:
    """The client stops reading a 32 MB reply after its first megabyte: the rest waits in the
    server's send queue, which the checkpoint carries; every byte arrives, in order."""
    value = random.Random(26).randbytes(32 << 20)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # before the handshake
        sock.settimeout(30)
        sock.connect((redis_on_lan, PORT))
        sock.sendall(command("SET", "big", value))
        buf = bytearray()
        assert read_line(sock, buf) == b"+OK"
        sock.sendall(command("GET", "big"))
        header = read_line(sock, buf)
        assert header == b"$%d" % len(value)
        got = bytearray(buf)
        while len(got) < 1 << 20:
            got += sock.recv(65536)
        pid = str(lab.docker["nodeA"].containers.get(NAME).attrs["State"]["Pid"])
        deadline, queued = time.monotonic() + 10, 0
        while not queued and time.monotonic() < deadline:
            queued = int(subprocess.run(
                ["nsenter", "-t", pid, "-n", "ss", "-tnH", "state", "established",
                 f"sport = :{PORT}"], capture_output=True, text=True,
                check=True).stdout.split()[1])
        assert queued > 0, "the server's send queue must hold the rest at the checkpoint"
        move("--memory-transfer", "delta")
        while len(got) < len(value) + 2:
            chunk = sock.recv(1 << 20)
            assert chunk, f"the connection ended after {len(got)} bytes"
            got += chunk
        assert bytes(got) == value + b"\r\n"


@pytest.mark.parametrize("memory", ["delta", "page-server"])
def test_a_rollback_after_the_freeze_leaves_the_connection_working_at_the_source(
        lab: LabHandle, redis_on_lan: str, memory: str) -> None:
    """The destination's agent dies after the freeze: the source resumes its copy, stopped
    (restored from its final checkpoint, with its connections) or paused and cut off its
    network (given its network back)."""
    lab_ctl = Lab()
    lab_ctl.restart_agent("nodeB", ["--test-pause", "transferring-final=6"], HOOKS)
    try:
        with connect(redis_on_lan) as sock:
            buf = bytearray()
            assert incr(sock, buf, "rb") == 1
            proc = subprocess.Popen(
                [*migctl_argv(), "migrate", "--connections", "keep", "--memory-transfer",
                 memory, "--from", "nodeA", "--to", "nodeB", NAME],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            wait_for_paused(lab, "nodeA")
            os.kill(lab_ctl.state()["nodes"]["nodeB"]["agent_pid"], 9)
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode != 0, out
            deadline = time.monotonic() + 60
            while not running(lab, "nodeA") and time.monotonic() < deadline:
                time.sleep(0.2)
            assert incr(sock, buf, "rb") == 2
        assert address_at(lab, "nodeA") == redis_on_lan
    finally:
        lab_ctl.restart_agent("nodeB")
    deadline = time.monotonic() + 60
    while NAME in {c.name for c in lab.docker["nodeB"].containers.list(all=True)}:
        assert time.monotonic() < deadline, "nodeB kept its copy after the rollback"
        time.sleep(0.5)


def test_an_address_used_at_the_destination_is_refused_before_the_freeze(
        lab: LabHandle, redis_on_lan: str) -> None:
    b = lab.docker["nodeB"]
    remove_everywhere({"nodeB": b}, ["squatter"], [])
    api = b.api
    api.create_container(REDIS_IMAGE, name="squatter", host_config=api.create_host_config(
        network_mode=LAN_NETWORK), networking_config=api.create_networking_config(
        {LAN_NETWORK: api.create_endpoint_config(ipv4_address=redis_on_lan)}))
    api.start("squatter")
    try:
        with connect(redis_on_lan) as sock:
            buf = bytearray()
            assert incr(sock, buf, "sq") == 1
            res = migctl("migrate", "--connections", "keep", "--memory-transfer", "delta",
                         "--from", "nodeA", "--to", "nodeB", NAME, check=False)
            assert res.returncode == 1
            assert f"{redis_on_lan} is already used by a container on nodeB" in res.stderr
            assert NAME not in {c.name for c in b.containers.list(all=True)}
            assert incr(sock, buf, "sq") == 2  # never frozen
    finally:
        remove_everywhere({"nodeB": b}, ["squatter"], [])


def test_the_old_node_never_answers_for_the_address_once_the_new_copy_runs(
        lab: LabHandle, redis_on_lan: str) -> None:
    """Every frame on the segment's switch, by the port it came from: after the destination's
    copy first speaks for the address, no ARP or IPv4 frame from nodeA's port carries it as its
    sender (no reply, no reset)."""
    frames: list[tuple[float, str, bytes]] = []
    stop = threading.Event()
    ports = {"p-nodeA": "nodeA", "p-nodeB": "nodeB"}
    ready = threading.Barrier(len(ports) + 1)

    def capture(port: str) -> None:
        def run() -> None:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)) as raw:
                raw.bind((port, 0))
                raw.settimeout(0.1)
                ready.wait()
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        frame, meta = raw.recvfrom(2048)
                        if meta[2] != socket.PACKET_OUTGOING:  # what the node sent
                            frames.append((time.monotonic(), ports[port], frame))
        in_switch(run)

    threads = [threading.Thread(target=capture, args=(p,), daemon=True) for p in ports]
    for t in threads:
        t.start()
    ready.wait()
    pinger = Pinger(redis_on_lan).start()
    time.sleep(0.5)
    move("--memory-transfer", "page-server")  # the paused source: the hard case
    time.sleep(2.0)
    pinger.stop()
    stop.set()
    for t in threads:
        t.join(5)
    pinger.check()
    ip = socket.inet_aton(redis_on_lan)
    speaks = [(t, node) for t, node, f in frames if sender(f) == ip]
    first_b = min(t for t, node in speaks if node == "nodeB")
    assert any(node == "nodeA" for t, node in speaks if t < first_b), "nodeA spoke before"
    late = [t - first_b for t, node in speaks if node == "nodeA" and t >= first_b]
    assert late == [], f"nodeA answered for {redis_on_lan} after nodeB's copy ran: {late}"


def sender(frame: bytes) -> bytes:
    """The IPv4 address a frame speaks as: an ARP's sender, an IPv4 packet's source."""
    kind = struct.unpack_from("!H", frame, 12)[0]
    if kind == 0x0806 and len(frame) >= 32:
        return frame[28:32]
    if kind == 0x0800 and len(frame) >= 34:
        return frame[26:30]
    return b""


def in_switch(fn: Callable[[], None]) -> None:
    inside(Path(f"/run/netns/{SWITCH_NS}"), fn, name="capture")


def migctl_argv() -> list[str]:
    return [sys.executable, "-m", "migctl.client.cli"]


def running(lab: LabHandle, node: str) -> bool:
    with contextlib.suppress(Exception):
        c = lab.docker[node].containers.get(NAME)
        return c.status == "running" and not c.attrs["State"].get("Paused")
    return False


def wait_for_paused(lab: LabHandle, node: str, timeout: float = 60) -> None:
    """The source's copy has stopped for its final checkpoint (the freeze)."""
    deadline = time.monotonic() + timeout
    while running(lab, node):
        assert time.monotonic() < deadline, "the migration never froze the source"
        time.sleep(0.05)
    time.sleep(1.0)  # the checkpoint is done: the destination pauses before its next step


def test_a_paused_source_resets_its_clients_connections_at_the_freeze(lab: LabHandle) -> None:
    """On a bridge, connections are closed: a client holding one to a source paused for the
    page server is reset right after the final checkpoint (it fails over at once), not left
    hanging until the source is released. The destination pauses after the freeze (a test
    hook) so that the reset is seen while the migration still waits."""
    name = "bridgeredis"
    remove_everywhere(lab.docker, [name], [])
    a = lab.docker["nodeA"]
    ensure_redis_image(a, CACHE)
    a.containers.run(REDIS_IMAGE, name=name, detach=True, ports={f"{PORT}/tcp": 16379})
    host = lab.address("nodeA").split(":")[0]
    lab_ctl = Lab()
    lab_ctl.restart_agent("nodeB", ["--test-pause", "transferring-final=10"], HOOKS)
    try:
        wait_for_redis(host, 16379)
        with socket.create_connection((host, 16379), timeout=60) as sock:
            buf = bytearray()
            assert incr(sock, buf, "held") == 1
            proc = subprocess.Popen(
                [*migctl_argv(), "migrate", "--memory-transfer", "page-server", "--from",
                 "nodeA", "--to", "nodeB", name], stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True)
            with pytest.raises(ConnectionResetError):
                sock.recv(1)  # nothing comes but the reset
            still = proc.poll() is None
            paused = a.containers.get(name).attrs["State"].get("Paused")
            out, _ = proc.communicate(timeout=300)
        assert still and paused, "the reset came only once the migration ended"
        assert proc.returncode == 0, out
        assert "connections: closed" in out, out
    finally:
        lab_ctl.restart_agent("nodeB")
        remove_everywhere(lab.docker, [name], [])


def test_a_container_run_with_plain_runc_still_closes_its_connections(lab: LabHandle) -> None:
    """runc.conf no longer has tcp-close (migctl-runc gives it per call): the engine's
    environment gives it to the CRIU of containers run with plain runc, so that their
    checkpoints carry no established connection (a restore elsewhere, at another address,
    closes nothing it could not restore), as before. A checkpoint through the engine, with a
    client connected: CRIU wrote no TCP stream image for it."""
    name = "plainredis"
    remove_everywhere(lab.docker, [name], [])
    a = lab.docker["nodeA"]
    ensure_redis_image(a, CACHE)
    c = a.containers.run(REDIS_IMAGE, name=name, detach=True, runtime="runc",
                         ports={f"{PORT}/tcp": 16380})
    host = lab.address("nodeA").split(":")[0]
    try:
        wait_for_redis(host, 16380)
        with socket.create_connection((host, 16380), timeout=60) as sock:
            assert incr(sock, bytearray(), "plain") == 1
            a.api.post(a.api._url("/containers/{0}/checkpoints", c.id),  # docker checkpoint
                       json={"CheckpointID": "plain", "Exit": False})
        folder = Path(a.info()["DockerRootDir"]) / "containers" / c.id / "checkpoints" / "plain"
        images = sorted(p.name for p in folder.iterdir())
        assert "inventory.img" in images, images
        assert not [i for i in images if i.startswith("tcp-stream")], images
    finally:
        remove_everywhere(lab.docker, [name], [])
