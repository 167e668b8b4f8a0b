"""DockerRuntime's own decisions, on a stand-in engine (the lab tests drive real ones)."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from migctl.agent.runtime import docker as docker_runtime
from migctl.agent.runtime.base import ContainerState
from migctl.agent.runtime.criu.sockets import Connection
from migctl.agent.runtime.docker import DockerRuntime
from migctl.common.errors import FailedPrecondition, RuntimeFailure

CID = "c" * 64


class _Engine(DockerRuntime):
    """Only inspect, as a restored container answers it."""

    def __init__(self, info: dict | None = None) -> None:  # noqa: D107 - no engine behind it
        self.info = info or {"Id": CID, "HostConfig": {}}
        self.direct = None  # the engine's own checkpoint path
        self.engine_tmp = Path("/nonexistent")
        self._collected: dict[str, float] = {}
        self._collected_lock = threading.Lock()
        self.collects = True
        self._uppers: dict[str, Path | None] = {}
        self._kept: dict = {}
        self.calls: list[str] = []
        self.api = SimpleNamespace(
            _url=lambda *a: "url", _raise_for_status=lambda res: None,
            _post_json=lambda url, data, **kw: self.calls.append(
                "checkpoint " + ("leave running" if not data["Exit"] else "stop")))

    def collect_garbage(self) -> bool:
        self.calls.append("collect")
        return self.collects

    def inspect(self, container: str) -> dict:
        return self.info


def test_a_container_seen_running_is_announced_before_its_downtime_ends(monkeypatch) -> None:
    order: list[str] = []
    monkeypatch.setattr(docker_runtime.netns, "announce",
                        lambda path, addresses: order.append(f"announce {path} {addresses}") or [])
    engine = _Engine({"Id": CID, "State": {"Running": True},
                      "HostConfig": {"NetworkMode": "bridge"},
                      "NetworkSettings": {"SandboxKey": "/var/run/docker/netns/abc",
                                          "Networks": {"bridge": {"IPAddress": "172.17.0.2"}}}})
    engine.wait_running(CID, on_running=lambda: order.append("running"), settle=0)
    # running first: post-copy arms its kill of a copy missing pages there
    assert order == ["running", "announce /var/run/docker/netns/abc {'172.17.0.2'}"]
    order.clear()
    engine.info["HostConfig"]["NetworkMode"] = "host"  # the host's network: not its to speak for
    engine.wait_running(CID, on_running=lambda: order.append("running"), settle=0)
    assert order == ["running"]


def test_kept_connections_are_nudged_once_it_runs_after_its_announcement(monkeypatch) -> None:
    """The restore read them from the checkpoint; the nudge follows the announcement (the
    segment knows where the address is before peers retransmit to it), once, and a failing
    one does not fail the restore."""
    order: list[str] = []
    kept = [Connection(("192.168.50.130", 6379), ("192.168.50.7", 40112), 5)]
    monkeypatch.setattr(docker_runtime, "connections", lambda images: kept)
    monkeypatch.setattr(docker_runtime.netns, "announce",
                        lambda path, addresses: order.append("announce") or [])
    monkeypatch.setattr(docker_runtime.netns, "nudge",
                        lambda path, conns: order.append(f"nudge {conns}") or ["x"])
    engine = _Engine({"Id": CID, "State": {"Running": True},
                      "HostConfig": {"NetworkMode": "lan"},
                      "NetworkSettings": {"SandboxKey": "/var/run/docker/netns/abc",
                                          "Networks": {"lan": {"IPAddress": "192.168.50.130"}}}})
    engine.direct = SimpleNamespace(start_from_checkpoint=lambda *a: order.append("restore"))
    monkeypatch.setattr(_Engine, "_direct_for", lambda self, info: True)
    engine.start_from_checkpoint(CID, Path("/nonexistent"), "final", keep_connections=True)
    engine.wait_running(CID, on_running=lambda: order.append("running"), settle=0)
    assert order == ["restore", "running", "announce", f"nudge {kept}"]
    order.clear()
    engine.wait_running(CID, on_running=lambda: order.append("running"), settle=0)
    assert order == ["running", "announce"]  # nudged once, not at every later start

    def broken(path: Path, conns: list) -> list[str]:
        raise OSError("no such namespace")

    monkeypatch.setattr(docker_runtime.netns, "nudge", broken)
    engine.start_from_checkpoint(CID, Path("/nonexistent"), "final", keep_connections=True)
    engine.wait_running(CID, settle=0)  # it runs: the nudge only saves time


def test_an_announcement_that_fails_does_not_fail_the_restore(monkeypatch) -> None:
    def broken(path: Path, addresses: set[str]) -> list[str]:
        raise OSError("no such namespace")

    monkeypatch.setattr(docker_runtime.netns, "announce", broken)
    engine = _Engine({"Id": CID, "State": {"Running": True},
                      "HostConfig": {"NetworkMode": "bridge"},
                      "NetworkSettings": {"SandboxKey": "/var/run/docker/netns/gone",
                                          "Networks": {"bridge": {"IPAddress": "172.17.0.2"}}}})
    seen: list[bool] = []
    engine.wait_running(CID, on_running=lambda: seen.append(True), settle=0)
    assert seen == [True]


def test_the_frozen_window_does_not_pay_the_collector_after_a_collected_pre_copy(tmp_path) -> None:
    """containerd must have collected a container's earlier checkpoint before the next one
    (or the final checkpoint fails after CRIU killed the process); pre-copy's checkpoint
    collects after itself, so the final one need not, in the frozen window: stopping it, or
    pausing it for a page server."""
    for leave_running in (False, True):
        engine = _Engine()
        engine.checkpoint(CID, "pre", tmp_path, leave_running=True, before_final=True)
        assert engine.calls == ["collect", "checkpoint leave running", "collect"]
        engine.calls.clear()
        engine.checkpoint(CID, "final", tmp_path, leave_running=leave_running)
        assert engine.calls == [f"checkpoint {'leave running' if leave_running else 'stop'}"]


def test_a_final_checkpoint_collects_unless_the_last_one_collected_after_itself(
        tmp_path, monkeypatch) -> None:
    engine = _Engine()
    engine.checkpoint(CID, "final", tmp_path, leave_running=False)
    engine.checkpoint(CID, "final", tmp_path, leave_running=False)  # after a rollback, again
    assert engine.calls == ["collect", "checkpoint stop", "collect", "checkpoint stop"]
    engine.calls.clear()
    engine.collects = False  # containerd did not answer: nothing was collected
    engine.checkpoint(CID, "pre", tmp_path, leave_running=True, before_final=True)
    engine.checkpoint(CID, "final", tmp_path, leave_running=False)
    assert engine.calls[-2:] == ["collect", "checkpoint stop"]
    engine.calls.clear()
    engine.collects = True
    engine.checkpoint(CID, "pre", tmp_path, leave_running=True, before_final=True)
    later = docker_runtime.time.monotonic() + docker_runtime.COLLECTED_FRESH_S
    monkeypatch.setattr(docker_runtime.time, "monotonic", lambda: later)
    engine.checkpoint(CID, "final", tmp_path, leave_running=False)  # an old mark: not trusted
    assert engine.calls[-2:] == ["collect", "checkpoint stop"]


def test_a_lazy_checkpoint_never_runs_the_collector_while_frozen(tmp_path) -> None:
    engine = _Engine()
    # a lazy checkpoint (the wrapper's path) serves its pages through the engine's call
    engine.engine_checkpoint(CID, "final", tmp_path, leave_running=True, serving=True)
    assert engine.calls == ["checkpoint leave running"]


def test_a_container_s_upper_directory_is_asked_of_the_engine_once() -> None:
    """The final pass needs it while the engine is busy with the container's exit."""
    asked: list[str] = []

    class Counting(_Engine):
        def inspect(self, container: str) -> dict:
            asked.append(container)
            return {"Id": CID, "GraphDriver": {"Name": "overlay2",
                                               "Data": {"UpperDir": "/var/lib/x/diff"}}}

    engine = Counting()
    assert engine.upper_dir(CID) == engine.upper_dir(CID) == Path("/var/lib/x/diff")
    assert asked == [CID]
    engine.upper_dir("bench-redis")  # a name: asked each time (it may name another later)
    engine.upper_dir("bench-redis")
    assert asked == [CID, "bench-redis", "bench-redis"]


