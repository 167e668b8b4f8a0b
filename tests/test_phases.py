"""The destination's phases, driven end to end in one process: two real agents (the service,
its role gate and mutual TLS) over fake engines (tests/fake_runtime.py), so that the flow's
pre-copy, freeze, final sync and restore, a failed restore and its undo, and a rollback after
the hold broke are tested without a lab. The lab's tests drive real engines and CRIU."""

from __future__ import annotations

from pathlib import Path

import pytest

from migctl.agent.migration import flow
from migctl.agent.migration.source import HOLD_SILENCE
from migctl.agent.migration.state import DESTINATION, SOURCE, State
from migctl.client import api
from migctl.proto import migctl_pb2 as pb
from tests.fake_runtime import FakeNode
from tests.inprocess import agents

MEMORY = {"count": 41, "note": "in memory only"}


@pytest.fixture
def cluster(pki: Path, tmp_path: Path):
    with agents(pki, tmp_path, runtime=lambda name: FakeNode(tmp_path / name / "engine")) as c:
        a: FakeNode = c.runtimes["nodeA"]
        a.run("toy", MEMORY, {"data.txt": b"volume bytes"}, {"written.txt": b"layer bytes"})
        yield c


def _states(cluster, role_node: tuple[str, str]) -> list[State]:
    node, role = role_node
    return [e.state for e in cluster.services[node].journal.history(10) if e.role == role]


def test_every_phase_runs_and_moves_memory_volume_and_layer(cluster) -> None:
    a, b = cluster.runtimes["nodeA"], cluster.runtimes["nodeB"]
    events: list[pb.MigrationEvent] = []
    report = api.migrate(cluster.inventory, "toy", "nodeA", "nodeB", on_event=events.append)
    moved = b.by_name("toy")
    assert moved.running and moved.memory == MEMORY
    assert (b.volume_path("data") / "data.txt").read_bytes() == b"volume bytes"
    assert (moved.upper / "written.txt").read_bytes() == b"layer bytes"
    assert not a.by_name("toy").running  # stopped at its final checkpoint, and released
    assert [p.phase for p in report.phases] == [pb.REQUEST, pb.PRE_COPY, pb.FREEZE,
                                                 pb.FINAL_SYNC, pb.RESTORE]
    assert a.calls == ["checkpoint pre", "checkpoint final"]
    assert b.calls == ["create toy", "restore toy"]
    assert _states(cluster, ("nodeB", DESTINATION)) == [State.DONE]
    assert _states(cluster, ("nodeA", SOURCE)) == [State.DONE]


def test_a_failed_restore_is_undone_here_and_the_source_resumes(cluster) -> None:
    a, b = cluster.runtimes["nodeA"], cluster.runtimes["nodeB"]
    b.fail_restore = "criu failed: type RESTORE errno 0"
    with pytest.raises(api.RuntimeFailure, match="criu failed"):
        api.migrate(cluster.inventory, "toy", "nodeA", "nodeB")
    # the undo: the created container and the volume made for it are gone here...
    assert b.gone("toy") and not b.volume_exists("data")
    assert b.calls == ["create toy", "restore toy", "remove toy", "remove volume data"]
    # ...and the source runs its copy again, from its final checkpoint: one copy, its memory
    back = a.by_name("toy")
    assert back.running and back.memory == MEMORY
    assert _states(cluster, ("nodeB", DESTINATION)) == [State.ROLLED_BACK]
    assert _states(cluster, ("nodeA", SOURCE)) == [State.ROLLED_BACK]


def test_a_hold_that_breaks_before_the_commit_rolls_back(cluster, monkeypatch) -> None:
    """The destination's beats stop after the first (HOLD_BEAT), and its engine stalls before
    the commit: the source, silent-held for longer than HOLD_SILENCE, resumes its copy; the
    commit is then refused (the migration ended there) and the destination removes its own."""
    a, b = cluster.runtimes["nodeA"], cluster.runtimes["nodeB"]
    monkeypatch.setattr(flow, "HOLD_BEAT", 60.0)
    b.stall_ping = HOLD_SILENCE + 3.0  # the source's own rule, with room for a slow machine
    with pytest.raises(api.FailedPrecondition, match=r"has ended \(rolled-back\)"):
        api.migrate(cluster.inventory, "toy", "nodeA", "nodeB")
    assert b.gone("toy") and "restore toy" not in b.calls
    assert a.by_name("toy").running and a.by_name("toy").memory == MEMORY
    assert _states(cluster, ("nodeB", DESTINATION)) == [State.ROLLED_BACK]
    assert _states(cluster, ("nodeA", SOURCE)) == [State.ROLLED_BACK]


def test_a_migration_is_journaled_only_when_opened(pki: Path, tmp_path: Path) -> None:
    """Constructing the context does nothing (a unit test may build one); `open` journals."""
    from migctl.agent import certs
    from migctl.agent.catalog.store import Store
    from migctl.agent.dataplane.staging import Staging
    from migctl.agent.migration import journal as j
    from migctl.agent.migration.policy import Links
    from migctl.common.tls import TLSFiles

    journal = j.Journal(tmp_path)
    m = flow.Migration("nodeB", FakeNode(tmp_path / "e"), Staging(tmp_path),  # type: ignore[arg-type]
                       pb.MigrateRequest(migration_id="0123456789abcdef", container="toy",
                                         source_node="nodeA"),
                       "127.0.0.1:1", lambda e: None, lambda c: False, journal, pb.NodeInfo,
                       TLSFiles.from_dir(certs.node_dir(pki, "nodeB"), "nodeB"),
                       Store(tmp_path / "s"), None, Links(lambda *a: None), lambda k: None)  # type: ignore[arg-type]
    assert journal.history(5) == [] and m.migration_id == "0123456789abcdef"
    m.open()
    assert [e.state for e in journal.history(5)] == [State.REQUESTED]
    m.source.close()


def test_the_fake_engine_implements_the_whole_runtime() -> None:
    """A method added to the runtime's protocol must be added to the fake the phases run on
    (with the same parameters), or these tests would stop testing what the agent calls."""
    import inspect

    from migctl.agent.runtime import base

    for concern in (base.Node, base.Containers, base.Checkpoints, base.Images, base.Volumes):
        for name, member in vars(concern).items():
            if name.startswith("_") or not callable(member):
                continue
            fake = getattr(FakeNode, name, None)
            assert fake is not None, f"FakeNode lacks {concern.__name__}.{name}"
            assert list(inspect.signature(fake).parameters) == \
                list(inspect.signature(member).parameters), name
