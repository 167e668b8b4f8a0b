"""The writable layer's archive: an overlay upper directory rebuilt exactly (whiteouts, opaque
directories, owners, modes, hard links, attributes), never following a link out of the layer,
and refused whole when a peer's archive holds what a layer never does."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from migctl.agent.dataplane.files import digest
from migctl.agent.dataplane.rootfs import (
    OPAQUE_XATTR,
    XATTR_KEY,
    restore_layer,
    snapshot_layer,
)
from migctl.common.errors import Refused


@pytest.fixture
def upper(tmp_path: Path) -> Path:
    """An upper directory as overlay leaves it (tests run as root, like the agent)."""
    u = tmp_path / "upper"
    (u / "etc").mkdir(parents=True)
    (u / "etc" / "motd").write_text("changed by the container\n")
    (u / "app.log").write_text("".join(f"{i}\n" for i in range(100)))
    (u / "bin").mkdir()
    (u / "bin" / "tool").write_bytes(b"\x7fELF...")
    os.chown(u / "bin" / "tool", 1234, 5678)
    os.chmod(u / "bin" / "tool", 0o4755)  # after chown, which clears setuid
    os.link(u / "bin" / "tool", u / "bin" / "tool2")
    os.symlink("/etc/motd", u / "motd-link")
    os.mknod(u / "etc" / "deleted-from-image", stat.S_IFCHR, os.makedev(0, 0))
    (u / "var").mkdir()
    os.setxattr(u / "var", OPAQUE_XATTR, b"y")
    (u / "var" / "new").write_text("only this in /var now\n")
    os.setxattr(u / "etc" / "motd", "user.origin", b"\x00\xffbinary")
    return u


def test_an_upper_directory_is_rebuilt_exactly(tmp_path: Path, upper: Path) -> None:
    snapshot_layer(upper, tmp_path / "one.tar")
    snapshot_layer(upper, tmp_path / "two.tar")
    assert digest(tmp_path / "one.tar") == digest(tmp_path / "two.tar")  # deltas match it
    new = tmp_path / "new"
    new.mkdir()
    restore_layer(tmp_path / "one.tar", new)
    assert (new / "etc" / "motd").read_text() == "changed by the container\n"
    assert (new / "app.log").read_text() == (upper / "app.log").read_text()
    tool = (new / "bin" / "tool").stat()
    assert stat.S_IMODE(tool.st_mode) == 0o4755 and (tool.st_uid, tool.st_gid) == (1234, 5678)
    assert tool.st_ino == (new / "bin" / "tool2").stat().st_ino
    assert os.readlink(new / "motd-link") == "/etc/motd"
    wh = os.lstat(new / "etc" / "deleted-from-image")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert os.getxattr(new / "var", OPAQUE_XATTR) == b"y"
    assert os.getxattr(new / "etc" / "motd", "user.origin") == b"\x00\xffbinary"
    assert not [p for p in new.rglob(".wh.*")]


def test_a_symlink_swapped_in_is_never_followed(tmp_path: Path, upper: Path) -> None:
    secret = tmp_path / "host-secret"
    secret.mkdir()
    (secret / "shadow").write_text("root:hash\n")
    os.symlink(secret, upper / "etc" / "looks-like-a-dir")
    snapshot_layer(upper, tmp_path / "layer.tar")
    with tarfile.open(tmp_path / "layer.tar") as tar:
        names = tar.getnames()
        link = tar.getmember("etc/looks-like-a-dir")
    assert link.issym() and not any("shadow" in n for n in names)


def _archive(path: Path, entries: list[tuple[str, bytes, dict[str, str]]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, pax in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.pax_headers = pax
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("entries,why", [
    ([("etc/.wh.passwd", b"not empty", {})], "whiteout marker"),
    ([("etc/.wh.", b"", {})], "whiteout marker"),
    ([("var/.wh..wh..opq", b"x", {})], "opaque"),
    ([("f", b"x", {XATTR_KEY + "trusted.overlay.redirect": "2f"})], "trusted.overlay"),
    ([("f", b"x", {XATTR_KEY + "user.a": "zz"})], "malformed"),
    ([("../escape", b"x", {})], "hostile entry"),
])
def test_a_peer_archive_that_no_layer_would_be_is_refused(tmp_path: Path, entries: list,
                                                          why: str) -> None:
    new = tmp_path / "new"
    new.mkdir()
    (new / "keep").write_text("untouched")
    with pytest.raises(Refused, match=why):
        restore_layer(_archive(tmp_path / "bad.tar", entries), new)
    assert [p.name for p in new.iterdir()] == ["keep"]
    assert not (tmp_path / "escape").exists()
