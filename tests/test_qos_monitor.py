"""The example QoS service: its decision on fixed numbers, and a real move on the lab."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from examples.qos_monitor import Move, decide
from migctl.lab.workloads import ensure_toy_image, remove_everywhere, run_toy
from tests.conftest import CACHE, ROOT, LabHandle
from tests.test_migrate_e2e import wait_for_count


def c(name: str, state: str = "running", unsupported: tuple = ()) -> SimpleNamespace:
    return SimpleNamespace(name=name, state=state, unsupported=list(unsupported))


def test_the_most_loaded_node_sheds_a_movable_running_container() -> None:
    loads = {"nodeA": 0.95, "nodeB": 0.2, "nodeC": 0.5}
    containers = {"nodeA": [c("stopped", "exited"), c("pinned", unsupported=("bind mount",)),
                            c("web")]}
    assert decide(loads, containers, 0.8) == Move("web", "nodeA", "nodeB")
    assert decide(loads, containers, 0.99) is None, "no node over the threshold"
    assert decide(loads, {"nodeA": [c("pinned", unsupported=("tty",))]}, 0.8) is None


@pytest.mark.lab
def test_the_monitor_moves_a_container_on_the_lab(lab: LabHandle) -> None:
    a = lab.docker["nodeA"]
    remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])
    for name, client in lab.docker.items():
        if name != "nodeA":
            for other in client.containers.list(all=True):
                other.remove(force=True)  # the only candidate is the toy on nodeA
    ensure_toy_image(a, CACHE)
    run_toy(a)
    wait_for_count(a, "toytsm", 2)
    for name, client in lab.docker.items():
        if name != "nodeA":
            assert not client.containers.list(), name
    # every lab node shares the machine's load: a threshold of -1 makes the busiest shed
    res = subprocess.run([sys.executable, "examples/qos_monitor.py", "--threshold", "-1",
                          "--once"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "moving toytsm" in res.stdout and "runs on" in res.stdout, res.stdout
    moved_to = res.stdout.split("runs on ")[1].split()[0]
    assert lab.docker[moved_to].containers.get("toytsm").status == "running"
    assert a.containers.get("toytsm").status == "exited"
    remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])
