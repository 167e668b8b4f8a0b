"""The restore: the final checkpoint's images are checked, the source commits (from then on
only this node may ask it to resume), and the created container starts from the checkpoint.
Until it runs, a failure removes it here and resumes the source (recovery.settle)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import psutil

from migctl.agent.dataplane.pages import PageServer
from migctl.agent.migration.source import (
    FINAL_CHECKPOINT,
)
from migctl.agent.migration.state import State
from migctl.common.errors import Refused, RuntimeFailure, Unavailable
from migctl.proto import migctl_pb2 as pb

if TYPE_CHECKING:
    from migctl.agent.migration.flow import Migration

log = logging.getLogger(__name__)


def run(m: Migration, spec: pb.ContainerSpec, pages: PageServer | None) -> None:
    lazy = pages is not None and pages.lazy
    with m.report.phase(pb.RESTORE):
        m.runtime.ping()  # no commit while this node's engine cannot restore
        m.check_images()  # nor for images that would give the process more
        addresses_free(m)  # nor for an address another host answers for
        if lazy and pages is not None and pages.ended:
            # the tunnel ended: no page would come after the commit
            raise pages.error or Unavailable("the page tunnel ended before the commit")
        m.commit_point()  # a cancel is refused from here on
        m.source.call("Commit", pb.CommitRequest(migration_id=m.migration_id))
        m.release_hold()
        start(m, spec, pages if lazy else None)


def addresses_free(m: Migration) -> None:
    """What the segment answered to the probes of the container's addresses since the freeze
    (freeze.probe_addresses): an answer is another host's, and the container is not restored
    here (the source resumes it)."""
    if m.probing is None:
        return
    try:
        taken = m.probing.result(timeout=30)
    except OSError as err:
        raise RuntimeFailure(f"could not probe the container's addresses: {err}") from err
    if taken:
        raise Refused("another host on the segment holds an address the container would "
                      f"take here: {'; '.join(taken)}")


def start(m: Migration, spec: pb.ContainerSpec, pages: PageServer | None = None) -> None:
    """PAGES: post-copy; its lazy-pages daemon starts first (journaled as lazy: a restarted
    agent removes a copy whose pages may not all have arrived, then stops the daemon)."""
    cid = m.new_container
    m.step(State.RESTORING, lazy=pages is not None)
    m.report.msg.restore_method = m.runtime.method_for(cid)
    if pages is not None:
        start = time.monotonic()
        pages.launch()
        m.report.log(f"lazy-pages daemon ready in {time.monotonic() - start:.2f} s")
    m.runtime.start_from_checkpoint(
        cid, m.area / "checkpoints" / FINAL_CHECKPOINT, f"migctl-{m.migration_id}",
        lazy_in=pages.work if pages is not None else None,
        keep_connections=m.keep_connections)

    def running() -> None:
        m.report.running()
        if pages is not None:  # should the daemon fail, the process stops before it reads
            # zeros (set as soon as it runs, not after the restore's settle)
            pages.on_fail = kill_now(m.runtime.state(cid).pid)
            if pages.proc is not None and pages.proc.poll() not in (None, 0):
                pages.on_fail()

    m.runtime.wait_running(cid, on_running=running)


def kill_now(pid: int) -> Callable[[], None]:
    """A kill of the container's first process (and so its PID namespace) by pid: faster than
    any engine call; psutil checks that the pid is still that process."""
    try:
        proc = psutil.Process(pid) if pid > 0 else None
    except psutil.Error:
        proc = None

    def kill() -> None:
        with contextlib.suppress(psutil.Error):
            if proc is not None and proc.is_running():
                log.warning("the lazy-pages daemon ended before every page arrived: killing "
                            "the restored process %d", pid)
                proc.kill()
    return kill
