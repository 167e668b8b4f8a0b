"""Finishing or undoing a migration at the destination, from its journal entry alone.

The same code serves a migration that fails in flight and one found in the journal when the
agent restarts, so there is one way to undo, and it is exercised by every failure test.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import grpc

from agent.dataplane.channel import open_channel
from agent.errors import MigctlError
from agent.migration import journal as j
from agent.security import TLSFiles
from proto import migctl_pb2 as pb
from proto import migctl_pb2_grpc as rpc

log = logging.getLogger(__name__)


def settle(entry: j.Entry, runtime: object, journal: j.Journal, staging_root: Path,
           tls: TLSFiles, say: Callable[[str], None] = lambda _: None) -> bool:
    """Leave exactly one copy running. Returns False when the source could not be reached and
    the container runs nowhere yet: the caller tries again later."""
    new = entry.data.get("new_container", "")
    if entry.state == j.RESTORING and new and _running(runtime, new):
        # The restore went through (the agent stopped before it could say so): finish.
        _release(entry, tls, completed=True)
        entry.state = j.DONE
        journal.record(entry)
        shutil.rmtree(staging_root / entry.id, ignore_errors=True)
        say(f"{entry.container} runs here ({new[:12]}): migration completed")
        return True
    if new:
        with contextlib.suppress(MigctlError):
            runtime.remove(new)
    for name in entry.data.get("created_volumes", []):
        with contextlib.suppress(MigctlError):
            runtime.remove_volume(name)
    if entry.state in (j.REQUESTED, j.PRE_COPY):
        _release(entry, tls, completed=False)  # best effort: the source only drops its files
        entry.state = j.FAILED
    else:
        try:
            reply = _call(entry, tls, "Resume", pb.ResumeRequest(
                migration_id=entry.id, container=entry.container, checkpoint="final"))
        except grpc.RpcError as err:
            why = (f"cannot reach the source {entry.peer}"
                   if err.code() in (grpc.StatusCode.UNAVAILABLE,
                                     grpc.StatusCode.DEADLINE_EXCEEDED)
                   else f"the source {entry.peer} could not resume it")
            say(f"ROLLBACK PENDING: {why} ({err.details()}); retrying; the source also resumes "
                f"{entry.container[:12]} by itself when the lease runs out, unless it had "
                "committed")
            entry.data["rollback"] = f"pending: {err.details()}"
            journal.record(entry)
            return False
        say(f"rollback: {entry.container} runs again on {entry.peer} ({reply.detail})")
        entry.state = j.ROLLED_BACK
    journal.record(entry)
    shutil.rmtree(staging_root / entry.id, ignore_errors=True)
    return True


def _running(runtime: object, cid: str) -> bool:
    try:
        return bool(runtime.inspect(cid)["State"].get("Running"))
    except MigctlError:
        return False


def _call(entry: j.Entry, tls: TLSFiles, method: str, request: object) -> object:
    channel = open_channel(entry.peer_address, tls)
    try:
        return getattr(rpc.AgentStub(channel), method)(request, timeout=120)
    finally:
        channel.close()


def _release(entry: j.Entry, tls: TLSFiles, completed: bool) -> None:
    try:
        _call(entry, tls, "Release", pb.ReleaseRequest(
            migration_id=entry.id, completed=completed,
            remove_container=completed and entry.data.get("remove_source", False)))
    except grpc.RpcError as err:
        log.warning("migration %s: could not release the source: %s", entry.id, err.details())
