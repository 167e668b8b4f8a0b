"""The destination's rollback asks the source to resume only once its own copy is confirmed
gone: an engine that does not answer is "could not ask", never "not running" (a second path
to two copies). The runtime is faked; the journal, staging and recovery code are real."""

from __future__ import annotations

from pathlib import Path

import pytest

from migctl.agent import certs
from migctl.agent.dataplane.staging import Staging
from migctl.agent.migration import journal as j
from migctl.agent.migration import recovery
from migctl.agent.migration.state import DESTINATION, State
from migctl.common.errors import NotFound, Unavailable
from migctl.common.tls import TLSFiles


class Engine:
    """A fake engine: containers by id, and a switch that makes it stop answering."""

    def __init__(self, running: set[str], answers: bool = True, removes: bool = True) -> None:
        self.containers = set(running)
        self.answers = answers
        self.removes = removes

    def _up(self) -> None:
        if not self.answers:
            raise Unavailable("the Docker engine did not answer")

    def inspect(self, cid: str) -> dict:
        self._up()
        if cid not in self.containers:
            raise NotFound(f"no container {cid}")
        return {"State": {"Running": True}}

    def running(self, cid: str) -> bool:
        return self.inspect(cid)["State"]["Running"]

    def remove(self, cid: str) -> None:
        self._up()
        if self.removes:
            self.containers.discard(cid)

    def gone(self, cid: str) -> bool:
        try:
            self.inspect(cid)
            return False
        except NotFound:
            return True

    def remove_volume(self, name: str) -> None:
        self._up()


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    certs.init(tmp_path / "tls", ["nodeB"], [])
    tls = TLSFiles.from_dir(certs.node_dir(tmp_path / "tls", "nodeB"), "nodeB")
    journal, staging = j.Journal(tmp_path / "state"), Staging(tmp_path / "state")
    asked: list[str] = []
    monkeypatch.setattr(recovery, "_call", lambda entry, tls, method, req: asked.append(method)
                        or type("Reply", (), {"detail": "resumed"})())

    def entry(state: str) -> j.Entry:
        e = j.Entry("m1", DESTINATION, "srcid", State.REQUESTED, peer="nodeA",
                    peer_address="10.0.0.1:1", data=j.DestinationData(new_container="new1"))
        journal.create(e)
        for s in [State.PRE_COPY, State.FROZEN, State.TRANSFERRING_FINAL, State.RESTORING]:
            if e.state == state:
                break
            e = journal.move("m1", DESTINATION, s)
        staging.create("m1")
        return e

    return journal, staging, tls, asked, entry


@pytest.mark.parametrize("state", [State.FROZEN, State.TRANSFERRING_FINAL])
@pytest.mark.parametrize("silent", [True, False], ids=["engine-silent", "remove-failed"])
def test_a_never_started_container_does_not_hold_the_source_back(setup, state: str,
                                                                 silent: bool) -> None:
    """Before RESTORING the new container was at most created (the flow starts it only after
    journaling RESTORING): the source resumes at once, and the container is removed once the
    engine answers."""
    journal, staging, tls, asked, entry = setup
    engine = Engine({"new1"}, answers=not silent, removes=False)
    e = entry(state)
    assert recovery.settle(e, engine, journal, staging, tls) is True
    assert asked == ["Resume"]
    after = journal.get("m1", DESTINATION)
    assert after.state == State.ROLLED_BACK and after.at_destination.stray_container == "new1"
    recovery.remove_strays(engine, journal)  # still silent (or still failing): kept
    assert journal.strays() and "new1" in engine.containers
    engine.answers, engine.removes = True, True
    recovery.remove_strays(engine, journal)
    assert not journal.strays() and "new1" not in engine.containers


@pytest.mark.parametrize("state", [State.RESTORING])
@pytest.mark.parametrize("engine", [Engine({"new1"}, answers=False),
                                    Engine({"new1"}, removes=False)],
                         ids=["engine-silent", "remove-failed"])
def test_no_resume_until_the_copy_here_is_gone(setup, state: str, engine: Engine) -> None:
    journal, staging, tls, asked, entry = setup
    e = entry(state)
    if state == State.RESTORING and engine.answers:
        engine.containers = {"new1"}  # it runs: the migration is completed, not undone
        assert recovery.settle(e, engine, journal, staging, tls) is True
        assert journal.get("m1", DESTINATION).state == State.DONE
        assert asked == ["Release"]
        return
    assert recovery.settle(e, engine, journal, staging, tls) is False
    assert asked == [], "the source was asked to resume while a copy may still exist here"
    after = journal.get("m1", DESTINATION)
    assert after.state == state and after.at_destination.rollback.startswith("pending")
    engine.answers, engine.removes = True, True  # the engine is back and removes work
    if state == State.RESTORING:
        engine.containers = set()  # it came back without the container (else: completed)
    assert recovery.settle(after, engine, journal, staging, tls) is True
    assert asked == ["Resume"]
    assert journal.get("m1", DESTINATION).state == State.ROLLED_BACK
