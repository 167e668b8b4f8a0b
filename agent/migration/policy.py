"""Where each piece comes from: the seed's policy, with the link and load it only proposed.

Snapshots and checkpoints: the newest copy of the same service first, then the best copy of
the same application, then the source. Content-addressed pieces (layers, read-only volumes):
whichever holder is expected to deliver soonest. Expected time = RTT + size / throughput,
stretched by the holder's load; links are measured (a timed probe stream) and re-measured
after a minute. Every choice carries a sentence saying why, for the report.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from migctl.agent.catalog.registry import Holding
from migctl.common.errors import FailedPrecondition, InvalidArgument, MigctlError
from migctl.common.peer import Connect, Peer
from migctl.proto import migctl_pb2 as pb

PROBE_BYTES = 1 << 20
LINK_TTL = 60.0


@dataclass(frozen=True)
class Link:
    rtt: float         # seconds
    throughput: float  # bytes per second
    load: float        # load average per core of the node

    def expected(self, size: int) -> float:
        return (self.rtt + size / max(self.throughput, 1.0)) * (1.0 + self.load)

    def describe(self) -> str:
        return (f"link {self.throughput * 8 / 1e6:.0f} Mbit/s, rtt {self.rtt * 1e3:.1f} ms, "
                f"load {self.load:.2f}")


LOCAL = Link(rtt=0.0, throughput=float("inf"), load=0.0)


class Links:
    """Measured links to other nodes, refreshed when older than LINK_TTL."""

    def __init__(self, connect: Connect,
                 page_server_min_rate: float = 0.0) -> None:
        self.connect = connect
        self.page_server_min_rate = page_server_min_rate or PAGE_SERVER_MIN_RATE
        self._known: dict[str, tuple[float, Link]] = {}
        self._chosen: dict[str, str] = {}  # the memory transfer the link last chose, by address
        self._lock = threading.Lock()

    def chosen(self, address: str) -> str:
        with self._lock:
            return self._chosen.get(address, "")

    def choose(self, address: str, how: str) -> None:
        """Remembers what the link chose, so that a later measure inside the page server's
        band keeps it (PAGE_SERVER_BAND)."""
        with self._lock:
            self._chosen[address] = how

    def measure(self, address: str) -> Link | None:
        with self._lock:
            cached = self._known.get(address)
        if cached and time.monotonic() - cached[0] < LINK_TTL:
            return cached[1]
        try:
            with Peer("", address, self.connect) as peer:
                start = time.monotonic()
                info = peer.call("GetNode", pb.GetNodeRequest(), timeout=2)
                rtt = time.monotonic() - start
                start = time.monotonic()
                got = sum(len(c.data) for c in peer.stream(
                    "Probe", pb.ProbeRequest(size=PROBE_BYTES), timeout=10))
                elapsed = max(time.monotonic() - start, 1e-6)  # includes a round trip
                link = Link(rtt=rtt, throughput=got / elapsed, load=info.load)
        except MigctlError:
            return None
        with self._lock:
            self._known[address] = (time.monotonic(), link)
        return link


PAGE_SERVER = "page server"
DELTA = "delta"
POST_COPY = "post-copy"
PAGE_SERVER_MIN_RATE = 100e6
"""Bytes/s of the link to the source from which the final checkpoint's memory pages go
straight to a page server at the destination. Below it they are dumped at the source and sent
as a delta against the pre-copy checkpoint's: hashing and patching cost about as much as such
a link's transfer of the whole memory, and the delta sends only what changed (bench/downtime.py
measures both)."""


PAGE_SERVER_BAND = 0.25
"""Hysteresis around the page server's rate: a link measuring within 25 % of it keeps the
transfer it chose last (delta, which every source can do, when it chose none). The lab's
unshaped links measured 770-1000 Mbit/s from run to run, both sides of 800: without the band
two runs on one machine moved memory two ways."""


def memory_transfer(link: Link | None, source_method: str, criu: str | None,
                    asked: str = "", no_post_copy: str = "", *,
                    min_rate: float = PAGE_SERVER_MIN_RATE, last: str = "") -> tuple[str, str]:
    """How the final checkpoint's memory pages travel, and why, for the report: what the
    operator ASKED for, else the link decides against MIN_RATE, keeping LAST (what it chose
    before) inside the band. A page server that cannot run is refused, and so is post-copy
    (never chosen unasked: until the last page arrived, the container's memory is on two
    nodes) where NO_POST_COPY says why it cannot run."""
    if asked not in ("", PAGE_SERVER, DELTA, POST_COPY):
        raise InvalidArgument(f"memory transfer {asked!r}: it is {PAGE_SERVER!r}, {DELTA!r} "
                              f"or {POST_COPY!r}")
    if asked == DELTA:
        return DELTA, "asked for"
    if asked == POST_COPY:
        if no_post_copy:
            raise FailedPrecondition(f"no post-copy for this migration: {no_post_copy}")
        return POST_COPY, "asked for"
    cannot = ("the source checkpoints through its engine, which has no page server"
              if source_method != "direct" else
              "this node has no CRIU of its own to run a page server" if not criu else "")
    if cannot and asked == PAGE_SERVER:
        raise FailedPrecondition(f"no page server for this migration: {cannot}")
    if cannot:
        return DELTA, cannot
    if asked == PAGE_SERVER:
        return PAGE_SERVER, "asked for"
    if link is None:
        return DELTA, "the link to the source could not be measured"
    low, high = min_rate * (1 - PAGE_SERVER_BAND), min_rate * (1 + PAGE_SERVER_BAND)
    rate = f"the link measured {_mbit(link.throughput)} Mbit/s"
    band = f"the page server's band of {_mbit(low)}-{_mbit(high)} Mbit/s"
    if link.throughput < low:
        return DELTA, f"{rate}, under {band}"
    if link.throughput >= high:
        return PAGE_SERVER, f"{rate}, above {band}"
    if last in (DELTA, PAGE_SERVER):
        return last, f"{rate}, inside {band}: {last} as this link chose before"
    return DELTA, f"{rate}, inside {band}, and this link chose nothing before"


def _mbit(rate: float) -> str:
    return f"{rate * 8 / 1e6:.0f}"


@dataclass(frozen=True)
class Choice:
    holding: Holding
    link: Link
    reason: str


def rank(holdings: list[Holding], links: dict[str, Link], *, freshness: bool,
         now: float | None = None) -> list[Choice]:
    """Candidates best first. With FRESHNESS (snapshots, checkpoints) newer copies come first
    and the link breaks ties; otherwise the expected delivery time decides."""
    now = now or time.time()
    usable = [h for h in holdings if h.node in links]

    def order(h: Holding) -> tuple[float, float]:
        t = links[h.node].expected(h.size)
        return (-h.timestamp, t) if freshness else (t, 0.0)

    out = []
    for h in sorted(usable, key=order):
        link = links[h.node]
        age = f"{now - h.timestamp:.0f} s old, " if h.timestamp else ""
        where = "this node's cache" if link is LOCAL else h.node
        out.append(Choice(h, link, f"{age}{_mb(h.size)} on {where}; "
                                   f"{'local' if link is LOCAL else link.describe()}"))
    return out


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
