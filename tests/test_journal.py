"""The journal's one transition table: every legal move works, every other is refused and
leaves the entry as it was."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from agent.errors import AlreadyExists
from agent.migration import journal as j

STATES = [j.AUTHORIZED, j.REQUESTED, j.PRE_COPY, j.FROZEN, j.TRANSFERRING_FINAL, j.RESTORING,
          j.COMMITTED, j.RESUMING, *j.ENDED]
MOVES = list(itertools.product([j.SOURCE, j.DESTINATION], STATES, STATES, [j.SELF, j.PEER]))


def _entry(journal: j.Journal, role: str, state: str, n: int) -> str:
    mid = f"m{n}"
    journal.create(j.Entry(mid, role, "cid", state, peer="nodeB", data={"k": 1}))
    return mid


@pytest.mark.parametrize("role,state,to,by", MOVES)
def test_every_move_follows_the_table(tmp_path: Path, role: str, state: str, to: str,
                                      by: str) -> None:
    journal = j.Journal(tmp_path)
    mid = _entry(journal, role, state, 1)
    allowed = by in j.TRANSITIONS.get((role, state), {}).get(to, frozenset())
    if allowed:
        assert journal.move(mid, role, to, by).state == to
    else:
        with pytest.raises(j.IllegalTransition):
            journal.move(mid, role, to, by)
        assert journal.try_move(mid, role, to, by) is None
    assert j.Journal(tmp_path).get(mid, role).state == (to if allowed else state)


def test_ended_migrations_never_move_again(tmp_path: Path) -> None:
    journal = j.Journal(tmp_path)
    for n, (role, end) in enumerate(itertools.product([j.SOURCE, j.DESTINATION], j.ENDED)):
        mid = _entry(journal, role, end, n)
        for to, by in itertools.product(STATES, [j.SELF, j.PEER]):
            assert journal.try_move(mid, role, to, by) is None
        assert journal.get(mid, role).state == end


def test_a_finished_migration_cannot_be_resumed(tmp_path: Path) -> None:
    """The second-copy attack: Resume after the destination took over and released."""
    journal = j.Journal(tmp_path)
    mid = _entry(journal, j.SOURCE, j.AUTHORIZED, 1)
    for to, by in [(j.PRE_COPY, j.PEER), (j.FROZEN, j.PEER), (j.COMMITTED, j.PEER)]:
        journal.move(mid, j.SOURCE, to, by)
    assert journal.try_move(mid, j.SOURCE, j.RESUMING, j.SELF) is None  # lease: too late
    journal.move(mid, j.SOURCE, j.DONE, j.PEER)
    for by in (j.SELF, j.PEER):
        with pytest.raises(j.IllegalTransition, match="done"):
            journal.move(mid, j.SOURCE, j.RESUMING, by)


def test_the_peer_alone_cannot_end_a_frozen_migration_without_resuming(tmp_path: Path) -> None:
    journal = j.Journal(tmp_path)
    mid = _entry(journal, j.SOURCE, j.FROZEN, 1)
    for to in (j.DONE, j.FAILED, j.ROLLED_BACK, j.PRE_COPY, j.AUTHORIZED):
        assert journal.try_move(mid, j.SOURCE, to, j.PEER) is None


def test_ids_are_never_reused(tmp_path: Path) -> None:
    journal = j.Journal(tmp_path)
    _entry(journal, j.SOURCE, j.AUTHORIZED, 1)
    with pytest.raises(AlreadyExists):
        _entry(journal, j.SOURCE, j.AUTHORIZED, 1)
    journal.move("m1", j.SOURCE, j.FAILED, j.SELF)
    with pytest.raises(AlreadyExists):
        _entry(journal, j.SOURCE, j.AUTHORIZED, 1)
    assert journal.known("m1") and not journal.known("m2")


def test_save_never_writes_the_state(tmp_path: Path) -> None:
    journal = j.Journal(tmp_path)
    mid = _entry(journal, j.SOURCE, j.FROZEN, 1)
    entry = journal.get(mid, j.SOURCE)
    entry.state = j.DONE  # a stale or forged state in memory
    entry.data["x"] = 2
    journal.save(entry)
    again = journal.get(mid, j.SOURCE)
    assert again.state == j.FROZEN and again.data["x"] == 2
