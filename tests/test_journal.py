"""The journal's one transition table: every legal move works, every other is refused and
leaves the entry as it was."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from migctl.agent.migration import journal as j
from migctl.agent.migration.state import (
    DESTINATION,
    ENDED,
    PEER,
    SELF,
    SOURCE,
    TRANSITIONS,
    State,
    diagram,
)
from migctl.common.errors import AlreadyExists
from migctl.proto import migctl_pb2 as pb

STATES = list(State)  # every state, PAGING_IN included: none listed by hand
MOVES = list(itertools.product([SOURCE, DESTINATION], STATES, STATES, [SELF, PEER]))


def _entry(journal: j.Journal, role: str, state: str, n: int) -> str:
    mid = f"m{n}"
    journal.create(j.Entry(mid, role, "cid", state, peer="nodeB"))
    return mid


@pytest.mark.parametrize("role,state,to,by", MOVES)
def test_every_move_follows_the_table(tmp_path: Path, role: str, state: str, to: str,
                                      by: str) -> None:
    journal = j.Journal(tmp_path)
    mid = _entry(journal, role, state, 1)
    allowed = by in TRANSITIONS.get((role, state), {}).get(to, frozenset())
    if allowed:
        assert journal.move(mid, role, to, by).state == to
    else:
        with pytest.raises(j.IllegalTransition):
            journal.move(mid, role, to, by)
        assert journal.try_move(mid, role, to, by) is None
    assert j.Journal(tmp_path).get(mid, role).state == (to if allowed else state)


def test_ended_migrations_never_move_again(tmp_path: Path) -> None:
    journal = j.Journal(tmp_path)
    for n, (role, end) in enumerate(itertools.product([SOURCE, DESTINATION], ENDED)):
        mid = _entry(journal, role, end, n)
        for to, by in itertools.product(STATES, [SELF, PEER]):
            assert journal.try_move(mid, role, to, by) is None
        assert journal.get(mid, role).state == end


def test_a_finished_migration_cannot_be_resumed(tmp_path: Path) -> None:
    """The second-copy attack: Resume after the destination took over and released."""
    journal = j.Journal(tmp_path)
    mid = _entry(journal, SOURCE, State.AUTHORIZED, 1)
    for to, by in [(State.PRE_COPY, PEER), (State.FROZEN, PEER), (State.COMMITTED, PEER)]:
        journal.move(mid, SOURCE, to, by)
    assert journal.try_move(mid, SOURCE, State.RESUMING, SELF) is None  # lease: too late
    journal.move(mid, SOURCE, State.DONE, PEER)
    for by in (SELF, PEER):
        with pytest.raises(j.IllegalTransition, match="done"):
            journal.move(mid, SOURCE, State.RESUMING, by)


def test_the_peer_alone_cannot_end_a_frozen_migration_without_resuming(tmp_path: Path) -> None:
    journal = j.Journal(tmp_path)
    mid = _entry(journal, SOURCE, State.FROZEN, 1)
    for to in (State.DONE, State.FAILED, State.ROLLED_BACK, State.PRE_COPY, State.AUTHORIZED):
        assert journal.try_move(mid, SOURCE, to, PEER) is None


def test_ids_are_never_reused(tmp_path: Path) -> None:
    journal = j.Journal(tmp_path)
    _entry(journal, SOURCE, State.AUTHORIZED, 1)
    with pytest.raises(AlreadyExists):
        _entry(journal, SOURCE, State.AUTHORIZED, 1)
    journal.move("m1", SOURCE, State.FAILED, SELF)
    with pytest.raises(AlreadyExists):
        _entry(journal, SOURCE, State.AUTHORIZED, 1)
    assert journal.known("m1") and not journal.known("m2")


def test_save_never_writes_the_state(tmp_path: Path) -> None:
    journal = j.Journal(tmp_path)
    mid = _entry(journal, SOURCE, State.FROZEN, 1)
    entry = journal.get(mid, SOURCE)
    entry.state = State.DONE  # a stale or forged state in memory
    entry.at_source.resume = "x"
    journal.save(entry)
    again = journal.get(mid, SOURCE)
    assert again.state == State.FROZEN and again.at_source.resume == "x"


def test_each_role_journals_its_own_typed_data(tmp_path: Path) -> None:
    journal = j.Journal(tmp_path)
    journal.create(j.Entry("m1", DESTINATION, "cid", State.REQUESTED,
                           data=j.DestinationData(created_volumes=["v"])))
    moved = journal.move("m1", DESTINATION, State.PRE_COPY, data={"new_container": "n1"})
    assert moved.at_destination == j.DestinationData(new_container="n1", created_volumes=["v"])
    assert j.Journal(tmp_path).get("m1", DESTINATION).at_destination == moved.at_destination
    with pytest.raises(TypeError, match="journals no 'paused'"):  # a source's field
        journal.move("m1", DESTINATION, State.FROZEN, data={"paused": True})
    assert journal.get("m1", DESTINATION).state == State.PRE_COPY  # nothing was written
    with pytest.raises(TypeError, match="holds DestinationData"):
        j.Entry("m2", DESTINATION, "cid", State.REQUESTED, data=j.SourceData())
    # a journal written by another version: keys it does not know are left out
    journal._db.execute("UPDATE migrations SET data = ? WHERE id = 'm1'",
                        ('{"new_container": "n1", "retired": 1}',))
    assert journal.get("m1", DESTINATION).at_destination.new_container == "n1"


def test_each_state_fails_the_way_the_table_allows() -> None:
    """A failure from a state the source was frozen in is a rollback, else a plain failure:
    `State.failure` is what the table lets the destination move to from there."""
    for (role, state), moves in TRANSITIONS.items():
        if role == DESTINATION:
            assert state.failure in moves, state
            assert (State.FAILED in moves) != state.frozen, state


def test_the_new_container_may_have_run_exactly_from_restoring_on() -> None:
    reach, todo = set(), [State.RESTORING]
    while todo:
        s = todo.pop()
        reach.add(s)
        todo += [t for t in TRANSITIONS.get((DESTINATION, s), {})
                 if t not in reach and t != State.ROLLED_BACK]
    assert {s for s in State if s.may_have_started} == reach


def test_ended_states_have_no_moves_and_every_state_a_phase() -> None:
    assert {s for s in State if s.ended} == set(ENDED) == {State.DONE, State.ROLLED_BACK,
                                                          State.FAILED}
    for s in State:
        assert not (s.ended and any(k == s for _, k in TRANSITIONS)), s
        assert isinstance(s.phase, int), s
    assert State.PAGING_IN.phase == pb.PAGE_IN and State.FROZEN.phase == pb.FREEZE


def test_the_architecture_doc_shows_the_table_as_it_is() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "architecture.md").read_text()
    assert diagram() in doc, "docs/architecture.md is stale: python -m migctl.agent.migration.state"


def test_a_state_read_back_is_the_enum(tmp_path: Path) -> None:
    journal = j.Journal(tmp_path)
    _entry(journal, SOURCE, State.PAGING_IN, 1)
    got = j.Journal(tmp_path).get("m1", SOURCE)
    assert got.state is State.PAGING_IN and got.state == "paging-in"
