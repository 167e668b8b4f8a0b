"""A migration's phases at the destination, in the order the driver (flow.Migration._run) runs
them: request, pre_copy, freeze, final_sync, restore, page_in. Each module's `run` takes the
migration (its context) and does its phase: it journals the state it enters (State, the one
table of moves) and reports its phase.

Undoing is one function for every phase, recovery.settle, because it must also run from the
journal alone after a crash: it reads the state the migration reached and removes what was
made here, then releases the source (before the freeze) or has it resume (after)."""
