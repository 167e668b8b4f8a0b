"""The final pass archives only what changed since the first copy (a manifest of metadata),
applied in place; a changes archive from a peer never reaches outside the tree."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from migctl.agent.dataplane import archive, tree
from migctl.agent.dataplane.rootfs import apply_layer_changes, restore_layer, snapshot_layer
from migctl.common.errors import Refused


def listing(root: Path) -> dict[str, tuple]:
    """Every entry under ROOT: type, mode, content or link target (what a restore must keep)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                what = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                what = ("dir", stat.S_IMODE(st.st_mode))
            elif stat.S_ISCHR(st.st_mode):
                what = ("whiteout", st.st_rdev)
            else:
                what = ("file", stat.S_IMODE(st.st_mode), p.read_bytes())
            out[str(p.relative_to(root))] = what
    return out


def names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return [m.name + (" (deleted)" if tree.DELETED in m.pax_headers else "")
                for m in tar.getmembers()]


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    v = tmp_path / "volume"
    (v / "db").mkdir(parents=True)
    (v / "db" / "big").write_bytes(os.urandom(1 << 20))
    (v / "db" / "counter").write_text("1\n")
    (v / "old").mkdir()
    (v / "old" / "a").write_text("a")
    (v / "becomes-dir").write_text("file now")
    (v / "link").symlink_to("db/counter")
    (v / "gone").write_text("deleted later")
    return v


@pytest.fixture
def not_racy(monkeypatch):
    """Entries written by the test are seconds old for the manifest (no racy window)."""
    monkeypatch.setattr(tree, "RACY_NS", 0)


def change(v: Path) -> None:
    (v / "db" / "counter").write_text("2\n")
    (v / "db" / "new").write_text("new file")
    (v / "gone").unlink()
    (v / "old" / "a").unlink()
    (v / "old").rmdir()
    (v / "becomes-dir").unlink()
    (v / "becomes-dir").mkdir()
    (v / "becomes-dir" / "inside").write_text("x")
    (v / "link").unlink()
    (v / "link").symlink_to("db/new")


def test_only_what_changed_is_archived_and_applied_in_place(tmp_path: Path, volume: Path,
                                                            not_racy) -> None:
    first = archive.snapshot(volume, tmp_path / "pre.tar")
    dest = tmp_path / "dest"
    dest.mkdir()
    archive.restore(tmp_path / "pre.tar", dest)
    change(volume)
    archive.snapshot(volume, tmp_path / "final.tar", since=first)
    got = names(tmp_path / "final.tar")
    assert "db/big" not in got, "an unchanged file must not travel again"
    assert {"db/counter", "db/new", "gone (deleted)", "old (deleted)", "old/a (deleted)",
            "becomes-dir", "becomes-dir/inside", "link"} <= set(got), got
    assert (tmp_path / "final.tar").stat().st_size < 64 << 10
    archive.apply_changes(tmp_path / "final.tar", dest)
    assert listing(dest) == listing(volume)


def test_nothing_changed_archives_nothing(tmp_path: Path, volume: Path, not_racy) -> None:
    first = archive.snapshot(volume, tmp_path / "pre.tar")
    again = archive.snapshot(volume, tmp_path / "final.tar", since=first)
    assert names(tmp_path / "final.tar") == []
    assert again.entries == first.entries


def test_an_entry_written_in_the_walks_clock_tick_is_taken_again(tmp_path: Path,
                                                                 volume: Path) -> None:
    """Same size and a write in the same timestamp tick leave equal metadata: such recent
    entries are always archived again."""
    first = archive.snapshot(volume, tmp_path / "pre.tar")
    st = (volume / "db" / "counter").stat()
    (volume / "db" / "counter").write_text("9\n")
    os.utime(volume / "db" / "counter", ns=(st.st_atime_ns, st.st_mtime_ns))
    archive.snapshot(volume, tmp_path / "final.tar", since=first)
    assert "db/counter" in names(tmp_path / "final.tar")


def test_a_manifest_survives_a_restart(tmp_path: Path, volume: Path) -> None:
    first = archive.snapshot(volume, tmp_path / "pre.tar")
    first.save(tmp_path / "pre.manifest")
    assert tree.Manifest.load(tmp_path / "pre.manifest") == first


def test_a_layer_gets_whiteouts_in_place(tmp_path: Path, not_racy) -> None:
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "conf").write_text("v1")
    (upper / "etc" / "later-deleted").write_text("here")
    first = snapshot_layer(upper, tmp_path / "pre.tar")
    dest = tmp_path / "dest"
    dest.mkdir()
    restore_layer(tmp_path / "pre.tar", dest)
    (upper / "etc" / "later-deleted").unlink()  # overlay: a whiteout in place of the file
    os.mknod(upper / "etc" / "later-deleted", stat.S_IFCHR, os.makedev(0, 0))
    os.mknod(upper / "etc" / "image-file", stat.S_IFCHR, os.makedev(0, 0))
    (upper / "etc" / "conf").write_text("v2")
    snapshot_layer(upper, tmp_path / "final.tar", since=first)
    apply_layer_changes(tmp_path / "final.tar", dest)
    assert listing(dest) == listing(upper)


