"""`migctl ps`: every node's containers and whether each can move, from the operator-only
ListContainers RPC; and the runtime's light listing behind it (no volume walked)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from migctl.agent.runtime.docker import DockerRuntime
from migctl.proto import migctl_pb2 as pb
from tests.inprocess import agents

WEB = "a" * 64
OLD = "b" * 64


def _inspected(cid: str, name: str, running: bool, host: dict[str, Any],
               mounts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"Id": cid, "Name": f"/{name}", "Image": "sha256:" + "c" * 64,
            "Config": {"Image": "toy:1", "Env": ["SECRET=x"]},
            "HostConfig": {"NetworkMode": "bridge", **host},
            "NetworkSettings": {"Networks": {"bridge": {}}},
            "State": {"Running": running, "Status": "running" if running else "exited"},
            "Mounts": mounts}


class FakeEngine:
    """The Engine API calls a listing may make; describing calls (stats, inspecting volumes or
    images, which walk or sample) fail the test."""

    def containers(self, all: bool = False) -> list[dict[str, Any]]:
        assert all
        return [{"Id": WEB}, {"Id": OLD}]

    def inspect_container(self, cid: str) -> dict[str, Any]:
        return {WEB: _inspected(WEB, "web", True, {}, [
            {"Type": "volume", "Name": "data", "Destination": "/data", "RW": True,
             "Source": "/nonexistent/data"}]),
                OLD: _inspected(OLD, "old", False, {"Binds": ["/etc:/host-etc"]}, [])}[cid]

    def volumes(self) -> dict[str, Any]:
        return {"Volumes": [{"Name": "data", "Driver": "local", "Labels": {}, "Options": {}}]}

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a listing must not call {name}")


def test_the_runtime_lists_without_describing() -> None:
    runtime = DockerRuntime.__new__(DockerRuntime)  # no engine to connect to
    runtime.api = FakeEngine()  # type: ignore[assignment]
    web, old = runtime.list_containers()
    assert (web.name, web.image, web.state, list(web.volumes), list(web.unsupported)) == (
        "web", "toy:1", "running", ["data"], [])
    assert (old.name, old.state) == ("old", "exited")
    assert old.unsupported[0] == "not running (migctl moves running containers)"
    assert any(w.startswith("bind mount /etc") for w in old.unsupported)
    assert "SECRET" not in str(web) + str(old)


def _summaries() -> dict[str, list[pb.ContainerSummary]]:
    return {"nodeA": [pb.ContainerSummary(id=WEB, name="web", image="toy:1", state="running",
                                          volumes=["data", "conf"])],
            "nodeB": [pb.ContainerSummary(id=OLD, name="old", image="busybox", state="exited",
                                          unsupported=["not running", "a terminal (-t)"])]}


def test_ps_lists_every_node(pki: Path, tmp_path: Path,
                             capfd: pytest.CaptureFixture[str]) -> None:
    with agents(pki, tmp_path) as cluster:
        for node, listed in _summaries().items():
            cluster.runtimes[node].containers = listed
        assert cluster.cli("ps") == 0
        out, err = capfd.readouterr()
        assert err == ""
        assert out.splitlines() == [
            "NODE   CONTAINER  IMAGE    STATE    VOLUMES    MOVABLE",
            "nodeA  web        toy:1    running  data,conf  yes",
            "nodeB  old        busybox  exited   -          no: not running; a terminal (-t)"]

        assert cluster.cli("ps", "--json", "--node", "nodeB") == 0
        out, err = capfd.readouterr()
        assert json.loads(out) == [{"node": "nodeB", "id": OLD, "name": "old",
                                    "image": "busybox", "state": "exited", "volumes": [],
                                    "unsupported": ["not running", "a terminal (-t)"],
                                    "movable": False}]


def test_ps_names_a_node_that_does_not_answer(pki: Path, tmp_path: Path,
                                              capfd: pytest.CaptureFixture[str]) -> None:
    with agents(pki, tmp_path) as cluster:
        cluster.runtimes["nodeA"].containers = _summaries()["nodeA"]
        inventory = json.loads(cluster.path.read_text())
        inventory["nodes"]["nodeB"]["address"] = "127.0.0.1:1"
        cluster.path.write_text(json.dumps(inventory))
        assert cluster.cli("ps", "--json") == 1
        out, err = capfd.readouterr()
        assert [c["name"] for c in json.loads(out)] == ["web"]
        assert err.startswith("migctl: error: nodeB: ")
        assert cluster.cli("ps", "--node", "nodeZ") == 1
        assert "unknown node 'nodeZ'" in capfd.readouterr().err
