"""Agents say their version and protocol; two that cannot talk refuse a migration before
anything moves, naming both (the real-nodes issue)."""

from __future__ import annotations

from pathlib import Path

import pytest

from migctl.agent.version import PROTOCOL_VERSION, version
from migctl.client import api
from tests.inprocess import agents

MID = "0123456789abcdef"


def test_get_node_carries_the_version_and_the_protocol(pki: Path, tmp_path: Path) -> None:
    with agents(pki, tmp_path) as cluster, api.AgentClient(
            cluster.inventory.nodes["nodeA"], cluster.inventory.tls()) as c:
        info = c.info()
    assert (info.version, info.protocol_version) == (version(), PROTOCOL_VERSION)


def test_agents_of_another_protocol_refuse_before_anything_moves(pki: Path, tmp_path: Path,
                                                                capsys) -> None:
    with agents(pki, tmp_path) as cluster:
        older = cluster.services["nodeA"]
        real = older.node_info

        def node_info():  # nodeA runs an agent of the protocol before
            info = real()
            info.version, info.protocol_version = "0.0.9", PROTOCOL_VERSION - 1
            return info

        older.node_info = node_info  # type: ignore[method-assign]
        nodes = cluster.inventory.nodes
        with api.AgentClient(nodes["nodeB"], cluster.inventory.tls()) as client, \
                pytest.raises(api.FailedPrecondition) as err:
            list(client.migrate("web", nodes["nodeA"], MID))
        assert cluster.cli("nodes") == 0
    message = str(err.value)
    assert f"nodeA runs migctl 0.0.9 (protocol {PROTOCOL_VERSION - 1})" in message, message
    assert f"nodeB migctl {version()} (protocol {PROTOCOL_VERSION})" in message, message
    out = capsys.readouterr().out
    assert "nodeA    " in out and f"migctl 0.0.9 (protocol {PROTOCOL_VERSION - 1})" in out, out
    # and whether each can keep a container's connections, or why not
    assert "connections closed (its engine's CRIU options are the machine's)" in out, out
