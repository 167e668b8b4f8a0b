"""Links between lab nodes as a researcher sets them: rate, loss, delay, per pair of nodes,
in both directions, leaving every other pair as it was.

Each node namespace's `eth0` gets an htb root whose classes hold one peer each (a u32 filter
on the peer's address), so a pair's rate is set on both of its ends' egress. Loss is an
iptables `statistic` rule per peer in a chain of the lab's own (MIGCTL-LINK, jumped to from
OUTPUT and FORWARD). Delay needs netem, which some kernels lack (this one does: no
sch_netem): then `--delay` is refused with that said plainly, and rate and loss still work.

What is set lives in the lab's state; a node's shaping is rebuilt whole from it on every
change, so changing one pair re-applies the node's other pairs exactly as they were.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import asdict, dataclass

from migctl.common.errors import MigctlError

CHAIN = "MIGCTL-LINK"
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)$")
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_LOSS = re.compile(r"^(\d+(?:\.\d+)?)%$")
_TIME = re.compile(r"^(\d+(?:\.\d+)?)(us|ms|s)$")
BURST_SECONDS = 0.01
"""htb bucket: 10 ms of the rate (at least a few packets), so short bursts keep the rate."""
MAX_QUANTUM = 200_000  # what htb accepts before it warns and clamps


@dataclass(frozen=True)
class LinkSpec:
    rate: str = ""    # tc's units: 100mbit, 1gbit
    loss: str = ""    # 0.1%
    delay: str = ""   # 10ms (needs netem)
    jitter: str = ""  # 2ms (with delay)

    def __post_init__(self) -> None:
        if self.rate and not _RATE.match(self.rate):
            raise MigctlError(f"--rate {self.rate!r}: give a rate in tc's units, e.g. 100mbit, "
                              "1gbit, 512kbit")
        if self.loss:
            m = _LOSS.match(self.loss)
            if not m or not 0 <= float(m.group(1)) <= 100:
                raise MigctlError(f"--loss {self.loss!r}: give a percentage from 0% to 100%")
        for name, value in (("--delay", self.delay), ("--jitter", self.jitter)):
            if value and not _TIME.match(value):
                raise MigctlError(f"{name} {value!r}: give a time such as 10ms")
        if self.jitter and not self.delay:
            raise MigctlError("--jitter needs --delay")
        if not (self.rate or self.loss or self.delay):
            raise MigctlError("set at least one of --rate, --loss, --delay")

    @property
    def rate_bps(self) -> int:
        m = _RATE.match(self.rate)
        return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else 0

    @property
    def loss_fraction(self) -> float:
        m = _LOSS.match(self.loss)
        return float(m.group(1)) / 100 if m else 0.0


def pair(a: str, b: str) -> str:
    if a == b:
        raise MigctlError(f"a link joins two different nodes, not {a} and itself")
    return "|".join(sorted((a, b)))


def in_ns(node: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["ip", "netns", "exec", f"migctl-{node}", *cmd], capture_output=True,
                         text=True)
    if check and res.returncode != 0:
        raise MigctlError(f"{node}: `{' '.join(cmd)}` failed: {res.stderr.strip()}")
    return res


def netem_available(node: str) -> bool:
    """Whether the kernel can delay packets (sch_netem), tried on the node's loopback."""
    res = in_ns(node, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
                check=False)
    if res.returncode == 0:
        in_ns(node, "tc", "qdisc", "del", "dev", "lo", "root", check=False)
    return res.returncode == 0


def set_link(state: dict, a: str, b: str, spec: LinkSpec) -> None:
    nodes = state.get("nodes", {})
    for n in (a, b):
        if n not in nodes:
            raise MigctlError(f"no lab node {n!r} (lab nodes: {', '.join(nodes) or 'none'})")
    if spec.delay and not netem_available(a):
        raise MigctlError("this kernel has no netem (sch_netem): delay and jitter cannot be "
                          "emulated here; rate and loss can")
    state.setdefault("links", {})[pair(a, b)] = asdict(spec)
    for n in (a, b):
        apply_node(state, n)


def reset(state: dict, a: str | None = None, b: str | None = None) -> list[str]:
    """Clear the pair A-B, or every link when no pair is named. Returns the pairs cleared."""
    links = state.setdefault("links", {})
    names = [pair(a, b)] if a and b else list(links)
    for name in names:
        links.pop(name, None)
    for n in sorted({n for name in names for n in name.split("|")} & set(state["nodes"])):
        apply_node(state, n)
    return names


