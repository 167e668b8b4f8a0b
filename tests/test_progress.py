"""Live progress of transfers: the destination's meters emit at most one event every
PROGRESS_EVERY seconds per transfer (a fake clock, no timing), the data plane counts every
byte it receives, and the CLI draws bars only on a terminal (without one, tests/
test_client_api.py shows progress events print nothing)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from migctl.agent.dataplane import final
from migctl.agent.dataplane.files import digest
from migctl.agent.migration.report import PROGRESS_EVERY, Meter
from migctl.client.cli import LiveProgress
from migctl.proto import migctl_pb2 as pb


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_meter_emits_at_most_every_half_second() -> None:
    clock, events = Clock(), []
    meter = Meter(events.append, "volume snapshot", "data", 1000, clock=clock)
    for _ in range(10):  # all within the first interval: nothing yet
        meter(10)
        clock.now += PROGRESS_EVERY / 20
    assert events == []
    clock.now += PROGRESS_EVERY / 2
    meter(10)
    assert [e.progress.bytes_done for e in events] == [110]
    meter(10)  # right after an event: held back
    assert len(events) == 1
    clock.now += PROGRESS_EVERY
    meter(5)
    assert [(e.progress.kind, e.progress.item, e.progress.bytes_done, e.progress.bytes_total)
            for e in events] == [("volume snapshot", "data", 110, 1000),
                                 ("volume snapshot", "data", 125, 1000)]


def test_the_final_pass_counts_each_file_s_bytes(tmp_path: Path) -> None:
    src = tmp_path / "pages.img"
    src.write_bytes(b"p" * 3000)
    chunks = list(final.serve([("checkpoints/final/pages.img", src)], {}))
    counted: dict[str, int] = {}

    def meter_of(item: pb.FinalItem) -> Callable[[int], None]:
        def count(n: int) -> None:
            counted[item.path] = counted.get(item.path, 0) + n
        return count

    [got] = final.receive(chunks, lambda item: tmp_path / "out" / item.path, lambda _: None,
                          meter_of)
    assert counted == {"checkpoints/final/pages.img": 3000} and got.result == 3000
    assert digest(tmp_path / "out" / "checkpoints/final/pages.img") == digest(src)


def test_a_terminal_shows_a_bar_until_its_transfer_is_reported() -> None:
    screen = io.StringIO()
    live = LiveProgress(Console(file=screen, force_terminal=True, width=120))
    with live:
        live(pb.MigrationEvent(progress=pb.Progress(kind="volume snapshot", item="data",
                                                    bytes_done=5_000_000,
                                                    bytes_total=20_000_000)))
        [task] = live.bars.tasks
        assert (task.description, task.completed, task.total) == (
            "volume snapshot data", 5_000_000, 20_000_000)
        live(pb.MigrationEvent(transfer=pb.TransferReport(
            kind="volume snapshot", item="data", origin="nodeA", bytes=20_000_000,
            seconds=2.0, method="whole")))
        assert live.bars.tasks == []
        live(pb.MigrationEvent(done=pb.MigrationReport()))  # prints nothing
    assert "volume snapshot data from nodeA: 20.00 MB in 2.00 s (whole)" in screen.getvalue()
    assert "None" not in screen.getvalue()
