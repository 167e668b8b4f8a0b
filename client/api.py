"""The façade other services use too: nodes by name, and the Agent API without gRPC noise.

`migrate` returns the report and passes each event to an optional callback; an agent's error
status arrives as the error the agent raised (migctl.common.errors: one hierarchy for both,
one class per gRPC status), with the node that answered and the agent's own message:

    try:
        report = migrate(Inventory.load(), "web", "nodeA", "nodeB", on_event=print)
    except Unavailable as err:
        retry_later(err.node, err.message)
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from migctl.common.channel import open_channel
from migctl.common.errors import (  # noqa: F401 - the client's errors are the agent's, one hierarchy
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MigctlError,
    NotFound,
    PermissionDenied,
    RuntimeFailure,
    Unavailable,
    Unimplemented,
    from_status,
)
from migctl.common.peer import Peer
from migctl.common.tls import TLSFiles
from migctl.proto import migctl_pb2 as pb

T = TypeVar("T")

MIGCTL_HOME = Path(os.environ.get("MIGCTL_HOME", "/var/lib/migctl"))

# The settings a config file may hold: key -> (its environment variable, default in MIGCTL_HOME)
SETTINGS = {"inventory": ("MIGCTL_INVENTORY", "inventory.json"),
            "tls_dir": ("MIGCTL_TLS_DIR", "tls")}


def config_path() -> Path | None:
    """The config file: $MIGCTL_CONFIG, else the first of $MIGCTL_HOME/config.toml and
    $XDG_CONFIG_HOME/migctl/config.toml (~/.config) that exists; None when none does."""
    if named := os.environ.get("MIGCTL_CONFIG"):
        return Path(named)
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return next((p for p in (MIGCTL_HOME / "config.toml", xdg / "migctl" / "config.toml")
                 if p.is_file()), None)


def read_toml(path: Path, what: str, missing: str = "",
              error: type[MigctlError] | None = None) -> dict:
    """PATH's TOML; an error names WHAT it is and why it could not be read."""
    error = error or MigctlError
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist{missing}") from None
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise error(f"{what} {path} is not valid TOML: {err}") from None


def load_config(path: Path | None = None) -> dict[str, Path]:
    """The settings of the config file (paths relative to the file's folder), checked: an
    unknown key or a value that is not a path is an error naming the file and the key."""
    path = path or config_path()
    if path is None:
        return {}
    data = read_toml(path, "config file", " (named by MIGCTL_CONFIG)")
    settings = {}
    for key, value in data.items():
        if key not in SETTINGS:
            raise MigctlError(f"config file {path}: unknown key {key!r} (known: "
                              f"{', '.join(SETTINGS)})")
        if not isinstance(value, str) or not value.strip():
            raise MigctlError(f"config file {path}: {key} must be a path in quotes, not "
                              f"{value!r}")
        settings[key] = path.parent / Path(value).expanduser()
    return settings


def _setting(key: str) -> Path:
    """KEY where no command-line flag gives it: its environment variable, else the config
    file, else its default in MIGCTL_HOME."""
    variable, default = SETTINGS[key]
    if value := os.environ.get(variable):
        return Path(value)
    return load_config().get(key) or MIGCTL_HOME / default


def default_tls_dir() -> Path:
    return _setting("tls_dir")


def default_inventory() -> Path:
    return _setting("inventory")


def registry_nodes(url: str) -> dict[str, Node]:
    """The nodes whose agents announced themselves in the registry at URL (Redis) within its
    time to live: a node that stopped answering has dropped out."""
    try:
        from migctl.agent.catalog.redis_registry import RedisRegistry
    except ModuleNotFoundError as err:
        raise MigctlError(f"an inventory read from a registry needs the {err.name!r} package: "
                          "install migctl[registry]") from None
    import redis

    registry = RedisRegistry(url, timeout=5.0)
    try:
        cards = registry.cards()
    except redis.RedisError as err:
        raise Unavailable(f"cannot read the nodes from the registry {registry.where()}: "
                          f"{err}") from None
    finally:
        registry.close()
    from migctl.agent.certs import check_node_name

    def valid(name: str) -> bool:  # anyone with the database may write a card: not "migctl"
        try:  # (every node's certificate carries that name), not "", not a terminal escape
            check_node_name(name)
            return True
        except InvalidArgument:
            return False

    return {name: Node(name, card["address"]) for name, card in sorted(cards.items())
            if valid(name)}


