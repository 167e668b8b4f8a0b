"""The Redis backend of the registry: one shared server instead of asking every agent.

Layout (all under the `migctl:` prefix, so the database can be shared):
- `migctl:holders:<KEY>`: sorted set of `<NODE>|<TIMESTAMP>` members scored by TIMESTAMP, so one
  node may hold several timestamped snapshots of an rw volume (content-addressed keys: 0).
- `migctl:holding:<KEY>:<NODE>|<TIMESTAMP>`: hash with `size` and `digest` of that copy.
- `migctl:nodes`: hash NODE -> agent address, refreshed by every publish.
- `migctl:node:<NODE>`: the node's card (JSON: address, version, protocol, room), set with a
  short expiry by the agent's beat: a node that stops answering drops out of `cards`.

KEY may contain `:` and `|`; NODE matches [A-Za-z0-9_.-], so neither separator is ambiguous.
The registry is an optimisation: when Redis is unreachable a lookup finds nothing and the
migration takes everything from the source, so no method lets a Redis error escape.
"""

from __future__ import annotations

import json
import logging
import math
import re

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from migctl.agent.catalog.registry import Holding

log = logging.getLogger(__name__)

PREFIX = "migctl:"
NODES = PREFIX + "nodes"
NODE_NAME = re.compile(r"[A-Za-z0-9_.-]+")

# One round trip for any number of keys, and a consistent snapshot: the members of each sorted
# set are only known on the server, so their hashes are read there too. KEYS[i] is the sorted
# set of key i, ARGV[i] the prefix of its holding hashes. A member whose hash is missing is
# skipped (it cannot be verified without its digest).
LOOKUP_LUA = """
local out = {}
for i, holders in ipairs(KEYS) do
  local rows = {}
  for _, member in ipairs(redis.call('ZREVRANGE', holders, 0, -1)) do
    local meta = redis.call('HMGET', ARGV[i] .. member, 'size', 'digest')
    if meta[1] then
      rows[#rows + 1] = member
      rows[#rows + 1] = meta[1]
      rows[#rows + 1] = meta[2] or ''
    end
  end
  out[i] = rows
end
return out
"""


def holders_key(key: str) -> str:
    return f"{PREFIX}holders:{key}"


def holding_key(key: str, member: str) -> str:
    return f"{PREFIX}holding:{key}:{member}"


def stamp(timestamp: float) -> str:
    """Canonical text of a timestamp: the same float always gives the same member, so a
    withdraw names exactly what a publish wrote (0 -> "0", 1.5 -> "1.5", exact round trip)."""
    t = float(timestamp)
    if not math.isfinite(t):
        raise ValueError(f"timestamp must be finite, not {timestamp!r}")
    return str(int(t)) if t.is_integer() else repr(t)


def member(node: str, timestamp: float) -> str:
    return f"{node}|{stamp(timestamp)}"


class RedisRegistry:
    """Registry kept in Redis (`redis://HOST:PORT/DB`). Agents publish what their catalog gains
    and withdraw what it loses; lookups cost one round trip whatever the number of keys."""

    pushed = True

    def __init__(self, url: str, timeout: float = 1.0) -> None:
        # Short timeouts and a single immediate retry (for a pooled connection the server
        # closed): a dead registry must cost a migration about a second, not minutes.
        self.url = url
        self.client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout, socket_timeout=timeout,
            retry=Retry(NoBackoff(), 1), decode_responses=True)
        self._lookup = self.client.register_script(LOOKUP_LUA)

    def close(self) -> None:
        self.client.close()

    def lookup(self, keys: list[str]) -> dict[str, list[Holding]]:
        """Holders of each key, newest first; empty lists when Redis cannot be reached."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, list[Holding]] = {k: [] for k in keys}
        if not keys:
            return found
        try:
            rows = self._lookup(keys=[holders_key(k) for k in keys],
                                args=[holding_key(k, "") for k in keys])
        except redis.RedisError as err:
            log.warning("registry: redis %s unreachable, assuming nobody holds %d key(s): %s",
                        self.where(), len(keys), err)
            return found
        for key, flat in zip(keys, rows, strict=True):
            for i in range(0, len(flat), 3):
                node, _, ts = flat[i].rpartition("|")
                found[key].append(Holding(key, node, float(ts), int(flat[i + 1]), flat[i + 2]))
        return found

    def address(self, node: str) -> str:
        """NODE's agent address; KeyError when unknown or when Redis cannot be reached (either
        way the caller cannot fetch from NODE and falls back to the source)."""
        try:
            addr = self.client.hget(NODES, node)
        except redis.RedisError as err:
            log.warning("registry: redis %s unreachable, no address for %s: %s",
                        self.where(), node, err)
            raise KeyError(node) from err
        if addr is None:
            raise KeyError(node)
        return str(addr)

    def publish(self, node: str, address: str, holdings: list[Holding]) -> None:
        """Record NODE's address and copies in one transaction: readers never see a member
        without its size and digest."""
        members = self._members(node, holdings)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(NODES, node, address)
        for h, m in zip(holdings, members, strict=True):
            pipe.zadd(holders_key(h.key), {m: float(h.timestamp)})
            pipe.hset(holding_key(h.key, m), mapping={"size": h.size, "digest": h.digest})
        self._execute(pipe, "publish", node, len(holdings))

    def withdraw(self, node: str, holdings: list[Holding]) -> None:
        """Remove exactly these (node, timestamp) copies, atomically; others stay."""
        if not holdings:
            return
        members = self._members(node, holdings)
        pipe = self.client.pipeline(transaction=True)
        for h, m in zip(holdings, members, strict=True):
            pipe.zrem(holders_key(h.key), m)
            pipe.delete(holding_key(h.key, m))
        self._execute(pipe, "withdraw", node, len(holdings))

    @staticmethod
    def _members(node: str, holdings: list[Holding]) -> list[str]:
        """Validated before anything is queued, so a bad call writes nothing. Node names are
        restricted because `|` and `:` separate them from keys and timestamps."""
        if not NODE_NAME.fullmatch(node):
            raise ValueError(f"invalid node name {node!r}: use [A-Za-z0-9_.-]")
        for h in holdings:
            if h.node != node:
                raise ValueError(f"{node} cannot publish or withdraw {h.node}'s copy of {h.key}")
        return [member(node, h.timestamp) for h in holdings]

    def announce(self, node: str, card: dict, ttl: float) -> None:
        try:
            self.client.set(f"{PREFIX}node:{node}", json.dumps(card), ex=max(1, round(ttl)))
        except redis.RedisError as err:
            log.warning("registry: redis %s unreachable, %s not announced: %s", self.where(),
                        node, err)

    def cards(self) -> dict[str, dict]:
        """The nodes announced and not expired, by name (a card that is not JSON is left out:
        the database may be shared)."""
        names = sorted(self.client.scan_iter(match=f"{PREFIX}node:*", count=500))
        out = {}
        for key, raw in zip(names, self.client.mget(names) if names else [], strict=True):
            try:
                card = json.loads(raw) if raw else None
            except ValueError:
                card = None
            if isinstance(card, dict) and isinstance(card.get("address"), str):
                out[key[len(f"{PREFIX}node:"):]] = card
        return out

    def _execute(self, pipe: redis.client.Pipeline, what: str, node: str, n: int) -> None:
        try:
            pipe.execute()
        except redis.RedisError as err:
            log.warning("registry: redis %s unreachable, %s of %d holding(s) of %s lost: %s",
                        self.where(), what, n, node, err)

    def where(self) -> str:
        kw = self.client.connection_pool.connection_kwargs
        return f"{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"