# -- what a hostile source would try -----------------------------------------------------------

FOLDER = b"<folder>"  # an entry's data: the entry is a folder


def hostile(path: Path, *entries: tuple[str, bytes | None, dict]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, pax in entries:
            info = tarfile.TarInfo(name)
            info.pax_headers.update(pax)
            if data == FOLDER:
                info.type, info.mode, data = tarfile.DIRTYPE, 0o755, b""
            info.size = len(data or b"")
            tar.addfile(info, io.BytesIO(data or b""))
    return path


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "dest"
    (d / "keep").mkdir(parents=True)
    (d / "keep" / "file").write_text("mine")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("host data")
    (tmp_path / "outside" / "sub").mkdir()
    (tmp_path / "outside" / "sub" / "more").write_text("host data")
    (d / "escape").symlink_to(tmp_path / "outside")  # the container planted this link
    return d


@pytest.mark.parametrize("entries", [
    [("escape/secret", b"overwritten", {})],
    [("escape/secret", None, {tree.DELETED: "1"})],
    [("escape", None, {}), ("escape/secret", b"x", {})],
    [("../outside/secret", None, {tree.DELETED: "1"})],
    [("../outside/new", b"x", {})],
    [("keep/file", b"a", {}), ("keep/file", b"b", {})],
    # the red team's: the link's name as a folder of the archive, and deletions below it
    [("escape", FOLDER, {}), ("escape/secret", None, {tree.DELETED: "1"})],
    [("escape", FOLDER, {}), ("escape/sub", None, {tree.DELETED: "1"})],
    [("escape/secret", None, {tree.DELETED: "1"}), ("escape", FOLDER, {})],
])
def test_a_changes_archive_never_leaves_the_tree(tmp_path: Path, dest: Path, entries) -> None:
    bad = hostile(tmp_path / "bad.tar", *entries)
    before = listing(tmp_path)
    with pytest.raises(Refused):
        archive.apply_changes(bad, dest)
    assert (tmp_path / "outside" / "secret").read_text() == "host data"
    assert (tmp_path / "outside" / "sub" / "more").read_text() == "host data"
    assert listing(tmp_path) == before, "a refused archive must touch nothing"


def test_a_link_replaced_by_a_folder_loses_only_the_link(tmp_path: Path, dest: Path) -> None:
    """What an honest source sends when a link became a folder: the folder and its files."""
    archive.apply_changes(hostile(tmp_path / "ok.tar", ("escape", FOLDER, {}),
                                  ("escape/new", b"x", {})), dest)
    assert (dest / "escape").is_dir() and not (dest / "escape").is_symlink()
    assert (dest / "escape" / "new").read_text() == "x"
    assert sorted(os.listdir(tmp_path / "outside")) == ["secret", "sub"]


def test_removal_never_follows_a_link_out_of_its_root(tmp_path: Path, dest: Path) -> None:
    with pytest.raises(Refused, match="outside"):
        archive.remove_entry(dest / "escape" / "sub", dest)
    assert (tmp_path / "outside" / "sub" / "more").exists()
    archive.remove_entry(dest / "escape", dest)  # the link itself is the tree's
    assert not (dest / "escape").exists() and (tmp_path / "outside").exists()


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_a_compressed_archive_is_refused_before_it_inflates(tmp_path: Path, dest: Path,
                                                            mode: str) -> None:
    """Size limits count what came over the wire: a 64 MiB file of zeros in a few KB."""
    bomb = tmp_path / "bomb.tar"
    with tarfile.open(bomb, mode) as tar:
        info = tarfile.TarInfo("zeros")
        info.size = 64 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    assert bomb.stat().st_size < 1 << 20
    for apply in (archive.restore, archive.apply_changes):
        with pytest.raises(Refused, match="not a plain tar"):
            apply(bomb, dest)
    assert not (dest / "zeros").exists()


def test_an_archive_announcing_more_than_it_holds_is_refused(tmp_path: Path, dest: Path) -> None:
    """A sparse entry is one way to announce a size whose bytes the archive never carries."""
    big = tmp_path / "sparse.tar"
    with tarfile.open(big, "w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("hole")
        info.type = tarfile.GNUTYPE_SPARSE
        info.size = 1 << 40
        tar.addfile(info)
    with pytest.raises(Refused):
        archive.restore(big, dest)
    assert not (dest / "hole").exists()


def test_a_changed_file_replaces_a_link_instead_of_writing_through_it(tmp_path: Path,
                                                                    dest: Path) -> None:
    archive.apply_changes(hostile(tmp_path / "ok.tar", ("escape", b"now a file", {})), dest)
    assert (dest / "escape").read_text() == "now a file"
    assert (tmp_path / "outside" / "secret").read_text() == "host data"


def test_a_layer_changes_archive_keeps_the_layer_rules(tmp_path: Path, dest: Path) -> None:
    bad = hostile(tmp_path / "bad.tar", ("etc/x", b"", {tree.XATTR_KEY + "trusted.overlay.opaque":
                                                        "79"}))
    with pytest.raises(Refused):
        apply_layer_changes(bad, dest)