@dataclass(frozen=True)
class Node:
    name: str
    address: str
    docker_host: str = ""
    peer_address: str = ""  # how other agents reach it, when not at `address` (published ports)

    @property
    def address_for_peers(self) -> str:
        return self.peer_address or self.address


class Inventory:
    """Node name -> agent address, from a JSON file (`migctl lab up` writes one)."""

    def __init__(self, nodes: dict[str, Node], path: Path | None = None,
                 tls_dir: Path | None = None) -> None:
        self.nodes = nodes
        self.path = path
        self.tls_dir = tls_dir or default_tls_dir()

    def tls(self, identity: str = "client") -> TLSFiles:
        """The client's certificate, which every agent asks for."""
        try:
            return TLSFiles.from_dir(self.tls_dir, identity)
        except MigctlError as err:
            raise MigctlError(f"{err} (make them with `migctl certs init`)") from None

    @classmethod
    def load(cls, path: Path | None = None, tls_dir: Path | None = None) -> Inventory:
        """PATH and TLS_DIR come from flags; without them, from `default_inventory` and the
        inventory's own "tls_dir" (the labs write one; a relative one is the inventory file's
        neighbour, wherever the command runs), else `default_tls_dir`."""
        path = path or default_inventory()
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise MigctlError(f"no inventory at {path}: start a lab with `migctl lab up`, or "
                              "write one (see README, 'Real machines')") from None
        except json.JSONDecodeError as err:
            raise MigctlError(f"inventory {path} is not valid JSON: {err}") from None
        if data.get("registry"):  # the nodes announce themselves there (agents' --registry)
            nodes = registry_nodes(str(data["registry"]))
        else:
            nodes = {name: Node(name, n["address"], n.get("docker_host", ""),
                                n.get("peer_address", ""))
                     for name, n in data.get("nodes", {}).items()}
        if tls_dir is None and data.get("tls_dir"):
            tls_dir = path.resolve().parent / data["tls_dir"]
        return cls(nodes, path, tls_dir)

    def node(self, name: str) -> Node:
        if name not in self.nodes:
            known = ", ".join(sorted(self.nodes)) or "none"
            raise MigctlError(f"unknown node {name!r} (inventory {self.path} knows: {known})")
        return self.nodes[name]


