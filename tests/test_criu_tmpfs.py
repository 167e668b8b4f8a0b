"""The tmpfs archives of a checkpoint (CRIU unpacks them with GNU tar, as root, before the
container runs): read with limits, refused where they would reach past what the container may
hold, and written anew so that tar reads only what was checked."""

from __future__ import annotations

import gzip
import io
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from migctl.agent.runtime.criu import images_pb2 as img
from migctl.agent.runtime.criu import tmpfs
from migctl.agent.runtime.criu.images import ENGINE_DEFAULT, Confinement, check_images
from migctl.agent.runtime.criu.seccomp import FLAG_TSYNC
from migctl.common.errors import Refused
from tests import criu_kit as kit

DEV = f"tmpfs-dev-{kit.DEV_DEV}.tar.gz.img"


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **fields) -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def archive(*members: tuple, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=fmt) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def dev_tree() -> bytes:
    """The container's /dev as CRIU 4.2 dumps it (tar --create of runc's tmpfs)."""
    return archive(
        member("./", tarfile.DIRTYPE, mode=0o755),
        member("./stderr", tarfile.SYMTYPE, linkname="/proc/self/fd/2"),
        member("./fd", tarfile.SYMTYPE, linkname="/proc/self/fd"),
        member("./ptmx", tarfile.SYMTYPE, linkname="pts/ptmx"),
        member("./null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
        member("./urandom", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=9),
        member("./pts/", tarfile.DIRTYPE, mode=0o755),
        member("./shm/", tarfile.DIRTYPE, mode=0o1777),
        member("./shm/PostgreSQL.123", data=b"segment" * 100, mode=0o600, uid=999, gid=999,
               uname="postgres", gname="postgres"),
        member("./shm/again", tarfile.LNKTYPE, linkname="./shm/PostgreSQL.123"),
        member("./initctl", tarfile.FIFOTYPE, mode=0o600),
    )


def checkpoint(folder: Path, data: bytes, options: str = "", name: str = DEV) -> Path:
    """Images of one task whose /dev (a tmpfs with OPTIONS) holds the archive DATA."""
    core = kit.core_entry(set(ENGINE_DEFAULT), img.filter, 0, "sh", leader=True)
    (folder / "core-1.img").write_bytes(kit.core_image(core))
    (folder / "pstree.img").write_bytes(kit.pstree_image({1: [1]}))
    (folder / "ids-1.img").write_bytes(kit.ids_image())
    (folder / "seccomp.img").write_bytes(kit.seccomp_image((kit.deny(), FLAG_TSYNC)))
    mounts = kit.container_mounts()
    for m in mounts:
        if m.mountpoint == "/dev":
            m.options = options
    (folder / "mountpoints-12.img").write_bytes(kit.mounts_image(*mounts))
    (folder / name).write_bytes(data)
    return folder / name


def confined(caps: frozenset[str] = ENGINE_DEFAULT, devices=tmpfs.DEFAULT_DEVICES
             ) -> Confinement:
    return Confinement(caps, True, True, kit.MASKED, kit.READONLY, devices=devices)


def unpack(path: Path, into: Path) -> subprocess.CompletedProcess:
    """As CRIU's tmpfs_restore runs it."""
    into.mkdir()
    with path.open("rb") as f:
        return subprocess.run(["tar", "--extract", "--gzip", "--no-unquote", "--no-wildcards",
                               "--directory", str(into)], stdin=f, capture_output=True,
                              text=True, check=False)


def test_an_honest_dev_is_written_anew_and_unpacks_as_it_was(tmp_path: Path) -> None:
    (tmp_path / "ck").mkdir()
    path = checkpoint(tmp_path / "ck", dev_tree())
    check_images(tmp_path / "ck", confined(), host_root=kit.fake_host(tmp_path / "h"))
    with tarfile.open(path) as t:
        got = {m.name: m for m in t}
    assert got["shm/PostgreSQL.123"].uname == "" and got["shm/PostgreSQL.123"].uid == 999
    assert got["shm/again"].linkname == "shm/PostgreSQL.123"
    assert got["null"].ischr() and (got["null"].devmajor, got["null"].devminor) == (1, 3)
    res = unpack(path, tmp_path / "dev")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "dev/shm/PostgreSQL.123").read_bytes() == b"segment" * 100
    assert (tmp_path / "dev/shm/PostgreSQL.123").stat().st_uid == 999  # a number, not a name
    assert os.readlink(tmp_path / "dev/fd") == "/proc/self/fd"
    assert (tmp_path / "dev/shm/again").stat().st_ino == \
        (tmp_path / "dev/shm/PostgreSQL.123").stat().st_ino


