"""Real agents in this process (agent.service behind agent.server's role gate and mutual TLS)
over fake runtimes, for the operator's commands: no engine, no lab."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from migctl.agent import certs
from migctl.agent.health import NodeHealth
from migctl.agent.security import server_credentials
from migctl.agent.server import agent_server
from migctl.agent.service import AgentService
from migctl.client import api, cli
from migctl.common.errors import NotFound
from migctl.common.tls import TLSFiles
from migctl.proto import migctl_pb2 as pb


@dataclass
class FakeRuntime:
    """What the operator's RPCs ask of a node's engine."""

    containers: list[pb.ContainerSummary] = field(default_factory=list)
    held: set[str] = field(default_factory=set)  # layers (diff ids) this node has
    specs: dict[str, pb.ContainerSpec] = field(default_factory=dict)  # by name
    method: str = "engine"

    def versions(self) -> tuple[str, str, bool]:
        return "27.5.1", "4.2.1", True

    def root_dir(self) -> Path:
        return Path("/")

    def free_bytes(self) -> int:
        return 1 << 40

    def post_copy_problem(self) -> str:
        return "its engine has no lazy pages" if self.method == "engine" else ""

    def kept_connections_problem(self) -> str:
        return "its engine's CRIU options are the machine's" if self.method == "engine" else ""

    def describe(self, container: str) -> pb.ContainerSpec:
        if container not in self.specs:
            raise NotFound(f"no container named {container!r} on this node")
        return self.specs[container]

    def list_containers(self) -> list[pb.ContainerSummary]:
        return list(self.containers)

    def missing_layers(self, diff_ids: list[str]) -> list[str]:
        return [d for d in diff_ids if d not in self.held]


@dataclass
class Agents:
    inventory: api.Inventory
    path: Path  # the inventory file, which the agents read too
    services: dict[str, AgentService]
    runtimes: dict[str, Any]
    servers: dict[str, Any] = field(default_factory=dict)  # grpc servers, by node

    def cli(self, *args: str) -> int:
        with pytest.raises(SystemExit) as done:
            cli.main(["--inventory", str(self.path), *args])
        return done.value.code  # type: ignore[return-value]


@contextmanager
def agents(pki: Path, state: Path, names: tuple[str, ...] = ("nodeA", "nodeB"),
           runtime: Callable[[str], Any] = lambda name: FakeRuntime()) -> Iterator[Agents]:
    """An agent per node of NAMES (each with a certificate in PKI), their state under STATE,
    each over RUNTIME(its name)."""
    path = state / "inventory.json"
    services, runtimes, servers, nodes = {}, {}, {}, {}
    for name in names:
        tls = TLSFiles.from_dir(certs.node_dir(pki, name), name)
        runtimes[name] = runtime(name)
        services[name] = AgentService(name, runtimes[name], state / name, tls,  # type: ignore
                                      registry="", inventory=path)
        server = agent_server(services[name], NodeHealth(runtimes[name]))  # type: ignore
        port = server.add_secure_port("127.0.0.1:0", server_credentials(tls))
        server.start()
        servers[name] = server
        nodes[name] = api.Node(name, f"127.0.0.1:{port}")
    path.write_text(json.dumps({"tls_dir": str(pki), "nodes": {
        n.name: {"address": n.address} for n in nodes.values()}}))
    try:
        agents = Agents(api.Inventory(nodes, path, pki), path, services, runtimes, servers)
        yield agents
    finally:
        for server in agents.servers.values() if "agents" in locals() else servers.values():
            server.stop(grace=None)
