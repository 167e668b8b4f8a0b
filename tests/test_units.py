"""Unit tests of the pieces that need no engine: paths, archives, layer ids, inventory, report."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from migctl.agent.dataplane import archive
from migctl.agent.dataplane.files import digest, write_stream
from migctl.agent.dataplane.staging import Staging
from migctl.agent.runtime.docker import chain_ids
from migctl.client.api import Inventory
from migctl.client.cli import report_dict
from migctl.common.errors import InvalidArgument, MigctlError, NotFound, Refused
from migctl.proto import migctl_pb2 as pb


def test_staging_refuses_paths_that_leave_it(tmp_path: Path) -> None:
    staging = Staging(tmp_path)
    with pytest.raises(NotFound):  # an area exists only for a migration that made one
        staging.resolve("m1", "volumes/a.tar")
    assert not (staging.root / "m1").exists()
    area = staging.create("m1")
    assert stat.S_IMODE(area.stat().st_mode) == 0o700
    assert stat.S_IMODE(staging.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700
    (tmp_path / "secret").write_text("x")
    os.symlink(tmp_path / "secret", area / "link")
    assert staging.resolve("m1", "volumes/a.tar") == (area / "volumes/a.tar").resolve()
    for bad in ("/etc/passwd", "../secret", "volumes/../../secret", "", "link"):
        with pytest.raises(InvalidArgument):
            staging.resolve("m1", bad)
    for bad_id in ("../x", "", "a/b", "x" * 80):
        with pytest.raises(InvalidArgument):
            staging.create(bad_id)


def test_volume_snapshots_are_deterministic_and_restore_exactly(tmp_path: Path) -> None:
    src = tmp_path / "vol"
    (src / "sub").mkdir(parents=True)
    (src / "b.txt").write_text("bee")
    (src / "sub" / "a.bin").write_bytes(os.urandom(10_000))
    os.symlink("b.txt", src / "link")
    archive.snapshot(src, tmp_path / "one.tar")
    archive.snapshot(src, tmp_path / "two.tar")
    assert digest(tmp_path / "one.tar") == digest(tmp_path / "two.tar")

    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "stale").write_text("must go")
    archive.restore(tmp_path / "one.tar", dest)
    assert sorted(p.name for p in dest.rglob("*")) == ["a.bin", "b.txt", "link", "sub"]
    assert (dest / "sub/a.bin").read_bytes() == (src / "sub/a.bin").read_bytes()
    assert os.readlink(dest / "link") == "b.txt"


@pytest.mark.parametrize("name", ["../escape", "/abs/escape", "device", "link/escape"])
def test_hostile_archive_entries_are_refused(tmp_path: Path, name: str) -> None:
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        if name == "device":
            ti = tarfile.TarInfo("null")
            ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
            tar.addfile(ti)
        else:
            if name.startswith("link/"):  # a symlink out of the volume, then a file through it
                ti = tarfile.TarInfo("link")
                ti.type, ti.linkname = tarfile.SYMTYPE, str(tmp_path / "inner")
                tar.addfile(ti)
            ti = tarfile.TarInfo(name)
            ti.size = 4
            tar.addfile(ti, io.BytesIO(b"evil"))
    dest = tmp_path / "inner" / "dest"
    dest.mkdir(parents=True)
    (dest / "keep").write_text("volume data")
    with pytest.raises(Refused, match="hostile"):
        archive.restore(bad, dest)
    assert (dest / "keep").read_text() == "volume data", "a refused archive must change nothing"
    assert not (tmp_path / "inner" / "escape").exists()
    assert not Path("/abs/escape").exists()


def test_write_stream_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "f"

    def broken():
        yield b"partial"
        raise RuntimeError("link lost")

    with pytest.raises(RuntimeError):
        write_stream(broken(), target)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    assert write_stream([b"ab", b"cd"], target) == 4 and target.read_bytes() == b"abcd"


def test_chain_ids_follow_the_engine() -> None:
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    expected = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    assert chain_ids([a, b]) == [a, expected]
    assert chain_ids([]) == []


def test_inventory_errors_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(MigctlError, match="no inventory at"):
        Inventory.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(MigctlError, match="not valid JSON"):
        Inventory.load(tmp_path / "bad.json")
    (tmp_path / "inv.json").write_text(json.dumps({"nodes": {"nodeA": {"address": "h:1"}}}))
    inv = Inventory.load(tmp_path / "inv.json")
    assert inv.node("nodeA").address == "h:1"
    with pytest.raises(MigctlError, match="unknown node 'nodeQ'.*knows: nodeA"):
        inv.node("nodeQ")


def test_json_report_has_numbers_for_bytes() -> None:
    r = pb.MigrationReport(container="c", total_seconds=1.5, downtime_seconds=0.5)
    r.phases.add(phase=pb.PRE_COPY, bytes=123456789012, seconds=1.0)
    r.transfers.add(kind="layer", item="sha256:x", bytes=7, method="whole")
    d = report_dict(r)
    assert d["phases"][0]["bytes"] == 123456789012
    assert d["phases"][0]["phase"] == "PRE_COPY"
    assert d["transfers"][0]["bytes"] == 7
    assert d["downtime_seconds"] == 0.5
