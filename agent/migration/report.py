"""Statistics of one migration: phase times, bytes by phase and origin, downtime."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from migctl.agent.delta import DeltaStats
from migctl.agent.metrics import Metrics
from migctl.proto import migctl_pb2 as pb

PROGRESS_EVERY = 0.5  # seconds between two progress events of one transfer, at least


class Meter:
    """Counts the bytes of one transfer as they arrive and emits a progress event at most
    every PROGRESS_EVERY seconds: the first after that long, so short transfers send none."""

    def __init__(self, emit: Callable[[pb.MigrationEvent], None], kind: str, item: str,
                 total: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.emit, self.clock = emit, clock
        self.progress = pb.Progress(kind=kind, item=item, bytes_total=total)
        self.last = clock()

    def __call__(self, n: int) -> None:
        self.progress.bytes_done += n
        now = self.clock()
        if now - self.last >= PROGRESS_EVERY:
            self.last = now
            self.emit(pb.MigrationEvent(progress=self.progress))


class Report:
    """Collects the report while emitting it as live events."""

    def __init__(self, migration_id: str, container: str, source: str, destination: str,
                 emit: Callable[[pb.MigrationEvent], None], mode: int = pb.COOPERATIVE,
                 metrics: Metrics | None = None) -> None:
        self.emit = emit
        self.metrics = metrics or Metrics()
        self.started = time.monotonic()
        self.freeze_at: float | None = None
        self.running_at: float | None = None
        self.msg = pb.MigrationReport(migration_id=migration_id, container=container,
                                      source_node=source, destination_node=destination,
                                      mode=mode)
        self.current: pb.PhaseReport | None = None

    @contextmanager
    def phase(self, phase: int) -> Iterator[pb.PhaseReport]:
        rep = self.msg.phases.add(phase=phase)
        self.current = rep
        self.emit(pb.MigrationEvent(phase_started=pb.PhaseReport(phase=phase)))
        start = time.monotonic()
        try:
            yield rep
        finally:
            rep.seconds = time.monotonic() - start
            self.emit(pb.MigrationEvent(phase_done=rep))

    def transfer(self, kind: str, item: str, origin: str, phase: int,
                 result: int | DeltaStats, seconds: float, method: str, reason: str = "") -> None:
        t = self.msg.transfers.add(kind=kind, item=item, origin=origin, phase=phase,
                                   seconds=seconds, method=method, reason=reason)
        if isinstance(result, DeltaStats):
            t.bytes = result.wire_bytes
            if self.current is not None:
                self.current.literal_bytes += result.literal_bytes
                self.current.matched_bytes += result.matched_bytes
        else:
            t.bytes = result
        if self.current is not None:
            self.current.bytes += t.bytes
        self.metrics.transferred(t)
        self.emit(pb.MigrationEvent(transfer=t))

    def meter(self, kind: str, item: str, total: int = 0) -> Meter:
        """What to call with the size of each chunk of a transfer, for live progress."""
        return Meter(self.emit, kind, item, total)

    def log(self, text: str) -> None:
        self.emit(pb.MigrationEvent(log=text))

    def freeze_started(self) -> None:
        self.freeze_at = time.monotonic()

    def running(self) -> None:
        self.running_at = time.monotonic()

    def done(self, container_id: str) -> pb.MigrationReport:
        self.msg.new_container_id = container_id
        self.finish()
        self.metrics.succeeded(self.msg)
        self.emit(pb.MigrationEvent(done=self.msg))
        return self.msg

    def finish(self) -> pb.MigrationReport:
        """The totals so far (by origin, total time, downtime once known): at the end, or
        for the journal of a migration that failed."""
        del self.msg.origins[:]
        origins: dict[str, pb.OriginReport] = {}
        for t in self.msg.transfers:
            if t.method in ("whole", "delta"):
                o = origins.setdefault(t.origin, pb.OriginReport(node=t.origin))
                o.bytes += t.bytes
                o.seconds += t.seconds
        self.msg.origins.extend(sorted(origins.values(), key=lambda o: -o.bytes))
        self.msg.total_seconds = time.monotonic() - self.started
        if self.freeze_at is not None and self.running_at is not None:
            self.msg.downtime_seconds = self.running_at - self.freeze_at
        return self.msg
