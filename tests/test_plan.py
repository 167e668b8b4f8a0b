"""`migctl plan`: the dry run's arithmetic over a given link, the description it refuses, and
the command through real in-process agents (the source describes, the destination measures
and counts, and never sees the environment)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from migctl.agent.migration import plan
from migctl.agent.migration.policy import Link
from migctl.agent.runtime.docker import DockerRuntime, chain_ids
from migctl.common.errors import InvalidArgument
from migctl.proto import migctl_pb2 as pb
from tests.inprocess import agents

BASE, TOY = "sha256:" + "1" * 64, "sha256:" + "2" * 64


def _spec(**fields: object) -> pb.ContainerSpec:
    spec = pb.ContainerSpec(
        id="f" * 64, name="web", image="toy:1", image_id="sha256:" + "9" * 64,
        diff_ids=[BASE, TOY], layer_sizes=[4_000_000, 2_000_000], memory_bytes=500_000,
        volumes=[pb.VolumeSpec(name="data", destination="/data", size_bytes=1_000_000)],
        env=["PASSWORD=hunter2"], running=True)
    for name in fields:
        spec.ClearField(name)
    spec.MergeFrom(pb.ContainerSpec(**fields))  # type: ignore[arg-type]
    return spec


def test_the_source_reads_layer_sizes_from_the_engine_s_layer_store(tmp_path: Path) -> None:
    runtime = DockerRuntime.__new__(DockerRuntime)  # no engine to connect to
    runtime.api = SimpleNamespace(info=lambda: {"Driver": "overlay2"})  # type: ignore
    runtime._root_dir = tmp_path
    base_chain, _ = chain_ids([BASE, TOY])
    layer = tmp_path / "image" / "overlay2" / "layerdb" / "sha256" / base_chain[7:]
    layer.mkdir(parents=True)
    (layer / "size").write_text("4096")
    assert runtime.layer_sizes([BASE, TOY]) == [4096, 0]


def test_the_estimate_counts_what_is_missing_over_the_link() -> None:
    link = Link(rtt=0.01, throughput=1e6, load=0.5)  # 1 MB/s, each transfer stretched by 1.5
    reply = plan.estimate(_spec(), {TOY}, "nodeA", "nodeB", link)
    assert [(i.kind, i.item, i.origin, i.bytes) for i in reply.items] == [
        ("layer", BASE, "nodeB", 0), ("layer", TOY, "nodeA", 2_000_000),
        ("volume snapshot", "data", "nodeA", 1_000_000), ("checkpoint", "memory", "nodeA",
                                                          500_000)]
    assert [i.seconds for i in reply.items] == pytest.approx([0.0, 3.015, 1.515, 0.765])
    assert reply.bytes == 3_500_000
    assert reply.seconds == pytest.approx(3.015 + 1.515 + 0.765)
    assert reply.items[0].reason == "already on this node"


def test_a_layer_of_unknown_size_says_so() -> None:
    reply = plan.estimate(_spec(layer_sizes=[]), {BASE, TOY}, "nodeA", "nodeB",
                          Link(rtt=0.0, throughput=1e6, load=0.0))
    assert [(i.bytes, i.reason) for i in reply.items[:2]] == [
        (0, "size not known: counted as 0")] * 2


@pytest.mark.parametrize(("fields", "words"), [
    ({"diff_ids": ["sha256:../../etc"], "layer_sizes": [1]}, "invalid layer"),
    ({"layer_sizes": [1]}, "gives 1 layer sizes for 2 layers"),
    ({"memory_bytes": -1}, "size outside"),
    ({"volumes": [pb.VolumeSpec(name=f"v{i}") for i in range(300)]}, "at most 256"),
    ({"name": "../web"}, "invalid container name"),
])
def test_a_description_that_is_no_description_is_refused(fields: dict, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        plan.checked(_spec(**fields))


def test_migctl_plan(pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     capfd: pytest.CaptureFixture[str]) -> None:
    seen: list[pb.ContainerSpec] = []
    checked = plan.checked
    monkeypatch.setattr(plan, "checked", lambda spec: seen.append(spec) or checked(spec))
    with agents(pki, tmp_path) as cluster:
        cluster.runtimes["nodeA"].specs["web"] = _spec(unsupported=["a terminal (-t)"])
        cluster.runtimes["nodeB"].held = {BASE}
        assert cluster.cli("plan", "--json", "--from", "nodeA", "--to", "nodeB", "web") == 0
        out, _ = capfd.readouterr()
        got = json.loads(out)
        assert [(i["kind"], i["origin"], i["bytes"]) for i in got["items"]] == [
            ("layer", "nodeB", 0), ("layer", "nodeA", 2_000_000),
            ("volume snapshot", "nodeA", 1_000_000), ("checkpoint", "nodeA", 500_000)]
        assert got["bytes"] == 3_500_000 and got["seconds"] > 0
        assert got["link"].startswith("link ") and got["problems"] == ["a terminal (-t)"]
        [sent] = seen
        assert list(sent.env) == [] and sent.engine_config_json == ""

        assert cluster.cli("plan", "--from", "nodeA", "--to", "nodeB", "web") == 0
        lines = capfd.readouterr().out.splitlines()
        assert lines[0].startswith("plan: web nodeA -> nodeB over a link ")
        assert lines[1].split() == ["KIND", "ITEM", "FROM", "BYTES", "TIME", "WHY"]
        assert lines[3].split()[:5] == ["layer", TOY[:19], "nodeA", "2.00", "MB"]
        assert lines[-2].startswith("total 3.50 MB, about ")
        assert lines[-1] == "would be refused: a terminal (-t)"

        assert cluster.cli("plan", "--from", "nodeA", "--to", "nodeB", "nope") == 1
        assert "nodeA: no container named 'nope'" in capfd.readouterr().err
