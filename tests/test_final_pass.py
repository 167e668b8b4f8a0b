"""The final pass's one stream: files split back out, each verified, and a stream that breaks
the rules (data before a header, a file twice, a delta with no basis, a wrong size or digest,
more data than a file holds) refused before anything wrong is handed on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from migctl.agent.dataplane import final
from migctl.agent.delta import DeltaStats, make_signature
from migctl.common.errors import DeltaError, Refused
from migctl.proto import migctl_pb2 as pb


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    basis = os.urandom(256 << 10)
    changed = bytearray(basis)
    changed[4096:8192] = os.urandom(4096)
    (src / "pages").write_bytes(changed)
    (src / "small").write_bytes(b"x" * 1000)
    (tmp_path / "basis").write_bytes(basis)
    return {"checkpoints/final/pages-1.img": src / "pages",
            "volumes/v.changes.tar": src / "small"}


def run(tmp_path: Path, stream, bases: dict[str, Path]) -> list[final.Received]:
    out = tmp_path / "out"
    return list(final.receive(stream, lambda item: out / item.path, bases.get))


def test_every_file_arrives_verified_delta_or_whole(tmp_path: Path, files) -> None:
    offers = {"checkpoints/final/pages-1.img": make_signature(tmp_path / "basis")}
    stream = list(final.serve(files.items(), offers))
    got = run(tmp_path, stream, {"checkpoints/final/pages-1.img": tmp_path / "basis"})
    assert [(r.path, r.method) for r in got] == [("checkpoints/final/pages-1.img", "delta"),
                                                 ("volumes/v.changes.tar", "whole")]
    assert isinstance(got[0].result, DeltaStats)
    assert got[0].result.wire_bytes < 64 << 10, "an unchanged page must not travel"
    for rel, src in files.items():
        assert (tmp_path / "out" / rel).read_bytes() == src.read_bytes()


@pytest.mark.parametrize("delta_format", [1, 2])
def test_deltas_go_out_in_the_format_the_destination_reads(
    tmp_path: Path, files, delta_format: int
) -> None:
    offers = {"checkpoints/final/pages-1.img": make_signature(tmp_path / "basis")}
    stream = list(final.serve(files.items(), offers, delta_format=delta_format))
    first_data = next(c.data for c in stream if c.WhichOneof("part") == "data")
    assert first_data[:5] == b"MGDL" + bytes([delta_format])
    run(tmp_path, stream, {"checkpoints/final/pages-1.img": tmp_path / "basis"})
    for rel, src in files.items():
        assert (tmp_path / "out" / rel).read_bytes() == src.read_bytes()


def header(path: str, size: int, method: str = "whole", digest: str = "") -> pb.FinalChunk:
    return pb.FinalChunk(item=pb.FinalItem(path=path, size=size, method=method, digest=digest))


def test_data_before_a_header_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Refused, match="before naming"):
        run(tmp_path, [pb.FinalChunk(data=b"x")], {})


def test_a_file_sent_twice_is_refused(tmp_path: Path, files) -> None:
    once = list(final.serve([("volumes/v.changes.tar", files["volumes/v.changes.tar"])], {}))
    with pytest.raises(Refused, match="twice"):
        run(tmp_path, once + once, {})


def test_a_delta_against_no_offered_basis_is_refused(tmp_path: Path, files) -> None:
    offers = {"checkpoints/final/pages-1.img": make_signature(tmp_path / "basis")}
    stream = final.serve(files.items(), offers)
    with pytest.raises(Refused, match="no basis"):
        run(tmp_path, stream, {})


def test_more_data_than_announced_is_refused(tmp_path: Path, files) -> None:
    stream = list(final.serve([("volumes/v.changes.tar", files["volumes/v.changes.tar"])], {}))
    stream[0].item.size = 10
    with pytest.raises(DeltaError):
        run(tmp_path, stream, {})
    assert not (tmp_path / "out" / "volumes" / "v.changes.tar").exists()


def test_a_wrong_digest_is_refused(tmp_path: Path, files) -> None:
    stream = list(final.serve([("volumes/v.changes.tar", files["volumes/v.changes.tar"])], {}))
    stream[0].item.digest = "0" * 32
    with pytest.raises(DeltaError, match="digest"):
        run(tmp_path, stream, {})


def test_a_delta_running_on_past_its_end_is_refused(tmp_path: Path, files) -> None:
    offers = {"checkpoints/final/pages-1.img": make_signature(tmp_path / "basis")}
    stream = list(final.serve([("checkpoints/final/pages-1.img",
                                files["checkpoints/final/pages-1.img"])], offers))
    stream.append(pb.FinalChunk(data=b"trailing"))
    with pytest.raises((Refused, DeltaError)):
        run(tmp_path, stream, {"checkpoints/final/pages-1.img": tmp_path / "basis"})


def test_an_unknown_method_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Refused, match="unknown method"):
        run(tmp_path, [header("volumes/v.changes.tar", 1, "rsync"), pb.FinalChunk(data=b"x")],
            {})


def test_the_destination_names_where_a_file_goes(tmp_path: Path, files) -> None:
    """DEST_OF sees every header first: the flow refuses paths outside its templates there."""
    def dest_of(item: pb.FinalItem) -> Path:
        raise Refused(f"{item.path} is not one of ours")

    stream = final.serve([("volumes/v.changes.tar", files["volumes/v.changes.tar"])], {})
    with pytest.raises(Refused, match="not one of ours"):
        list(final.receive(stream, dest_of, lambda _: None))


@pytest.mark.parametrize("asked, written", [(0, 1), (1, 1), (2, 2), ((1 << 32) - 1, 2)])
def test_the_source_agent_writes_the_format_its_receiver_asked_for(
    tmp_path: Path, files, asked: int, written: int
) -> None:
    """Both of the agent's delta senders: a receiver that names no format (older than the
    field) gets format 1; one naming more than this agent knows gets the newest."""
    from types import SimpleNamespace

    from migctl.agent.service import AgentService

    pages = files["checkpoints/final/pages-1.img"]
    offers = {"checkpoints/final/pages-1.img": make_signature(tmp_path / "basis")}
    entry = SimpleNamespace(id="m1", container="c1")
    agent = SimpleNamespace(
        staged_file=lambda context, mid, rel: pages,
        bound=lambda context, mid: entry,
        runtime=SimpleNamespace(upper_dir=lambda container: None),
        source=SimpleNamespace(touch=lambda mid: None, offers=lambda mid: offers,
                               final_items=lambda entry, upper: list(files.items())[:1]))
    signature = [pb.DeltaRequest(signature=part)
                 for part in offers["checkpoints/final/pages-1.img"].to_chunks()]
    first = pb.DeltaRequest(target=pb.FileRef(migration_id="m1", path="p"), delta_format=asked)
    chunks = list(AgentService.FetchDelta.__wrapped__(agent, iter([first, *signature]), None))
    assert chunks[0].data[:5] == b"MGDL" + bytes([written])
    final_sync = AgentService.FinalSync.__wrapped__(
        agent, pb.FinalSyncRequest(migration_id="m1", delta_format=asked), None)
    data = next(c.data for c in final_sync if c.WhichOneof("part") == "data")
    assert data[:5] == b"MGDL" + bytes([written])
