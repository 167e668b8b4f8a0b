"""The agent's Prometheus metrics (agent.metrics): a migration's report goes through the same
hooks the flow calls, the endpoint is scraped over HTTP like Prometheus would, and the numbers
of that report are found in it. No lab."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from migctl.agent import certs
from migctl.agent.delta import DeltaStats
from migctl.agent.metrics import REASONS, Metrics, reason_of, serve
from migctl.agent.migration.report import Report
from migctl.agent.migration.state import State
from migctl.agent.server import main as agent_main
from migctl.agent.service import AgentService
from migctl.common import errors
from migctl.common.tls import TLSFiles
from migctl.proto import migctl_pb2 as pb

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(address: str) -> Samples:
    """Every sample the endpoint serves: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def metrics() -> Iterator[tuple[Metrics, str]]:
    m = Metrics()
    server = serve(m, "127.0.0.1:50051", 0)  # the host of --listen; any free port
    try:
        yield m, f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_report_is_found_in_the_scrape(metrics: tuple[Metrics, str]) -> None:
    m, address = metrics
    events: list[pb.MigrationEvent] = []
    report = Report("m1", "web", "nodeA", "nodeB", events.append, metrics=m)
    with report.phase(pb.PRE_COPY):
        report.transfer("layer", "sha256:ab", "nodeC", pb.PRE_COPY, 1000, 0.1, "whole")
        report.transfer("layer", "sha256:cd", "nodeB", pb.PRE_COPY, 0, 0.0, "skipped")
        report.transfer("volume snapshot", "data", "nodeA", pb.PRE_COPY,
                        DeltaStats(literal_bytes=400, matched_bytes=9000, wire_bytes=500,
                                   new_size=9400), 0.2, "delta")
    report.freeze_at = report.started + 1.0
    report.running_at = report.freeze_at + 0.75
    done = report.done("c0ffee")

    got = scrape(address)
    assert done.downtime_seconds == 0.75
    assert got[("migctl_downtime_seconds_sum", frozenset())] == 0.75
    assert got[("migctl_downtime_seconds_count", frozenset())] == 1
    assert got[("migctl_migration_seconds_sum", frozenset())] == done.total_seconds
    by_origin = {dict(labels)["origin"]: value for (name, labels), value in got.items()
                 if name == "migctl_received_bytes_total"}
    assert by_origin == {o.node: o.bytes for o in done.origins} == {"nodeC": 1000,
                                                                      "nodeA": 500}
    assert got[("migctl_received_bytes_total",
                frozenset({("origin", "nodeA"), ("kind", "volume_snapshot")}))] == 500
    assert got[("migctl_migrations_ended_total", frozenset({
        ("role", "destination"), ("outcome", "succeeded"), ("reason", "none"),
        ("phase", "restore")}))] == 1


def test_a_rollback_is_counted_by_reason_and_phase(metrics: tuple[Metrics, str]) -> None:
    m, address = metrics
    m.failed(errors.Unavailable("cannot reach the agent of nodeA at 10.0.0.1:50051"),
             pb.FINAL_SYNC, State.TRANSFERRING_FINAL.failure)
    m.failed(errors.FailedPrecondition("pre-flight check failed: no CRIU"), pb.REQUEST,
             State.PRE_COPY.failure)
    got = {dict(labels)["reason"]: (dict(labels)["outcome"], dict(labels)["phase"], value)
           for (name, labels), value in scrape(address).items()
           if name == "migctl_migrations_ended_total"}
    assert got == {"unreachable": ("rolled_back", "final_sync", 1),
                   "precondition": ("failed", "request", 1)}


@pytest.mark.parametrize("err", [
    errors.DeltaError("x"), errors.Refused("x"), errors.FailedPrecondition("x"),
    errors.PermissionDenied("x"), errors.AlreadyExists("x"), errors.InvalidArgument("x"),
    errors.NotFound("x"), errors.Unavailable("x"), errors.RuntimeFailure("x"),
    errors.MigctlError("x"), OSError(28, "No space left on device"), ValueError("x"),
    KeyboardInterrupt()])
def test_reasons_are_a_fixed_set_never_the_message(err: BaseException) -> None:
    assert reason_of(err) in REASONS
    assert reason_of(err) != str(err)


def test_reasons_follow_the_most_specific_class() -> None:
    assert [reason_of(e) for e in (errors.DeltaError("x"), errors.Refused("x"),
                                   errors.FailedPrecondition("x"), ValueError("x"))] == [
        "verification", "peer_refused", "precondition", "internal"]


def test_the_cache_size_and_evictions_of_an_agent(pki: Path, tmp_path: Path,
                                                  metrics: tuple[Metrics, str]) -> None:
    m, address = metrics
    tls = TLSFiles.from_dir(certs.node_dir(pki, "nodeB"), "nodeB")
    service = AgentService("nodeB", None, tmp_path / "state", tls, registry="",  # type: ignore
                           cache_bytes=1500, metrics=m)
    for key in ("rw:a", "rw:b"):
        item = tmp_path / key.replace(":", "-")
        item.write_bytes(b"x" * 1000)
        service.store.put(key, 1.0, item, "d")
    got = scrape(address)
    assert got[("migctl_cache_evictions_total", frozenset())] == 1
    assert got[("migctl_cache_size_bytes", frozenset())] == 1000 == service.store.size()


def test_a_metrics_port_that_is_no_port_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        agent_main(["--node", "nodeA", "--metrics-port", "70000"])
    assert "--metrics-port 70000 is not a port" in capsys.readouterr().err
