"""`--from` may be left out: the CLI finds the one node that runs the container, and refuses
a name running on two nodes, or on none (the fleet issue). Real agents in this process."""

from __future__ import annotations

from pathlib import Path

import pytest

from migctl.client import api
from migctl.proto import migctl_pb2 as pb
from tests.inprocess import agents


def running(name: str, cid: str, state: str = "running") -> pb.ContainerSummary:
    return pb.ContainerSummary(id=cid, name=name, image="toy:1", state=state)


def test_the_one_node_that_runs_it_is_found(pki: Path, tmp_path: Path) -> None:
    with agents(pki, tmp_path) as cluster:
        cluster.runtimes["nodeA"].containers.append(running("web", "a" * 64, "exited"))
        cluster.runtimes["nodeB"].containers.append(running("web", "b" * 64))
        assert api.locate(cluster.inventory, "web") == "nodeB"  # the stopped copy is not it
        assert api.locate(cluster.inventory, "b" * 12) == "nodeB"


def test_a_name_on_two_nodes_or_on_none_is_refused_by_name(pki: Path, tmp_path: Path,
                                                           capsys) -> None:
    with agents(pki, tmp_path) as cluster:
        for node, cid in (("nodeA", "a" * 64), ("nodeB", "b" * 64)):
            cluster.runtimes[node].containers.append(running("web", cid))
        with pytest.raises(api.MigctlError, match="'web' runs on nodeA and nodeB: say which"):
            api.locate(cluster.inventory, "web")
        with pytest.raises(api.MigctlError, match="no node of the inventory runs a container "
                                                  "'db'"):
            api.locate(cluster.inventory, "db")
        assert cluster.cli("migrate", "--to", "nodeB", "web") == 1
    err = capsys.readouterr().err
    assert "'web' runs on nodeA and nodeB: say which with --from" in err
    assert "Traceback" not in err
