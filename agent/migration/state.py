"""A migration's states: the one list, the one table of moves between them, and what each state
means to the report, to a rollback and to a restarted agent. The journal
(agent/migration/journal.py) keeps them; nothing else spells a state or decides what it means.
"""

from __future__ import annotations

from enum import StrEnum

from migctl.proto import migctl_pb2 as pb

SOURCE, DESTINATION = "source", "destination"
SELF, PEER = "self", "peer"  # who moves an entry: this agent, or the node it is bound to


class State(StrEnum):
    """Destination states in order; the source uses AUTHORIZED, PRE_COPY, FROZEN, COMMITTED,
    RESUMING and the ends. The values are what the journal stores and `migctl` shows."""

    AUTHORIZED = "authorized"  # source only: an operator allowed this migration; not begun yet
    REQUESTED = "requested"
    PRE_COPY = "pre-copy"
    FROZEN = "frozen"
    TRANSFERRING_FINAL = "transferring-final"
    RESTORING = "restoring"
    PAGING_IN = "paging-in"  # destination, post-copy: it runs here; memory pages still arrive
    COMMITTED = "committed"  # source only: the destination owns the container from now on
    RESUMING = "resuming"  # source only: the container is being started again here
    DONE = "done"
    ROLLED_BACK = "rolled-back"
    FAILED = "failed"

    @property
    def phase(self) -> int:
        """The report's phase (pb.Phase) a migration is in while in this state."""
        return _PHASES[self]

    @property
    def ended(self) -> bool:
        return self in (State.DONE, State.ROLLED_BACK, State.FAILED)

    @property
    def frozen(self) -> bool:
        """The source's container was frozen: from here a failure ends in a rollback (the
        source resumes it), before here in a plain failure."""
        return self not in (State.AUTHORIZED, State.REQUESTED, State.PRE_COPY, State.FAILED)

    @property
    def may_have_started(self) -> bool:
        """Destination: the new container may have run (the flow starts it only after
        RESTORING is journaled); before, it exists at most created."""
        return self in (State.RESTORING, State.PAGING_IN, State.DONE)

    @property
    def failure(self) -> State:
        """How a migration that fails in this state ends."""
        return State.ROLLED_BACK if self.frozen else State.FAILED


_PHASES = {
    State.AUTHORIZED: pb.REQUEST, State.REQUESTED: pb.REQUEST, State.PRE_COPY: pb.PRE_COPY,
    State.FROZEN: pb.FREEZE, State.TRANSFERRING_FINAL: pb.FINAL_SYNC,
    State.RESTORING: pb.RESTORE, State.PAGING_IN: pb.PAGE_IN, State.COMMITTED: pb.RESTORE,
    State.RESUMING: pb.ROLLBACK, State.ROLLED_BACK: pb.ROLLBACK,
    State.DONE: pb.PHASE_UNSPECIFIED, State.FAILED: pb.PHASE_UNSPECIFIED,
}

_BOTH = frozenset({SELF, PEER})
_SELF = frozenset({SELF})
_PEER = frozenset({PEER})

S = State
# (role, from state) -> {to state: who may cause it}. Anything not listed is illegal.
TRANSITIONS: dict[tuple[str, State], dict[State, frozenset[str]]] = {
    (SOURCE, S.AUTHORIZED): {S.PRE_COPY: _PEER, S.FAILED: _BOTH},
    (SOURCE, S.PRE_COPY): {S.FROZEN: _PEER, S.FAILED: _BOTH},
    # A frozen container is resumed by the destination's rollback, or by this agent when the
    # destination falls silent (lease, liveness) or this agent restarts; never after COMMITTED
    # unless the destination, which owns it then, asks.
    (SOURCE, S.FROZEN): {S.COMMITTED: _PEER, S.RESUMING: _BOTH},
    (SOURCE, S.COMMITTED): {S.DONE: _PEER, S.RESUMING: _PEER},
    (SOURCE, S.RESUMING): {S.ROLLED_BACK: _SELF},
    (DESTINATION, S.REQUESTED): {S.PRE_COPY: _SELF, S.FAILED: _SELF},
    (DESTINATION, S.PRE_COPY): {S.FROZEN: _SELF, S.FAILED: _SELF},
    (DESTINATION, S.FROZEN): {S.TRANSFERRING_FINAL: _SELF, S.ROLLED_BACK: _SELF},
    (DESTINATION, S.TRANSFERRING_FINAL): {S.RESTORING: _SELF, S.ROLLED_BACK: _SELF},
    (DESTINATION, S.RESTORING): {S.PAGING_IN: _SELF, S.DONE: _SELF, S.ROLLED_BACK: _SELF},
    # Post-copy: until the last page arrived the copy here is incomplete; a failure removes it,
    # and the source (paused since the freeze) goes on from there.
    (DESTINATION, S.PAGING_IN): {S.DONE: _SELF, S.ROLLED_BACK: _SELF},
}
del S

ENDED = tuple(s for s in State if s.ended)


def legal(role: str, state: State, to: State, by: str) -> bool:
    return by in TRANSITIONS.get((role, state), {}).get(to, frozenset())


def diagram() -> str:
    """The table and each state's meaning, as docs/architecture.md shows them (a test keeps
    that copy current: `python -m migctl.agent.migration.state` prints it)."""
    out = []
    for role in (SOURCE, DESTINATION):
        out += [f"The {role}'s moves (who may cause each):", "", "```mermaid",
                "stateDiagram-v2"]
        for (r, state), moves in TRANSITIONS.items():
            if r == role:
                out += [f"    {state.name} --> {to.name}: {' or '.join(sorted(who))}"
                        for to, who in moves.items()]
        out += ["```", ""]
    out += ["| state | report phase | source frozen | ended |", "|---|---|---|---|"]
    out += [f"| `{s.value}` | {pb.Phase.Name(s.phase).lower().replace('_', '-')} | "
            f"{'yes' if s.frozen else 'no'} | {'yes' if s.ended else 'no'} |" for s in State]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(diagram(), end="")
