"""Fetching a piece from the best holder, falling back to the next one and then the source.

Nothing a neighbour sends is trusted: a held copy must match the digest its holder published
(a stale or corrupted file is refused and the next holder is tried), a layer must hash to its
diff id, and a basis only ever feeds a delta whose result is verified against the source.
A slow neighbour is cut off by a deadline derived from its measured link.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from migctl.agent.catalog.registry import Holding, Registry
from migctl.agent.catalog.store import Store
from migctl.agent.dataplane.files import digest, write_stream
from migctl.agent.dataplane.image import verify_sha256
from migctl.agent.migration.policy import LOCAL, Choice, Link, Links, rank
from migctl.agent.migration.report import Report
from migctl.common.errors import MigctlError
from migctl.common.peer import Connect, Peer
from migctl.proto import migctl_pb2 as pb

log = logging.getLogger(__name__)

FRESHNESS_KINDS = ("rw", "app", "svc")
LOCAL_ONLY = ("app:",)
"""An application's checkpoints (by image) may be another container's: a basis from this node's
own cache only (a source of a node that held it), never fetched from a neighbour."""
HOLDER_START_S = 5.0  # a holder's set-up and first reply, on top of the link's estimate
# A holder that has not served an image's layers before first exports the whole image from its
# engine (`docker save`): tens of seconds for the lab's images on a loaded 2-core machine (one
# CI run fell back to the source after the 5 s that a held file gets).
LAYER_EXPORT_S = 60.0


class Sourcing:
    def __init__(self, me: str, source: str, migration_id: str, cooperative: bool,
                 registry: Registry | None,
                 links: Links, store: Store, connect: Connect,
                 report: Report, phase: int) -> None:
        self.me = me
        self.source = source  # never a candidate: it is the fallback, and the one to spare
        self.migration_id = migration_id  # holders serve only what its source vouches for
        self.cooperative = cooperative and registry is not None
        self.registry = registry
        self.links = links
        self.store = store
        self.connect = connect
        self.report = report
        self.phase = phase

    def plan(self, keys: list[str]) -> dict[str, list[Choice]]:
        """Ranked holders of each key: this node's cache and, in cooperative mode, the
        neighbours the registry names (whose links are measured in parallel)."""
        found: dict[str, list[Holding]] = {k: [] for k in keys}
        shared = [k for k in keys if not k.startswith(LOCAL_ONLY)]
        if self.cooperative and shared:
            assert self.registry is not None
            for key, holders in self.registry.lookup(shared).items():
                found[key] = [h for h in holders if h.node not in (self.me, self.source)]
        for key in keys:
            found[key] += [Holding(key, self.me, i.ts, i.size, i.digest)
                           for i in self.store.find(key, for_source=self.source)]
        nodes = {h.node for hs in found.values() for h in hs} - {self.me}
        links: dict[str, Link] = {self.me: LOCAL}
        with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
            measured = dict(zip(nodes, pool.map(self._measure, nodes), strict=True))
        links.update({n: lk for n, lk in measured.items() if lk is not None})
        return {k: rank(hs, links, freshness=k.split(":")[0] in FRESHNESS_KINDS)
                for k, hs in found.items()}

    def _measure(self, node: str) -> Link | None:
        try:
            assert self.registry is not None
            return self.links.measure(self.registry.address(node))
        except (KeyError, MigctlError):
            return None

    def _deadline(self, c: Choice, prepare: float = 0.0) -> float:
        return HOLDER_START_S + prepare + 4 * c.link.expected(c.holding.size)

    def fetch_held(self, kind: str, item: str, choices: list[Choice], dest: Path,
                   verify: Callable[[Path], None] | None = None) -> Choice | None:
        """The first holder whose copy arrives whole and verified; None when none did."""
        for c in choices:
            start = time.monotonic()
            try:
                if c.holding.node == self.me:
                    cached = self.store.get(c.holding.key, c.holding.timestamp,
                                            for_source=self.source)
                    if cached is None:
                        continue
                    shutil.copyfile(cached.path, dest)
                    size = 0
                else:
                    size = self._stream(c, dest, "FetchHeld", pb.HeldRef(
                        key=c.holding.key, timestamp=c.holding.timestamp,
                        migration_id=self.migration_id, source_node=self.source),
                        self._deadline(c))
                if c.holding.digest and digest(dest) != c.holding.digest:
                    raise MigctlError(f"copy on {c.holding.node} does not match its digest "
                                      "(stale or corrupted); refused")
                if verify:
                    verify(dest)
            except (MigctlError, OSError) as err:
                dest.unlink(missing_ok=True)
                self.report.log(f"{kind} {item}: {c.holding.node} failed "
                                f"({err}); trying the next holder")
                continue
            self.report.transfer(kind, item, c.holding.node, self.phase, size,
                                 time.monotonic() - start,
                                 "cached" if c.holding.node == self.me else "whole", c.reason)
            return c
        return None

    def fetch_layer(self, diff_id: str, choices: list[Choice], source: Peer,
                    dest: Path) -> None:
        """A layer from its best holder, else the source; each verified against its diff id."""
        def check(path: Path) -> None:
            verify_sha256(path, diff_id, f"layer {diff_id[:19]}")

        for c in choices:
            if c.holding.node == self.me:
                continue
            start = time.monotonic()
            try:
                size = self._stream(c, dest, "ExportLayer", pb.LayerRef(diff_id=diff_id),
                                    self._deadline(c, LAYER_EXPORT_S))
                check(dest)
            except (MigctlError, OSError) as err:
                dest.unlink(missing_ok=True)
                self.report.log(f"layer {diff_id[:19]}: {c.holding.node} failed ({err}); "
                                "trying the next holder")
                continue
            self.report.transfer("layer", diff_id, c.holding.node, self.phase, size,
                                 time.monotonic() - start, "whole", c.reason)
            return
        start = time.monotonic()
        size = write_stream((ch.data for ch in source.stream(
            "ExportLayer", pb.LayerRef(diff_id=diff_id), timeout=600)), dest)
        check(dest)
        self.report.transfer("layer", diff_id, source.name, self.phase, size,
                             time.monotonic() - start, "whole",
                             "from the source" if not self.cooperative
                             else "no neighbour holds it" if not choices
                             else "every neighbour failed")

    def _stream(self, c: Choice, dest: Path, method: str, request: object,
                timeout: float) -> int:
        assert self.registry is not None
        # pinned: the holder must prove it is the node the registry named
        with Peer(c.holding.node, self.registry.address(c.holding.node), self.connect) as holder:
            return write_stream((ch.data for ch in holder.stream(method, request, timeout)),
                                dest)
