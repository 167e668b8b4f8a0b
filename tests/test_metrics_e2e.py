"""On the real lab: the destination's agent serves Prometheus metrics on its node's address at
the default port, and a migration's downtime and bytes by origin show up there; `migctl
history` finds it in both nodes' journals."""

from __future__ import annotations

import json

import pytest

from migctl.agent.metrics import DEFAULT_PORT
from migctl.lab.workloads import ensure_toy_image, remove_everywhere, run_toy
from tests.conftest import CACHE, DELTA, LabHandle, migctl, migrate_json
from tests.test_metrics import Samples, scrape
from tests.test_migrate_e2e import wait_for_count

pytestmark = pytest.mark.lab


def _received(samples: Samples) -> dict[str, float]:
    out: dict[str, float] = {}
    for (name, labels), value in samples.items():
        if name == "migctl_received_bytes_total":
            origin = dict(labels)["origin"]
            out[origin] = out.get(origin, 0.0) + value
    return out


def test_a_migration_shows_in_the_destination_metrics_and_history(lab: LabHandle) -> None:
    a = lab.docker["nodeA"]
    remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])
    ensure_toy_image(a, CACHE)
    run_toy(a)
    wait_for_count(a, "toytsm", 3)
    metrics_b = f"{lab.address('nodeB').rpartition(':')[0]}:{DEFAULT_PORT}"
    before = scrape(metrics_b)

    report = migrate_json(*DELTA, "--from", "nodeA", "--to", "nodeB", "toytsm")
    after = scrape(metrics_b)

    def grew(name: str) -> float:
        key = (name, frozenset())
        return after[key] - before.get(key, 0.0)

    assert grew("migctl_downtime_seconds_count") == 1
    assert grew("migctl_downtime_seconds_sum") == pytest.approx(report["downtime_seconds"])
    assert grew("migctl_migration_seconds_sum") == pytest.approx(report["total_seconds"])
    was, now = _received(before), _received(after)
    assert {o: now[o] - was.get(o, 0.0) for o in now if now[o] != was.get(o, 0.0)} == {
        o["node"]: o["bytes"] for o in report["origins"] if o["bytes"]}
    succeeded = ("migctl_migrations_ended_total", frozenset({
        ("role", "destination"), ("outcome", "succeeded"), ("reason", "none"),
        ("phase", "restore")}))
    assert after[succeeded] - before.get(succeeded, 0.0) == 1

    # the same migration in both journals: the destination's entry holds its report
    [dest] = [e for e in json.loads(migctl("history", "--json", "--node", "nodeB").stdout)
              if e["migration_id"] == report["migration_id"]]
    assert (dest["role"], dest["state"], dest["peer"]) == ("destination", "done", "nodeA")
    assert dest["report"]["downtime_seconds"] == report["downtime_seconds"]
    [src] = [e for e in json.loads(migctl("history", "--json", "--node", "nodeA").stdout)
             if e["migration_id"] == report["migration_id"]]
    assert (src["role"], src["state"], src["container"]) == ("source", "done", "toytsm")
    remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])