class AgentClient:
    """One node's agent, as the client calls it: a Peer (common/peer.py) pinned to the node's
    name, whose statuses are the project's errors naming the node."""

    def __init__(self, node: Node, tls: TLSFiles, timeout: float = 10.0) -> None:
        self.node = node
        self.timeout = timeout
        self.peer = Peer(node.name, node.address,
                         lambda address, *name: open_channel(address, tls, *name))

    def close(self) -> None:
        self.peer.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: object, timeout: float | None = None) -> Any:
        return self.peer.call(method, request, timeout=timeout or self.timeout)

    def info(self) -> pb.NodeInfo:
        return self._call("GetNode", pb.GetNodeRequest())

    def authorize(self, container: str, destination: Node) -> pb.AuthorizeReply:
        """At the source: the operator's consent to move CONTAINER to DESTINATION."""
        return self._call("Authorize", pb.AuthorizeRequest(
            container=container, destination_node=destination.name), timeout=30)

    def history(self, limit: int = 0) -> list[pb.HistoryEntry]:
        """The node's migrations, newest first (LIMIT of them; 0: the agent's default)."""
        return list(self._call("History", pb.HistoryRequest(limit=limit)).entries)

    def events(self, after: str = "", follow: bool = True) -> Iterator[pb.NodeEvent]:
        """The node's migration events after the token AFTER, oldest first; with FOLLOW the
        stream stays open for new ones (close the client to end it)."""
        yield from self.peer.stream("Events", pb.EventsRequest(after=after, follow=follow),
                                    timeout=None)

    def cancel(self, migration_id: str) -> pb.CancelReply:
        """At a migration's destination: abort it, or roll it back (the reply says which)."""
        return self._call("Cancel", pb.CancelRequest(migration_id=migration_id))

    def describe(self, container: str) -> pb.ContainerSpec:
        """CONTAINER's full description (its environment too: secrets)."""
        return self._call("DescribeContainer", pb.ContainerRef(container=container),
                          timeout=60)

    def trial(self, container: str) -> pb.TrialReply:
        """Ask CRIU at this node whether it can dump CONTAINER now (it pauses for the dump)."""
        return self._call("TrialCheckpoint", pb.ContainerRef(container=container),
                          timeout=300)

    def plan(self, spec: pb.ContainerSpec, source: Node) -> pb.PlanReply:
        """At the destination: the dry run of moving SPEC (DescribeContainer at SOURCE) here."""
        return self._call("Plan", pb.PlanRequest(source_node=source.name, spec=spec),
                          timeout=60)

    def containers(self) -> list[pb.ContainerSummary]:
        """The node's containers, each with what keeps it from moving (empty: movable)."""
        return list(self._call("ListContainers", pb.ListContainersRequest()).containers)

    def migrate(self, container: str, source: Node, migration_id: str,
                remove_source: bool = False, mode: str = "cooperative",
                allow_privileged: bool = False, memory_transfer: str = "",
                connections: str = "") -> Iterator[pb.MigrationEvent]:
        """Run a migration with this node as destination; yields its events as they happen."""
        request = pb.MigrateRequest(container=container, source_node=source.name,
                                    migration_id=migration_id, remove_source=remove_source,
                                    mode=pb.Mode.Value(mode.upper()),
                                    allow_privileged=allow_privileged,
                                    memory_transfer=memory_transfer, connections=connections)
        yield from self.peer.stream("Migrate", request, timeout=None)


def each_node(inventory: Inventory, ask: Callable[[AgentClient], T], only: str | None = None,
              timeout: float = 10.0) -> tuple[dict[str, T], list[MigctlError]]:
    """ASK every node of the inventory (or ONLY that one), in parallel: the answers by node
    name, in the inventory's order, and the errors of those that failed (a node that does
    not answer hides none of the others; an error that is not an agent's, such as a missing
    TLS file, is raised)."""
    nodes = [inventory.node(only)] if only else list(inventory.nodes.values())
    tls = inventory.tls()

    def one(node: Node) -> T | MigctlError:
        try:
            with AgentClient(node, tls, timeout=timeout) as client:
                return ask(client)
        except MigctlError as err:
            if not err.node:  # not an agent's answer
                raise
            return err

    with ThreadPoolExecutor(max_workers=max(1, min(len(nodes), 16))) as pool:
        results = list(pool.map(one, nodes))
    answers = {n.name: r for n, r in zip(nodes, results, strict=True)
               if not isinstance(r, MigctlError)}
    return answers, [r for r in results if isinstance(r, MigctlError)]


def locate(inventory: Inventory, container: str) -> str:
    """The one node that runs CONTAINER (a name, or an id of at least 12 digits), for a
    command given no --from; refused when none does, or several do."""
    found, errors = each_node(inventory, AgentClient.containers)
    where = [node for node, listed in found.items()
             if any(c.state == "running" and (c.name == container or (
                 len(container) >= 12 and c.id.startswith(container))) for c in listed)]
    if len(where) == 1:
        return where[0]
    silent = f" ({', '.join(e.node for e in errors)} did not answer)" if errors else ""
    if not where:
        raise MigctlError(f"no node of the inventory runs a container {container!r}{silent}")
    raise MigctlError(f"{container!r} runs on {' and '.join(where)}: say which with --from")


HISTORY_SCAN = 200  # the latest migrations of each node where one is looked for


