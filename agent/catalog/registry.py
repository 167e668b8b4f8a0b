"""The registry: which nodes hold a piece of content, and how fresh their copies are.

Two backends behind one interface, chosen by configuration (`migagent --registry`):
- `inventory` (default, no extra server): ask every agent of the inventory, in parallel, with
  short timeouts; each answers from its own catalog.
- `redis://HOST:PORT/DB`: sorted sets as in the seed, key -> nodes scored by timestamp; agents
  publish what their catalog gains and loses.

Keys name content the same way everywhere: `layer:<diff id>`, `ro:<digest>`, `rw:<volume id>`,
`app:<image tag>`, `svc:<image tag>:<user>`.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from migctl.common.errors import FailedPrecondition, MigctlError
from migctl.common.peer import Connect, Peer
from migctl.proto import migctl_pb2 as pb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Holding:
    key: str
    node: str
    timestamp: float  # when the copy was made; 0 for content-addressed items
    size: int
    digest: str

    @classmethod
    def from_pb(cls, h: pb.Holding) -> Holding:
        return cls(h.key, h.node, h.timestamp, h.size, h.digest)


class Registry(Protocol):
    pushed: bool  # agents must publish what they hold (False: the registry asks them)

    def lookup(self, keys: list[str]) -> dict[str, list[Holding]]:
        """Holders of each key on other nodes, newest copy first."""

    def address(self, node: str) -> str:
        """Where NODE's agent listens; KeyError when unknown."""

    def publish(self, node: str, address: str, holdings: list[Holding]) -> None:
        """NODE now holds these copies (no-op for backends that ask the agents)."""

    def withdraw(self, node: str, holdings: list[Holding]) -> None:
        """NODE dropped these copies."""

    def announce(self, node: str, card: dict, ttl: float) -> None:
        """NODE is up: its address, version and room, forgotten after TTL seconds unless
        announced again (no-op for backends that ask the agents)."""


def checkpoint_keys(spec: pb.ContainerSpec) -> tuple[str, str]:
    """Checkpoints are cached by application (image tag) and by service (tag + user: the
    container's `user-id` label, else its name; the seed assumes one user per container)."""
    user = spec.labels.get("user-id") or spec.name
    return f"app:{spec.image}", f"svc:{spec.image}:{user}"


def newest_first(found: dict[str, list[Holding]]) -> dict[str, list[Holding]]:
    return {k: sorted(v, key=lambda h: -h.timestamp) for k, v in found.items()}


class InventoryRegistry:
    """Asks the agents themselves. A node that does not answer within TIMEOUT holds nothing,
    as far as this migration is concerned: the source is always there to fall back on."""

    pushed = False

    def __init__(self, inventory: Path, me: str, connect: Connect,
                 timeout: float = 1.5) -> None:
        self.inventory = inventory
        self.me = me
        self.connect = connect
        self.timeout = timeout

    def _nodes(self) -> dict[str, str]:
        try:
            data = json.loads(self.inventory.read_text())
        except (OSError, json.JSONDecodeError) as err:
            log.warning("registry: cannot read inventory %s: %s", self.inventory, err)
            return {}
        return {name: n.get("peer_address") or n["address"]
                for name, n in data.get("nodes", {}).items()}

    def address(self, node: str) -> str:
        return self._nodes()[node]

    def lookup(self, keys: list[str]) -> dict[str, list[Holding]]:
        found: dict[str, list[Holding]] = {k: [] for k in keys}
        peers = {n: a for n, a in self._nodes().items() if n != self.me}
        if not peers or not keys:
            return found

        def ask(node: str, address: str) -> list[pb.Holding]:
            with Peer(node, address, self.connect) as peer:  # pinned: only NODE answers for it
                return list(peer.call("Holdings", pb.HoldingsRequest(keys=keys),
                                      timeout=self.timeout).holdings)

        with ThreadPoolExecutor(max_workers=len(peers)) as pool:
            futures = {pool.submit(ask, n, a): n for n, a in peers.items()}
            done, _ = wait(futures, timeout=self.timeout + 0.5)
            for fut in done:
                try:
                    for h in fut.result():
                        if h.key in found:  # what was asked, held by the node that answered
                            found[h.key].append(Holding(h.key, futures[fut], h.timestamp,
                                                        h.size, h.digest))
                except MigctlError as err:
                    log.info("registry: %s did not answer: %s", futures[fut], err)
        return newest_first(found)

    def publish(self, node: str, address: str, holdings: list[Holding]) -> None:
        pass

    def withdraw(self, node: str, holdings: list[Holding]) -> None:
        pass

    def announce(self, node: str, card: dict, ttl: float) -> None:
        pass


def open_registry(spec: str, inventory: Path, me: str,
                  connect: Connect) -> Registry:
    if spec == "inventory":
        return InventoryRegistry(inventory, me, connect)
    if spec.startswith("redis://"):
        try:
            from migctl.agent.catalog.redis_registry import RedisRegistry
        except ModuleNotFoundError as err:
            raise FailedPrecondition(f"the Redis registry needs the {err.name!r} package: "
                                     "install migctl[registry]") from None
        return RedisRegistry(spec)
    raise ValueError(f"unknown registry {spec!r}: use 'inventory' or redis://HOST:PORT/DB")
