"""What a destination creates from a source's description (agent.runtime.spec): only the
allow-lists, and what gives power over the node only with the operator's --allow-privileged."""

from __future__ import annotations

import json

import pytest

from migctl.agent.runtime.spec import create_request, unsupported
from migctl.proto import migctl_pb2 as pb


def described(**host: object) -> pb.ContainerSpec:
    return pb.ContainerSpec(
        id="c" * 64, name="web", image="toytsm:1", image_id="sha256:" + "a" * 64,
        networks=["bridge"],
        engine_config_json=json.dumps({"Config": {"Image": "toytsm:1"},
                                       "HostConfig": {"NetworkMode": "bridge", **host}}))


@pytest.mark.parametrize("host,why", [
    ({"OomKillDisable": True}, "the OOM killer disabled"),
    ({"OomScoreAdj": -500}, "OOM score adjustment -500"),
    ({"Ulimits": [{"Name": "nofile", "Soft": 1 << 20, "Hard": 1 << 20}]},
     "resource limits (--ulimit) nofile=1048576:1048576"),
])
def test_oom_settings_and_resource_limits_need_the_operators_leave(host: dict, why: str) -> None:
    """Found by reading spec.py in the second red team: they were copied unasked."""
    spec = described(**host)
    problems = unsupported(spec)
    assert any(why in p and "--allow-privileged" in p for p in problems), problems
    assert unsupported(spec, allow_privileged=True) == []
    key = next(iter(host))
    assert key not in create_request(spec, allow_privileged=False)["HostConfig"]
    assert create_request(spec, allow_privileged=True)["HostConfig"][key] == host[key]


def test_a_container_killed_sooner_keeps_its_setting() -> None:
    spec = described(OomScoreAdj=300)
    assert unsupported(spec) == []
    assert create_request(spec, allow_privileged=False)["HostConfig"]["OomScoreAdj"] == 300


def test_a_network_named_by_its_id_is_refused() -> None:
    """The engine matches an id before any name: a network 'named' by the id of the
    destination's internal one would join it (found in review)."""
    spec = described()
    spec.networks[:] = ["0123456789abcdef0123"]
    assert any("looks like a network's id" in p for p in unsupported(spec)), unsupported(spec)
