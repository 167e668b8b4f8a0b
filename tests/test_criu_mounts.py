"""The destination reads the mounts a checkpoint would rebuild and refuses more than the
container it created has: a hostile source's devtmpfs, host folders, writable /sys, or a
/proc without the engine's masks (a writable /proc/sysrq-trigger reboots the host)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from migctl.agent.runtime.criu import images_pb2 as img
from migctl.agent.runtime.criu.images import ENGINE_DEFAULT, Confinement, check_images
from migctl.agent.runtime.criu.mounts import check_mounts
from migctl.common.errors import Refused
from tests import criu_kit as kit


def mounts_at(point: str, mounts: list[img.mnt_entry]) -> img.mnt_entry:
    return next(m for m in mounts if m.mountpoint == point)


def check(tmp_path: Path, mounts: list[img.mnt_entry], host: Path | None = None) -> int:
    folder = tmp_path / "final"
    folder.mkdir(exist_ok=True)
    (folder / "mountpoints-12.img").write_bytes(kit.mounts_image(*mounts))
    return check_mounts(folder, kit.MASKED, kit.READONLY,
                        host or kit.fake_host(tmp_path / "host"))


def test_a_containers_own_mounts_pass(tmp_path: Path) -> None:
    assert check(tmp_path, kit.container_mounts()) == 27


def test_a_bind_of_the_root_filesystem_passes(tmp_path: Path) -> None:
    mounts = kit.container_mounts()
    mounts.append(img.mnt_entry(fstype=17, mnt_id=900, root_dev=kit.ROOT_DEV, parent_mnt_id=100,
                                root="/", mountpoint="/mnt", source="overlay", options="",
                                sb_flags=0))
    assert check(tmp_path, mounts) == 28


def new_mount(fstype: int, source: str, fsname: str = "", dev: int = 0x99,
              flags: int = 0) -> Callable[[list[img.mnt_entry]], None]:
    def change(mounts: list[img.mnt_entry]) -> None:
        mounts.append(img.mnt_entry(fstype=fstype, mnt_id=900, root_dev=dev, parent_mnt_id=100,
                                    root="/", mountpoint="/mnt", source=source, flags=flags,
                                    fsname=fsname or None, options="lowerdir=/etc",
                                    sb_flags=0))
    return change


def unmask(point: str) -> Callable[[list[img.mnt_entry]], None]:
    def change(mounts: list[img.mnt_entry]) -> None:
        mounts.remove(mounts_at(point, mounts))
    return change


def set_field(point: str, **fields) -> Callable[[list[img.mnt_entry]], None]:
    def change(mounts: list[img.mnt_entry]) -> None:
        m = mounts_at(point, mounts)
        for k, v in fields.items():
            setattr(m, k, v)
    return change


def twice(point: str) -> Callable[[list[img.mnt_entry]], None]:
    def change(mounts: list[img.mnt_entry]) -> None:
        extra = img.mnt_entry()
        extra.CopyFrom(mounts_at(point, mounts))
        extra.mnt_id = 901
        mounts.append(extra)
    return change


@pytest.mark.parametrize("change,why", [
    (new_mount(3, "devtmpfs"), r"'/mnt' is a devtmpfs mount from 'devtmpfs'"),
    (new_mount(16, "/dev/vda1", "ext4"), "auto mount of ext4 from '/dev/vda1'"),
    (new_mount(17, "overlay"), "overlay mount"),  # another device: options name host folders
    (new_mount(4, "binfmt_misc"), "binfmt_misc"),
    (new_mount(17, "elsewhere", dev=kit.ROOT_DEV), "overlay mount"),  # not the root's source
    (new_mount(2, "sysfs", dev=0x99), "writable sysfs"),
    (set_field("/sys", flags=0xE), "'/sys' is a writable sysfs"),
    (set_field("/sys/fs/cgroup", flags=0), "writable cgroup2"),
    # claims tmpfs, but shares sysfs's device: CRIU may bind it from /sys
    (new_mount(5, "sysfs", dev=kit.SYS_DEV), "writable sysfs"),
    (unmask("/proc/kcore"), "leaves /proc/kcore unmasked"),
    (set_field("/proc/kcore", fstype=1, root_dev=kit.PROC_DEV, root="/kcore", ext_key=""),
     "'/proc/kcore' is a proc"),
    # claims tmpfs, but shares proc's device: CRIU may bind it from /proc
    (set_field("/proc/keys", root_dev=kit.PROC_DEV, ext_key=""), "leaves /proc/keys unmasked"),
    # a mask must be runc's /dev/null: another external name is CRIU's or the source's
    (set_field("/proc/keys", ext_key="CRIU:EXTERNAL_DEV"), "names the external mount"),
    (set_field("/data", ext_key="/etc/shadow"), "names the external mount"),
    (unmask("/proc/sysrq-trigger"), "leaves /proc/sysrq-trigger writable"),
    (set_field("/proc/sys", flags=0xE), "'/proc/sys' is a proc"),
    (set_field("/proc/sys", mountpoint="/proc/sys/../sys"), "not a plain absolute path"),
    (set_field("/data", root="/var/lib/docker/x3/../../.."), "not a plain absolute path"),
    (twice("/proc"), "'/proc' is mounted twice"),
    # the red team's (tests/ names them r01-r08): a second proc has none of the first's masks
    (new_mount(1, "proc"), "'/mnt' is a proc"),
    (new_mount(1, "proc", dev=kit.PROC_DEV, flags=1), "'/mnt' is a proc"),
    (new_mount(2, "sysfs", flags=1), "'/mnt' is a sysfs"),
    (new_mount(23, "cgroup", flags=1), "is a cgroup filesystem"),
    # without superblock flags CRIU moves the read-only flag where a bind ignores it
    (lambda ms: [m.ClearField("sb_flags") for m in ms if m.mountpoint == "/proc/sys"],
     "'/proc/sys' carries no superblock flags"),
    # the root's device, type and source, other options: CRIU mounts a new overlay
    (new_mount(17, "overlay", dev=kit.ROOT_DEV), "overlay mount"),
    # a bind of a path in the source's root filesystem (or a volume) may be its symlink
    (lambda ms: ms.append(img.mnt_entry(fstype=17, mnt_id=900, root_dev=kit.ROOT_DEV,
                                        parent_mnt_id=100, root="/var/run", mountpoint="/mnt",
                                        source="overlay", options="", sb_flags=0)),
     "binds '/var/run' of the root filesystem"),
    (lambda ms: ms.append(img.mnt_entry(fstype=5, mnt_id=900, root_dev=kit.DISK_DEV,
                                        parent_mnt_id=100, root="/var/lib/docker/x3/esc",
                                        mountpoint="/mnt", source="tmpfs", sb_flags=0)),
     "is a bind of '/var/lib/docker/x3/esc'"),
    # two spellings of one path
    (set_field("/proc/sysrq-trigger", mountpoint="//proc/sysrq-trigger"), "not a plain"),
    (set_field("/proc/sys", mountpoint="/proc/sys/"), "not a plain"),
    (set_field("/proc", parent_mnt_id=5), "has 2 root mounts"),
])
def test_a_mount_the_container_was_not_given_is_refused(tmp_path: Path, change, why) -> None:
    mounts = kit.container_mounts()
    change(mounts)
    with pytest.raises(Refused, match=why):
        check(tmp_path, mounts)


def test_a_path_this_node_lacks_needs_no_mask(tmp_path: Path) -> None:
    """runc masks only what exists: /proc/timer_stats is gone from recent kernels."""
    mounts = kit.container_mounts()
    unmask("/proc/timer_stats")(mounts)
    host = kit.fake_host(tmp_path / "host", tuple(p for p in kit.MASKED + kit.READONLY
                                                  if p != "/proc/timer_stats"))
    assert check(tmp_path, mounts, host) == 26
    with pytest.raises(Refused, match="timer_stats unmasked"):
        check(tmp_path, mounts)


def test_a_checkpoint_without_mounts_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Refused, match="holds 0 mount namespaces"):
        check_mounts(tmp_path, kit.MASKED, kit.READONLY, tmp_path)


def test_a_container_that_mounts_what_it_likes_is_not_checked(tmp_path: Path) -> None:
    """With CAP_SYS_ADMIN (the operator's leave) it could mount a devtmpfs itself."""
    (tmp_path / "pstree.img").write_bytes(kit.pstree_image({1: [1]}))
    (tmp_path / "core-1.img").write_bytes(kit.core_image(kit.core_entry(
        ENGINE_DEFAULT, mode=None)))
    mounts = kit.container_mounts()
    new_mount(3, "devtmpfs")(mounts)
    (tmp_path / "mountpoints-12.img").write_bytes(kit.mounts_image(*mounts))
    allowed = Confinement(ENGINE_DEFAULT | {"SYS_ADMIN"}, False, True, kit.MASKED,
                          kit.READONLY)
    assert check_images(tmp_path, allowed) == 1
    with pytest.raises(Refused, match="devtmpfs"):
        check_images(tmp_path, Confinement(ENGINE_DEFAULT, False, True, kit.MASKED,
                                           kit.READONLY))


def test_a_second_mount_namespace_is_refused(tmp_path: Path) -> None:
    """CRIU binds --root only for the root task's namespace: another's root would be a new
    mount of whatever the image says."""
    check(tmp_path, kit.container_mounts())
    (tmp_path / "final" / "mountpoints-13.img").write_bytes(
        kit.mounts_image(*kit.container_mounts()))
    with pytest.raises(Refused, match="holds 2 mount namespaces"):
        check_mounts(tmp_path / "final", kit.MASKED, kit.READONLY,
                     kit.fake_host(tmp_path / "host"))
