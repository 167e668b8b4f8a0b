"""The freeze: how the final checkpoint's memory travels is chosen (a page server when the
link is fast, post-copy when asked, else deltas in the final pass), then the source takes its
final checkpoint and stops, held by this node's beats until the commit. From here a failure
rolls back: the source resumes the container (recovery.settle)."""

from __future__ import annotations

import itertools
import logging
import shutil
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

from migctl.agent.dataplane.pages import ACCEPT_S, PageServer
from migctl.agent.migration.policy import DELTA, PAGE_SERVER, POST_COPY, memory_transfer
from migctl.agent.migration.source import (
    FINAL_CHECKPOINT,
)
from migctl.agent.migration.state import State
from migctl.agent.runtime import netns
from migctl.agent.runtime.host import criu_path
from migctl.common.errors import FailedPrecondition
from migctl.proto import migctl_pb2 as pb

if TYPE_CHECKING:
    from migctl.agent.migration.flow import Migration

log = logging.getLogger(__name__)


PAGE_LIMIT_FACTOR = 4  # the final checkpoint's pages may be this many times the pre-copy's...
PAGE_LIMIT_SLACK = 256 << 20  # ...or this much more: beyond, a page server stops taking them


def run(m: Migration, spec: pb.ContainerSpec, pages: PageServer | None) -> pb.CheckpointReply:
    """The source's final checkpoint (the downtime starts): its files' list."""
    lazy = pages is not None and pages.lazy
    with m.enter(State.FROZEN):
        m.take_hold()
        m.report.freeze_started()
        m.frozen_at = time.time()
        final = m.source.call("Checkpoint", pb.CheckpointRequest(
            migration_id=m.migration_id, container=spec.id, name=FINAL_CHECKPOINT,
            leave_running=False, page_server=pages is not None and not lazy, lazy_pages=lazy,
            keep_connections=m.keep_connections))
        m.report.msg.checkpoint_method = final.method
        m.report.log(f"final checkpoint on {m.source_name}: {final.seconds:.2f} s "
                     f"({final.method})")
        probe_addresses(m, spec)
        if pages is not None and not lazy:
            m.report.transfer("checkpoint", f"{FINAL_CHECKPOINT}: memory pages", m.source_name,
                              pb.FREEZE, pages.finish(), final.seconds, "whole",
                              "through the page server")
    return final


ADDRESS_PROBE_S = 0.2
"""How long the segment is asked whether anything still answers for an address the container
takes here (two ARP probes): a LAN answers within milliseconds. It runs beside the final
sync, so it adds to the downtime only what the sync does not cover."""


def probe_addresses(m: Migration, spec: pb.ContainerSpec) -> None:
    """From the freeze on, the source's copy answers for none of its addresses (stopped, or
    cut off): whoever answers now holds one of them on the segment, and the destination
    must not take it (a source may describe a container with a neighbour's address). The
    answer is awaited before the commit (restore.addresses_free)."""
    probes = [(e.ipv4, m.segments[e.network].parent) for e in spec.endpoints
              if e.network in m.segments and m.segments[e.network].parent]
    if not probes:
        return
    future: Future[list[str]] = Future()

    def run() -> None:
        try:
            future.set_result([f"{ip} answers from {mac} on {parent}" for ip, parent in probes
                               if (mac := netns.probe(parent, ip, ADDRESS_PROBE_S))])
        except BaseException as err:  # noqa: BLE001 - raised where it is awaited
            future.set_exception(err)

    m.probing = future
    threading.Thread(target=run, name=f"probe-{m.migration_id}", daemon=True).start()


def no_post_copy(m: Migration) -> str:
    """Why post-copy cannot run between the source and this node; empty when it can."""
    there, here = m.source_info.no_post_copy, m.runtime.post_copy_problem()
    return (f"{m.source_name}: {there}" if there else
            f"{m.node}: {here}" if here else "")


def prepare(m: Migration, spec: pb.ContainerSpec) -> PageServer | None:
    """A page server for the final checkpoint's memory, fed through the source's page
    tunnel, when the link is fast enough (agent.migration.policy), or a lazy-pages daemon
    when post-copy was asked for (launched once the images are here); None: the pages go
    in the final pass as deltas."""
    if m.keep_connections and m.pre_checkpoint.method not in ("direct", ""):
        # known from the pre-copy checkpoint: the engine's path has the machine's options
        # (post-copy takes none, and its lazy checkpoint is the direct path's alone)
        raise FailedPrecondition(
            f"the TCP connections of container {spec.name!r} cannot be kept: {m.source_name} "
            "checkpoints it through its engine (it runs with plain runc, not migctl-runc; "
            "with connections 'close' it moves, and its clients reconnect)")
    criu = criu_path()
    asked = m.request.memory_transfer
    how, why = memory_transfer(m.link, m.pre_checkpoint.method, criu, asked,
                               no_post_copy(m) if asked == POST_COPY else "",
                               min_rate=m.links.page_server_min_rate,
                               last=m.links.chosen(m.source_address))
    if not asked and m.link is not None:
        m.links.choose(m.source_address, how)
    lazy = how == POST_COPY
    pre_pages = spec.memory_bytes if lazy else sum(
        f.size for f in m.pre_checkpoint.files if Path(f.path).name.startswith("pages-"))
    limit = max(PAGE_LIMIT_FACTOR * pre_pages, pre_pages + PAGE_LIMIT_SLACK)
    if how == PAGE_SERVER and shutil.disk_usage(m.area).free < limit:
        how, why = DELTA, f"the staging disk has less than {limit / 1e6:.0f} MB free"
    m.report.msg.memory_transfer = how
    m.report.log(f"final checkpoint's memory: {how} ({why})")
    if how == DELTA:
        return None
    assert criu is not None
    images = m.area / "checkpoints" / FINAL_CHECKPOINT
    # lazy: the restore finds the daemon's socket in its work folder (migctl-runc), one the
    # source's files never go to
    server = PageServer(criu, images, m.area / ("lazy-pages" if lazy else "page-server"),
                        limit, lazy=lazy)
    m.pages = server
    requests = itertools.chain(
        [pb.PageBytes(migration_id=m.migration_id, lazy=lazy)],
        (pb.PageBytes(data=data) for data in server.answers()))
    call = m.source.stub.PageTunnel(requests, timeout=ACCEPT_S + m.deadline(limit))
    server.cancel = call.cancel
    m.source.guarded(lambda: next(call))  # ready
    server.start(m.source.guarded_iter(r.data for r in call))
    return server