def test_a_container_whose_process_is_gone_is_not_believed_running() -> None:
    """Right after a checkpoint that stopped it, the engine still says "running" for a moment:
    a rollback that believed it would leave the container stopped (no copy at all)."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    answers = iter([{"Running": True, "Pid": dead.pid}, {"Running": True, "Pid": dead.pid},
                    {"Running": False, "Pid": 0}])

    class Exiting(_Engine):
        def inspect(self, container: str) -> dict:
            return {"Id": CID, "State": next(answers)}

    assert Exiting().running(CID) is False
    alive = _Engine({"Id": CID, "State": {"Running": True, "Pid": os.getpid()}})
    assert alive.running(CID) is True


def test_a_restarting_container_is_not_running_and_a_gone_process_is_not_waited_forever(
        ) -> None:
    """Restarting: no process now. A process gone while the engine still says "running" past
    the settle time is neither answer: the caller retries (RuntimeFailure)."""
    restarting = _Engine({"Id": CID, "State": {"Running": True, "Restarting": True, "Pid": 0}})
    assert restarting.running(CID) is False
    stuck = _Engine({"Id": CID, "State": {"Running": True, "Pid": 0}})
    with pytest.raises(RuntimeFailure, match="process 0 is gone"):
        stuck.running(CID, settle=0.1)


def test_a_containers_state_is_read_from_the_engine_once_and_typed() -> None:
    engine = _Engine({"Id": CID, "Name": "/db", "State": {"Running": True, "Paused": True,
                                                          "Pid": 4242},
                      "Mounts": [{"Type": "volume", "Name": "data"},
                                 {"Type": "bind", "Source": "/etc/x"}]})
    assert engine.state("db") == ContainerState(CID, "db", True, True, 4242, ("data",))
    engine.api.containers = lambda **kw: [  # the engine's list, filtered by volume
        {"Id": "a" * 64, "Names": ["/web"], "State": "exited",
         "Mounts": [{"Type": "volume", "Name": "data"}]},
        {"Id": "b" * 64, "Names": ["/db"], "State": "running", "Mounts": []}]
    assert engine.volume_users("data") == [
        ContainerState("a" * 64, "web", volumes=("data",)),
        ContainerState("b" * 64, "db", running=True)]


def test_each_container_s_checkpoints_take_its_own_way(tmp_path, monkeypatch) -> None:
    """The wrapper's way for a container the engine runs through migctl-runc, the engine's
    for any other (created on plain runc before the wrapper was installed)."""
    from migctl.agent.runtime.direct import WrapperPath

    taken: list[str] = []
    monkeypatch.setattr(WrapperPath, "checkpoint", lambda self, engine, cid, *a, **k:
                        taken.append(f"direct {cid[:4]}") or tmp_path)
    wrapped = _Engine({"Id": CID, "HostConfig": {"Runtime": "migctl"}})
    wrapped.direct = WrapperPath("migctl")
    plain = _Engine({"Id": CID, "HostConfig": {"Runtime": "runc"}})
    plain.direct = WrapperPath("migctl")
    assert (wrapped.method, wrapped.method_for(CID), plain.method_for(CID)) == \
        ("direct", "direct", "engine")
    wrapped.checkpoint(CID, "final", tmp_path, leave_running=False)
    plain.checkpoint(CID, "final", tmp_path, leave_running=False)
    assert taken == ["direct cccc"] and plain.calls[-1] == "checkpoint stop"
    assert wrapped.calls == []  # the engine's checkpoint call was not made for it
    with pytest.raises(FailedPrecondition, match="cannot send its pages to a page server"):
        plain.checkpoint(CID, "final", tmp_path, leave_running=False, page_server="x:1")