def apply_node(state: dict, node: str) -> None:
    """Rebuild NODE's shaping from the state: one htb class and one loss rule per peer."""
    in_ns(node, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
    _chain(node)
    mtu = int(in_ns(node, "cat", "/sys/class/net/eth0/mtu").stdout)
    peers = sorted((name, LinkSpec(**spec)) for name, spec in state.get("links", {}).items()
                   if node in name.split("|"))
    if any(spec.rate or spec.delay for _, spec in peers):
        # unclassified traffic (default 0) leaves unshaped: only the named pairs are limited
        in_ns(node, "tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb",
              "default", "0")
    for index, (name, spec) in enumerate(peers, start=10):
        peer = next(n for n in name.split("|") if n != node)
        address = state["nodes"][peer]["address"].split(":")[0]
        if spec.loss_fraction:
            in_ns(node, "iptables", "-A", CHAIN, "-d", address, "-m", "statistic", "--mode",
                  "random", "--probability", f"{spec.loss_fraction:.6f}", "-j", "DROP")
        if not (spec.rate or spec.delay):
            continue
        rate = spec.rate or "100gbit"
        bps = spec.rate_bps or 100 * 10**9
        burst = max(int(bps / 8 * BURST_SECONDS), 4 * mtu)
        quantum = min(max(bps // 80, mtu), MAX_QUANTUM)
        in_ns(node, "tc", "class", "add", "dev", "eth0", "parent", "1:", "classid",
              f"1:{index}", "htb", "rate", rate, "ceil", rate, "burst", str(burst),
              "cburst", str(burst), "quantum", str(quantum))
        in_ns(node, "tc", "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip",
              "prio", "1", "u32", "match", "ip", "dst", f"{address}/32", "flowid",
              f"1:{index}")
        if spec.delay:
            netem = ["delay", spec.delay, *([spec.jitter] if spec.jitter else [])]
            in_ns(node, "tc", "qdisc", "add", "dev", "eth0", "parent", f"1:{index}", "handle",
                  f"{index}:", "netem", *netem)


def _chain(node: str) -> None:
    """The lab's own iptables chain, emptied, and jumped to from OUTPUT and FORWARD."""
    if in_ns(node, "iptables", "-N", CHAIN, check=False).returncode != 0:
        in_ns(node, "iptables", "-F", CHAIN)
    for hook in ("OUTPUT", "FORWARD"):
        if in_ns(node, "iptables", "-C", hook, "-j", CHAIN, check=False).returncode != 0:
            in_ns(node, "iptables", "-I", hook, "1", "-j", CHAIN)


def describe(state: dict) -> list[str]:
    lines = []
    for name, spec in sorted(state.get("links", {}).items()):
        a, b = name.split("|")
        parts = [f"{k} {v}" for k, v in spec.items() if v]
        lines.append(f"{a} <-> {b}: {', '.join(parts)}")
    return lines


_SINK = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
n = 0
while d := c.recv(1 << 20):
    n += len(d)
c.sendall(str(n).encode())
"""
_SOURCE = """
import socket, sys, time
size = int(sys.argv[3])
block = bytes(1 << 16)
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
start = time.monotonic()
sent = 0
while sent < size:
    sent += c.send(block[: size - sent])
c.shutdown(socket.SHUT_WR)
got = int(c.recv(64))
print(got, time.monotonic() - start)
"""


def measure(state: dict, a: str, b: str, size: int, port: int = 5201) -> float:
    """Bits per second of one TCP transfer of SIZE bytes from node A to node B, as the
    receiver counted it (the path as a migration stream meets it)."""
    import sys

    address = state["nodes"][b]["address"].split(":")[0]
    sink = subprocess.Popen(["ip", "netns", "exec", f"migctl-{b}", sys.executable, "-c", _SINK,
                             address, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None
        sink.stdout.readline()  # listening
        out = in_ns(a, sys.executable, "-c", _SOURCE, address, str(port), str(size)).stdout
        got, seconds = out.split()
        if int(got) != size:
            raise MigctlError(f"{b} received {got} of {size} bytes")
        return size * 8 / float(seconds)
    finally:
        sink.kill()
        sink.wait()


_UDP_SINK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(2.0)
print("ready", flush=True)
n = 0
try:
    while True:
        s.recv(2048)
        n += 1
except TimeoutError:
    print(n, flush=True)
"""
_UDP_SOURCE = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[3])):
    try:
        s.sendto(b"x" * 64, (sys.argv[1], int(sys.argv[2])))
    except PermissionError:
        pass  # dropped on the way out (the loss rule): the sender is told, the flow goes on
    time.sleep(0.001)
"""


def delivered(state: dict, a: str, b: str, count: int, port: int = 5202) -> float:
    """The share of COUNT datagrams from node A that node B received (loss, as a flow meets
    it)."""
    import sys

    address = state["nodes"][b]["address"].split(":")[0]
    sink = subprocess.Popen(["ip", "netns", "exec", f"migctl-{b}", sys.executable, "-c",
                             _UDP_SINK, address, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None
        sink.stdout.readline()
        in_ns(a, sys.executable, "-c", _UDP_SOURCE, address, str(port), str(count))
        return int(sink.stdout.readline()) / count
    finally:
        sink.kill()
        sink.wait()
