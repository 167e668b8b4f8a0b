"""Page-in, post-copy only: the container runs here while its memory pages arrive from the
source's lazy checkpoint; it is complete once the lazy-pages daemon has every page. A failure
kills the copy here (it would read zeros) and the paused source goes on (recovery.settle)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from migctl.agent.dataplane.pages import PageServer
from migctl.agent.migration.source import (
    FINAL_CHECKPOINT,
)
from migctl.agent.migration.state import State
from migctl.proto import migctl_pb2 as pb

if TYPE_CHECKING:
    from migctl.agent.migration.flow import Migration

log = logging.getLogger(__name__)


def run(m: Migration, pages: PageServer | None) -> None:
    if pages is None or not pages.lazy:
        return
    with m.report.phase(pb.PAGE_IN):
        receive(m, pages)


def receive(m: Migration, pages: PageServer) -> None:
    """Post-copy: the container runs; it is done once the daemon has every page."""
    m.step(State.PAGING_IN)
    got = pages.finish(m.deadline(pages.limit))
    done = pages.exited_at or time.monotonic()
    running = min(m.report.running_at or done, done)  # a small one may beat the mark
    m.report.msg.pages_seconds = done - running
    policy = m.entry.at_destination.restart_policy
    if policy:  # complete: it may be restarted now
        m.runtime.set_restart_policy(m.new_container, policy)
    rate = (f"; the link measured {m.link.throughput / 1e6:.0f} MB/s before the freeze"
            if m.link else "")
    m.report.transfer("checkpoint", f"{FINAL_CHECKPOINT}: memory pages",
                      m.source_name, pb.PAGE_IN, got, done - running, "whole",
                      f"post-copy: faulted in, the rest pushed{rate}")