@pytest.mark.parametrize("members,why", [
    ((member("../../etc/cron.d/x", data=b"* * * * * root sh"),), "not a plain path"),
    ((member("/etc/passwd", data=b"x"),), "not a plain path"),
    ((member("a/./b", data=b"x"),), "not a plain path"),
    ((member("esc", tarfile.SYMTYPE, linkname="/etc"), member("esc/passwd", data=b"x")),
     "which is not a folder"),
    ((member("f", data=b"x"), member("f/g", data=b"x")), "which is not a folder"),
    ((member("l", tarfile.LNKTYPE, linkname="/etc/shadow"),), "not a plain path"),
    ((member("l", tarfile.LNKTYPE, linkname="shadow"),), "not a file before it"),
    ((member("d", tarfile.DIRTYPE), member("d", tarfile.SYMTYPE, linkname="/")), "twice"),
    ((member("sda", tarfile.BLKTYPE, devmajor=8, devminor=0),), "device node 'sda' (b 8:0)"),
    ((member("mem", tarfile.CHRTYPE, devmajor=1, devminor=1),), "device node 'mem' (c 1:1)"),
    ((member("x", b"V"),), "tar type"),
])
def test_entries_that_reach_past_the_tmpfs_are_refused(tmp_path: Path, members, why) -> None:
    path = checkpoint(tmp_path, archive(*members))
    before = path.read_bytes()
    with pytest.raises(Refused, match=re.escape(why)):
        check_images(tmp_path, confined(), host_root=kit.fake_host(tmp_path / "h"))
    assert path.read_bytes() == before and not list(tmp_path.glob("*.checked"))


def test_device_nodes_follow_what_the_container_may_make(tmp_path: Path) -> None:
    sda = archive(member("sda", tarfile.BLKTYPE, devmajor=8, devminor=0))
    checkpoint(tmp_path, sda)
    # with CAP_MKNOD it may make any node itself (the device cgroup guards them): passes
    check_images(tmp_path, confined(devices=None), host_root=kit.fake_host(tmp_path / "h"))
    # a device the container was given (HostConfig.Devices, as it is on this node)
    os.mkfifo(tmp_path / "fifo")
    assert tmpfs.device_nodes([str(tmp_path / "fifo"), "/nonexistent"]) == frozenset()
    assert ("c", 1, 3) in tmpfs.device_nodes(["/dev/null"])
    given = Confinement.of({"HostConfig": {"CapDrop": ["MKNOD"],
                                           "Devices": [{"PathOnHost": "/dev/null"}]}}, True)
    assert given.devices == tmpfs.DEFAULT_DEVICES | {("c", 1, 3)}
    assert Confinement.of({"HostConfig": {}}, True).devices is None  # MKNOD by default


def test_a_small_archive_that_unpacks_past_the_mounts_size_is_refused(tmp_path: Path) -> None:
    """A decompression bomb: 8 MiB of zeros in a few KB, over a /dev of size=4m."""
    bomb = archive(member("zero", data=bytes(8 << 20)))
    assert len(bomb) < 64 << 10
    checkpoint(tmp_path, bomb, options="size=4m,mode=755")
    with pytest.raises(Refused, match="more than 4194304 bytes"):
        check_images(tmp_path, confined(), host_root=kit.fake_host(tmp_path / "h"))


def test_a_tmpfs_without_a_size_holds_at_most_the_named_limit(tmp_path: Path,
                                                             monkeypatch) -> None:
    monkeypatch.setattr(tmpfs, "MAX_TMPFS_BYTES", 1 << 20)
    checkpoint(tmp_path, archive(member("zero", data=bytes(2 << 20))))
    with pytest.raises(Refused, match="more than 1048576 bytes"):
        check_images(tmp_path, confined(), host_root=kit.fake_host(tmp_path / "h"))


