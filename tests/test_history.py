"""`migctl history`: the journals of every node, merged newest first, each destination entry
with its report; a migration that fails stores its report and error when it ends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf.json_format import MessageToDict

from migctl.agent.migration import journal as j
from migctl.agent.migration.state import DESTINATION, SOURCE, State
from migctl.client import api
from migctl.proto import migctl_pb2 as pb
from tests.inprocess import agents

MID = "0123456789abcdef"


def test_a_failed_migration_keeps_its_report_and_error(pki: Path, tmp_path: Path) -> None:
    with agents(pki, tmp_path) as cluster:
        nodes = cluster.inventory.nodes
        with api.AgentClient(nodes["nodeB"], cluster.inventory.tls()) as client:
            with pytest.raises(api.PermissionDenied):  # nodeA never authorized it
                list(client.migrate("web", nodes["nodeA"], MID))
            [entry] = client.history()
    assert (entry.migration_id, entry.role, entry.container, entry.peer, entry.state) == (
        MID, "destination", "web", "nodeA", "failed")
    assert entry.error.startswith("nodeA: nodeB has no migration")
    assert entry.report.migration_id == MID
    assert [p.phase for p in entry.report.phases] == [pb.REQUEST]
    assert entry.report.total_seconds > 0


def _put(journal: j.Journal, mid: str, role: str, state: str, updated: float,
         container: str = "c" * 64, **data: object) -> None:
    journal.create(j.Entry(mid, role, container, state, peer="nodeX",
                           data=j.DATA[role](**data)))
    journal._db.execute("UPDATE migrations SET updated = ? WHERE id = ?", (updated, mid))


def test_history_merges_the_nodes_newest_first(pki: Path, tmp_path: Path,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    report = pb.MigrationReport(migration_id="m2", container="web", downtime_seconds=0.42,
                                origins=[pb.OriginReport(node="nodeA", bytes=12345)])
    with agents(pki, tmp_path) as cluster:
        _put(cluster.services["nodeA"].journal, "m1", SOURCE, State.ROLLED_BACK, 1000.0,
             name="db")
        _put(cluster.services["nodeB"].journal, "m2", DESTINATION, State.DONE, 2000.0,
             report=MessageToDict(report))
        _put(cluster.services["nodeB"].journal, "m0", DESTINATION, State.FAILED, 500.0,
             container="old", error="pre-flight check failed: no CRIU")  # as it was asked

        assert cluster.cli("history", "--json") == 0
        out, err = capfd.readouterr()
        listed = json.loads(out)
        assert [(e["node"], e["migration_id"], e["container"], e["state"]) for e in listed] == [
            ("nodeB", "m2", "web", "done"), ("nodeA", "m1", "db", "rolled-back"),
            ("nodeB", "m0", "old", "failed")]
        assert listed[0]["report"]["origins"] == [{"node": "nodeA", "bytes": 12345,
                                                   "seconds": 0.0}]
        assert listed[2]["error"] == "pre-flight check failed: no CRIU"

        assert cluster.cli("history", "--node", "nodeB", "--limit", "1") == 0
        out, err = capfd.readouterr()
        header, row = out.splitlines()
        assert header.split() == ["TIME", "NODE", "ROLE", "CONTAINER", "PEER", "STATE",
                                  "DOWNTIME", "ERROR"]
        assert row.split()[2:] == ["nodeB", "destination", "web", "nodeX", "done", "0.42", "s",
                                   "-"]


def test_a_limit_out_of_range_is_refused(pki: Path, tmp_path: Path,
                                         capfd: pytest.CaptureFixture[str]) -> None:
    with agents(pki, tmp_path) as cluster:
        with (api.AgentClient(cluster.inventory.nodes["nodeA"],
                              cluster.inventory.tls()) as client,
              pytest.raises(api.InvalidArgument, match="limit -1 is not from 0 to 1000")):
            client.history(-1)
        assert cluster.cli("history", "--limit", "0") == 2
        assert "'0' is not a number from 1 to 1000" in capfd.readouterr().err