def ends(inventory: Inventory, migration_id: str) -> dict[str, pb.HistoryEntry]:
    """The journal entries of MIGRATION_ID at the nodes that know it (its source and its
    destination), by node name; NotFound when none does."""
    found, errors = each_node(inventory, lambda c: [
        e for e in c.history(HISTORY_SCAN) if e.migration_id == migration_id])
    out = {node: entries[0] for node, entries in found.items() if entries}
    if not out:
        silent = f" ({', '.join(e.node for e in errors)} did not answer)" if errors else ""
        raise NotFound(f"no node of the inventory knows migration {migration_id!r} among its "
                       f"latest {HISTORY_SCAN}{silent}")
    return out


def cancel(inventory: Inventory, migration_id: str) -> tuple[str, pb.CancelReply]:
    """Cancel MIGRATION_ID at its destination: (that node, its reply)."""
    known = ends(inventory, migration_id)
    destination = next((n for n, e in known.items() if e.role == "destination"), None)
    if destination is None:
        source, entry = next(iter(known.items()))
        raise FailedPrecondition(f"migration {migration_id} has not begun at a destination "
                                 f"({source} says {entry.state}): an authorization not begun "
                                 "expires by itself")
    with AgentClient(inventory.node(destination), inventory.tls()) as client:
        return destination, client.cancel(migration_id)


def trial(inventory: Inventory, container: str, source: str) -> pb.TrialReply:
    """CRIU's answer at SOURCE: can it dump CONTAINER now? (a checkpoint left running, thrown
    away; the container pauses for it)."""
    with AgentClient(inventory.node(source), inventory.tls()) as client:
        return client.trial(container)


def without_secrets(spec: pb.ContainerSpec) -> pb.ContainerSpec:
    """SPEC as a destination plans it: a plan needs sizes, not the environment or the
    engine's configuration."""
    del spec.env[:]
    spec.engine_config_json = ""
    return spec


def plan(inventory: Inventory, container: str, source: str,
         destination: str) -> pb.PlanReply:
    """What moving CONTAINER from SOURCE to DESTINATION would move, and how long it would take:
    the source describes it to the operator, the destination measures and counts. Nothing is
    authorized. The destination gets the description without the environment and the
    engine's configuration: a plan needs sizes, not secrets."""
    src, dest = inventory.node(source), inventory.node(destination)
    if src == dest:
        raise MigctlError(f"--from and --to are both {src.name}: nothing to plan")
    tls = inventory.tls()
    with AgentClient(src, tls) as source_client:
        spec = without_secrets(source_client.describe(container))
    with AgentClient(dest, tls) as client:
        return client.plan(spec, src)


def migrate(inventory: Inventory, container: str, source: str, destination: str, *,
            on_event: Callable[[pb.MigrationEvent], None] | None = None,
            remove_source: bool = False, mode: str = "cooperative",
            allow_privileged: bool = False, memory_transfer: str = "",
            connections: str = "") -> pb.MigrationReport:
    """Move CONTAINER from SOURCE to DESTINATION (node names): authorize it at the source, run
    it at the destination, and return its report. ON_EVENT gets every event in order (the
    report last). Once started, the migration goes on in the destination's agent even if
    this process dies or ON_EVENT raises."""
    src, dest = inventory.node(source), inventory.node(destination)
    if src == dest:
        raise MigctlError(f"--from and --to are both {src.name}: nothing to migrate")
    tls = inventory.tls()
    report = None
    with AgentClient(dest, tls) as client:
        client.info()  # a clear error now if the destination's agent is unreachable
        with AgentClient(src, tls) as source_client:
            grant = source_client.authorize(container, dest)
        for event in client.migrate(container, src, grant.migration_id,
                                    remove_source=remove_source, mode=mode,
                                    allow_privileged=allow_privileged,
                                    memory_transfer=memory_transfer,
                                    connections=connections):
            if on_event is not None:
                on_event(event)
            if event.HasField("done"):
                report = event.done
    if report is None:
        raise MigctlError(f"{dest.name} ended the migration without a report")
    return report