def test_a_header_bomb_is_not_read_whole(tmp_path: Path, monkeypatch) -> None:
    """A GNU long-name header of 64 MiB: tarfile would read it into memory at once."""
    monkeypatch.setattr(tmpfs, "MAX_TMPFS_BYTES", 1 << 20)
    monkeypatch.setattr(tmpfs, "HEADER_ROOM", 1 << 20)
    header = tarfile.TarInfo("././@LongLink")
    header.type, header.size = tarfile.GNUTYPE_LONGNAME, 64 << 20
    raw = header.tobuf(tarfile.GNU_FORMAT) + bytes(64 << 20)
    checkpoint(tmp_path, gzip.compress(raw))
    with pytest.raises(Refused, match="unpacks to more than"):
        check_images(tmp_path, confined(), host_root=kit.fake_host(tmp_path / "h"))


def test_what_tar_is_not_given_is_dropped(tmp_path: Path) -> None:
    """Extended attributes (a file capability) and owner names (mapped through the host's
    /etc/passwd by tar) are not written anew."""
    path = checkpoint(tmp_path, archive(member(
        "tool", data=b"#!", mode=0o755, uname="root", gname="root",
        pax_headers={"SCHILY.xattr.security.capability": "\x01\x00\x00\x02" + "\xff" * 8}),
        fmt=tarfile.PAX_FORMAT))
    check_images(tmp_path, confined(), host_root=kit.fake_host(tmp_path / "h"))
    with tarfile.open(path) as t:
        (got,) = t.getmembers()
    assert got.pax_headers == {} and got.uname == "" and got.mode == 0o755


def test_a_mounts_own_archive_is_read_when_its_devices_is_absent(tmp_path: Path) -> None:
    dev_mount = [m for m in kit.container_mounts() if m.mountpoint == "/dev"][0]
    checkpoint(tmp_path, archive(member("../x", data=b"x")),
               name=f"tmpfs-{dev_mount.mnt_id}.tar.gz.img")
    with pytest.raises(Refused, match="not a plain path"):
        check_images(tmp_path, confined(), host_root=kit.fake_host(tmp_path / "h"))


def test_an_archive_that_is_not_one_is_refused(tmp_path: Path) -> None:
    checkpoint(tmp_path, b"\x1f\x8b" + os.urandom(64))
    with pytest.raises(Refused, match="not a tar archive that can be checked"):
        check_images(tmp_path, confined(), host_root=kit.fake_host(tmp_path / "h"))


def test_size_options_are_read_as_the_kernel_reads_them() -> None:
    assert tmpfs.size_option("mode=755,size=65536k") == 64 << 20
    assert tmpfs.size_option("size=1g") == 1 << 30
    assert tmpfs.size_option("size=4096") == 4096
    assert tmpfs.size_option("size=50%") is None and tmpfs.size_option("mode=1777") is None


def test_gnu_tar_keeps_links_inside_on_its_own(tmp_path: Path) -> None:
    """What docs/security.md says of GNU tar, which the check does not lean on: a member
    written through a link to outside, and hard links to outside, are not followed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "victim").write_text("secret")
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(archive(member("x", tarfile.SYMTYPE, linkname=str(outside)),
                            member("x/pwned", data=b"x"),
                            member("l", tarfile.LNKTYPE, linkname=str(tmp_path / "victim"))))
    res = unpack(bad, tmp_path / "d")
    assert res.returncode != 0
    assert list(outside.iterdir()) == [] and not (tmp_path / "d/l").exists()


def test_a_pre_copy_checkpoint_is_checked_but_left_as_the_source_sent_it(tmp_path: Path
                                                                       ) -> None:
    """The source makes the final checkpoint's delta against its own pre-copy files: the
    destination's copy must stay byte for byte what was sent."""
    path = checkpoint(tmp_path, dev_tree())
    before = path.read_bytes()
    check_images(tmp_path, confined(), host_root=kit.fake_host(tmp_path / "h"), restored=False)
    assert path.read_bytes() == before and not list(tmp_path.glob("*.checked"))
    checkpoint(tmp_path, archive(member("sda", tarfile.BLKTYPE, devmajor=8, devminor=0)))
    with pytest.raises(Refused, match="device node"):
        check_images(tmp_path, confined(), host_root=kit.fake_host(tmp_path / "h"),
                     restored=False)
