"""Finishing or undoing a migration at the destination, from its journal entry alone.

The same code serves a migration that fails in flight and one found in the journal when the
agent restarts, so there is one way to undo, and it is exercised by every failure test.

The source is asked to resume only once this node's engine has confirmed that its copy is gone
(not found). An engine that does not answer is "could not ask", never "gone": the rollback then
waits and is retried, and the container stays down rather than running twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from migctl.agent.dataplane.pages import stop_lazy_pages
from migctl.agent.dataplane.staging import Staging
from migctl.agent.migration import journal as j
from migctl.agent.migration.source import FINAL_CHECKPOINT
from migctl.agent.migration.state import DESTINATION, State
from migctl.agent.runtime.base import Runtime
from migctl.common.channel import open_channel
from migctl.common.errors import MigctlError, NotFound, Unavailable
from migctl.common.peer import Peer
from migctl.common.tls import TLSFiles
from migctl.proto import migctl_pb2 as pb

log = logging.getLogger(__name__)

def settle(entry: j.Entry, runtime: Runtime, journal: j.Journal, staging: Staging,
           tls: TLSFiles, say: Callable[[str], None] = lambda _: None) -> bool:
    """Leave exactly one copy running. Returns False when the rollback must wait (this node's
    engine or the source could not be reached): the caller tries again later."""
    data = entry.at_destination
    # post-copy (lazy): running is not done until every page came
    new, lazy = data.new_container, data.lazy
    try:
        if entry.state == State.RESTORING and new and not lazy and _running(runtime, new):
            # The restore went through (the agent stopped before it could say so): finish.
            _release(entry, tls, completed=True)
            journal.move(entry.id, DESTINATION, State.DONE)
            staging.drop(entry.id)
            say(f"{entry.container} runs here ({new[:12]}): migration completed")
            return True
        if new:
            try:
                runtime.remove(new)
                if not runtime.gone(new):
                    raise MigctlError(f"the engine still lists container {new[:12]} after "
                                      "removing it")
            except MigctlError as err:
                if entry.state.may_have_started:
                    raise
                # Created in pre-copy and never started: no second copy can run from it, so
                # the source need not wait; it is removed once this node's engine answers.
                say(f"the container created here ({new[:12]}) was never started; it is "
                    f"removed once this node's engine answers ({err})")
                data.stray_container, data.new_container = new, ""
                journal.save(entry)
        if lazy:  # the copy is gone: its lazy-pages daemon may end now (never before)
            stop_lazy_pages(staging.root / entry.id / "checkpoints" / FINAL_CHECKPOINT)
        for name in data.created_volumes:
            try:
                runtime.remove_volume(name)
            except NotFound:
                pass
            except MigctlError as err:  # the container is gone: a stray volume is no copy
                log.warning("migration %s: volume %s stays: %s", entry.id, name, err)
        if data.created_volumes:
            # once: a retried rollback must not remove a volume of that name made since
            data.created_volumes = []
            journal.save(entry)
    except MigctlError as err:
        say(f"ROLLBACK PENDING: cannot confirm that this node's copy is gone ({err}); "
            "retrying before the source is asked to resume")
        _pending(entry, journal, str(err))
        return False
    if not entry.state.frozen:
        _release(entry, tls, completed=False)  # best effort: the source only drops its files
        journal.move(entry.id, DESTINATION, State.FAILED)
    else:
        try:
            reply = _call(entry, tls, "Resume", pb.ResumeRequest(
                migration_id=entry.id, container=entry.container, checkpoint="final"))
        except MigctlError as err:
            why = (f"cannot reach the source {entry.peer}" if isinstance(err, Unavailable)
                   else f"the source {entry.peer} could not resume it")
            say(f"ROLLBACK PENDING: {why} ({err}); retrying; the source also resumes "
                f"{entry.container[:12]} by itself when the lease runs out, unless it had "
                "committed")
            _pending(entry, journal, str(err))
            return False
        say(f"rollback: {entry.container} runs again on {entry.peer} ({reply.detail})")
        journal.move(entry.id, DESTINATION, State.ROLLED_BACK)
    staging.drop(entry.id)
    return True


def remove_strays(runtime: Runtime, journal: j.Journal) -> None:
    """Remove the never-started containers rollbacks had to leave behind."""
    for entry in journal.strays():
        cid = entry.at_destination.stray_container
        try:
            runtime.remove(cid)
            if not runtime.gone(cid):
                continue
        except MigctlError:
            continue  # the engine still does not answer: next round
        log.info("migration %s: removed the container %s its rollback left", entry.id,
                 cid[:12])
        entry.at_destination.stray_container = ""
        journal.save(entry)


def _pending(entry: j.Entry, journal: j.Journal, why: str) -> None:
    entry.at_destination.rollback = f"pending: {why}"
    journal.save(entry)


def _running(runtime: Runtime, cid: str) -> bool:
    """Whether CID runs; NotFound is "no"; an engine that does not answer raises."""
    try:
        return runtime.running(cid)
    except NotFound:
        return False


def _call(entry: j.Entry, tls: TLSFiles, method: str, request: object) -> Any:
    with Peer(entry.peer, entry.peer_address,
              lambda address, *name: open_channel(address, tls, *name)) as source:
        return source.call(method, request, timeout=120)


def _release(entry: j.Entry, tls: TLSFiles, completed: bool) -> None:
    try:
        _call(entry, tls, "Release", pb.ReleaseRequest(
            migration_id=entry.id, container=entry.container, completed=completed,
            remove_container=completed and entry.at_destination.remove_source))
    except MigctlError as err:
        log.warning("migration %s: could not release the source: %s", entry.id, err)
