"""The destination reads what a checkpoint's images would give the restored process, and
refuses more than its container has (second red team: a container described with no added
capabilities was restored with SYS_ADMIN, NET_ADMIN, SYS_PTRACE and no seccomp filter)."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from migctl.agent.runtime.criu import images_pb2 as img
from migctl.agent.runtime.criu.imagefile import (
    CGROUP_MAGIC,
    CORE_MAGIC,
    IMG_COMMON_MAGIC,
    SECCOMP_MAGIC,
)
from migctl.agent.runtime.criu.images import (
    CAPABILITIES,
    ENGINE_DEFAULT,
    Confinement,
    check_images,
    container_capabilities,
    seccomp_expected,
)
from migctl.agent.runtime.criu.seccomp import FLAG_TSYNC
from migctl.common.errors import Refused
from tests import criu_kit as kit


def image(path: Path, magic: int, *messages: bytes) -> Path:
    return kit.write(path, magic, *messages)


def pstree(folder: Path, tasks: dict[int, list[int]]) -> None:
    (folder / "pstree.img").write_bytes(kit.pstree_image(tasks))


def core(folder: Path, pid: int, caps: set[str], seccomp: int | None = img.filter,
         comm: str = "sh", thread: bool = False, filter_index: int = 0) -> Path:
    """A core image as CRIU writes it; pstree.img gains the task, or the thread in the last
    task. A folder's first core also gets seccomp.img: one filter as strict as the engine's
    profile, installed with TSYNC (as CRIU dumps Redis)."""
    tasks = TASKS.setdefault(folder, {})
    if thread:
        tasks[list(tasks)[-1]].append(pid)
    else:
        tasks[pid] = [pid]
    pstree(folder, tasks)
    if not (folder / "seccomp.img").exists():
        (folder / "seccomp.img").write_bytes(kit.seccomp_image((kit.deny(), FLAG_TSYNC)))
        (folder / "mountpoints-12.img").write_bytes(kit.mounts_image(*kit.container_mounts()))
    path = folder / f"core-{pid}.img"
    path.write_bytes(kit.core_image(kit.core_entry(caps, seccomp, filter_index, comm,
                                                   leader=not thread)))
    if not thread:
        (folder / f"ids-{pid}.img").write_bytes(kit.ids_image())
    return path


def confined(caps: frozenset[str] = ENGINE_DEFAULT, seccomp: bool = True,
             default_profile: bool = True) -> Confinement:
    return Confinement(caps, seccomp, default_profile, kit.MASKED, kit.READONLY)


TASKS: dict[Path, dict[int, list[int]]] = {}


def test_a_dump_within_its_containers_powers_passes(tmp_path: Path) -> None:
    core(tmp_path, 1, set(ENGINE_DEFAULT))
    core(tmp_path, 7, set())  # a process that dropped everything
    # a thread: CRIU 4.2 writes no seccomp mode for it; the restore gives it the leader's
    core(tmp_path, 8, set(ENGINE_DEFAULT), seccomp=None, comm="jemalloc_bg_thd", thread=True)
    assert check_images(tmp_path, confined()) == 3


def test_a_threads_capabilities_are_checked_too(tmp_path: Path) -> None:
    core(tmp_path, 1, set(ENGINE_DEFAULT))
    core(tmp_path, 8, set(ENGINE_DEFAULT) | {"SYS_ADMIN"}, seccomp=None, comm="worker",
         thread=True)
    with pytest.raises(Refused, match=r"core-8.img \(worker\) gives the process SYS_ADMIN"):
        check_images(tmp_path, confined())


@pytest.mark.parametrize("caps", [{"SYS_ADMIN"}, {"NET_ADMIN", "SYS_PTRACE"},
                                  {"CHECKPOINT_RESTORE"}])
def test_a_capability_the_container_lacks_is_refused_by_name(tmp_path: Path, caps) -> None:
    core(tmp_path, 1, set(ENGINE_DEFAULT))
    core(tmp_path, 9, set(ENGINE_DEFAULT) | caps, comm="victim")
    with pytest.raises(Refused, match="core-9.img \\(victim\\) gives the process " +
                       ", ".join(sorted(caps))):
        check_images(tmp_path, confined())


@pytest.mark.parametrize("mode", [img.disabled, None])
def test_a_process_without_the_seccomp_filter_is_refused(tmp_path: Path, mode) -> None:
    core(tmp_path, 1, set(ENGINE_DEFAULT), seccomp=mode)
    with pytest.raises(Refused, match="without the seccomp filter"):
        check_images(tmp_path, confined())
    assert check_images(tmp_path, confined(seccomp=False)) == 1  # unconfined here


@pytest.mark.parametrize("content,why", [
    (b"", "not the CRIU image"),
    (struct.pack("<II", 0x1234, CORE_MAGIC), "not the CRIU image"),
    (struct.pack("<III", IMG_COMMON_MAGIC, CORE_MAGIC, 1 << 30), "announces"),
    (struct.pack("<III", IMG_COMMON_MAGIC, CORE_MAGIC, 4) + b"\xff\xff\xff\xff", "read"),
    (struct.pack("<III", IMG_COMMON_MAGIC, CORE_MAGIC, 0), "no credentials"),
    (struct.pack("<II", IMG_COMMON_MAGIC, CORE_MAGIC), "no entry"),
])
def test_a_malformed_core_image_is_refused(tmp_path: Path, content: bytes, why: str) -> None:
    pstree(tmp_path, {1: [1]})
    (tmp_path / "core-1.img").write_bytes(content)
    with pytest.raises(Refused, match=why):
        check_images(tmp_path, confined(seccomp=False))


def test_a_checkpoint_without_its_tree_or_a_listed_core_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Refused, match="no process tree"):
        check_images(tmp_path, confined(seccomp=False))
    pstree(tmp_path, {1: [1, 2]})
    image(tmp_path / "core-1.img", CORE_MAGIC, img.core_entry(
        tc=img.task_core_entry(comm="sh"),
        thread_core=img.thread_core_entry(creds=img.creds_entry(uid=0))).SerializeToString())
    with pytest.raises(Refused, match="lists thread 2 but has no core-2.img"):
        check_images(tmp_path, confined(seccomp=False))


def test_a_stale_core_image_beside_the_tree_is_not_read(tmp_path: Path) -> None:
    """A pre-copy process gone by the final checkpoint (the toy's `sleep`) leaves its core
    image in the folder the final pass updates; CRIU never reads it, and neither do we."""
    core(tmp_path, 1, set(ENGINE_DEFAULT))
    (tmp_path / "core-20.img").write_bytes(b"whatever is left")
    assert check_images(tmp_path, confined()) == 1


def test_the_containers_powers_follow_its_host_config() -> None:
    assert container_capabilities({}) == ENGINE_DEFAULT
    assert container_capabilities({"CapAdd": ["CAP_NET_ADMIN"], "CapDrop": ["mknod"]}) == \
        (ENGINE_DEFAULT | {"NET_ADMIN"}) - {"MKNOD"}
    assert container_capabilities({"CapDrop": ["ALL"]}) == frozenset()
    # the engine's rule, not set arithmetic: ALL dropped keeps exactly what is added
    assert container_capabilities({"CapDrop": ["ALL"], "CapAdd": ["NET_BIND_SERVICE"]}) == \
        {"NET_BIND_SERVICE"}
    assert container_capabilities({"CapAdd": ["ALL"], "CapDrop": ["SYS_ADMIN"]}) == \
        frozenset(CAPABILITIES) - {"SYS_ADMIN"}
    assert container_capabilities({"Privileged": True}) == frozenset(CAPABILITIES)
    assert seccomp_expected({}, engine_has_seccomp=True)
    assert not seccomp_expected({}, engine_has_seccomp=False)
    assert not seccomp_expected({"SecurityOpt": ["seccomp:unconfined"]}, True)
    assert not seccomp_expected({"Privileged": True}, True)


def test_the_task_parts_old_seccomp_field_wins_as_in_criu(tmp_path: Path) -> None:
    """CRIU's restore takes tc.old_seccomp_mode over the thread's mode (check_core): a leader
    saying filter in one and disabled in the other is restored unfiltered (found in review)."""
    path = core(tmp_path, 1, set(ENGINE_DEFAULT))
    entry = img.core_entry()
    data = path.read_bytes()
    entry.ParseFromString(data[12:])
    entry.tc.old_seccomp_mode = img.disabled
    raw = entry.SerializeToString()
    path.write_bytes(struct.pack("<III", IMG_COMMON_MAGIC, CORE_MAGIC, len(raw)) + raw)
    with pytest.raises(Refused, match="without the seccomp filter"):
        check_images(tmp_path, confined())


def test_a_strict_mode_is_less_than_any_filter(tmp_path: Path) -> None:
    core(tmp_path, 1, set(ENGINE_DEFAULT), seccomp=img.strict)
    assert check_images(tmp_path, confined()) == 1


@pytest.mark.parametrize("own", [img.disabled, None])
def test_a_thread_without_a_filter_needs_its_leaders_tsync(tmp_path: Path, own) -> None:
    """CRIU restores a thread without a filter of its own unfiltered, unless its leader
    installs its filter with TSYNC, which reaches every thread (CRIU 4.2's Redis dump)."""
    core(tmp_path, 1, set(ENGINE_DEFAULT))
    core(tmp_path, 8, set(ENGINE_DEFAULT), seccomp=own, comm="worker", thread=True)
    assert check_images(tmp_path, confined()) == 2
    (tmp_path / "seccomp.img").write_bytes(kit.seccomp_image((kit.deny(), 0)))
    with pytest.raises(Refused, match=r"core-8.img \(worker\) runs the process without"):
        check_images(tmp_path, confined())


def test_a_threads_task_part_is_not_read(tmp_path: Path) -> None:
    """CRIU reads the task part (and its old seccomp fields) from the leader's core only: a
    thread's own says nothing about how it is restored."""
    (tmp_path / "seccomp.img").write_bytes(kit.seccomp_image((kit.deny(), 0)))
    core(tmp_path, 1, set(ENGINE_DEFAULT))
    entry = img.core_entry()
    entry.ParseFromString(kit.core_entry(set(ENGINE_DEFAULT), img.disabled, None, "worker",
                                         leader=False))
    entry.tc.old_seccomp_mode, entry.tc.old_seccomp_filter = img.filter, 0
    TASKS[tmp_path][1].append(8)
    pstree(tmp_path, TASKS[tmp_path])
    (tmp_path / "core-8.img").write_bytes(kit.core_image(entry.SerializeToString()))
    with pytest.raises(Refused, match=r"core-8.img \(worker\) runs the process without"):
        check_images(tmp_path, confined())


def test_a_leader_listed_after_its_threads_is_still_read_first(tmp_path: Path) -> None:
    core(tmp_path, 1, set(ENGINE_DEFAULT))
    core(tmp_path, 8, set(ENGINE_DEFAULT), seccomp=None, comm="worker", thread=True)
    pstree(tmp_path, {1: [8, 1]})
    assert check_images(tmp_path, confined()) == 2
    pstree(tmp_path, {1: [8]})
    with pytest.raises(Refused, match="without itself among its threads"):
        check_images(tmp_path, confined())


def zombie_core(folder: Path, pid: int, state: int) -> None:
    """core-PID.img as CRIU writes it for a zombie: the task part alone, its state dead."""
    entry = img.core_entry()
    entry.tc.task_state, entry.tc.comm = state, "sleep"
    (folder / f"core-{pid}.img").write_bytes(kit.core_image(entry.SerializeToString()))


def test_a_zombie_is_restored_dead_and_not_checked_as_a_process(tmp_path: Path) -> None:
    """CRIU lists a zombie (a child exiting as the dump froze it: a shell's `sleep`) without
    its thread's id, and writes no thread part for it: its restore runs nothing of it."""
    core(tmp_path, 1, set(ENGINE_DEFAULT))
    TASKS[tmp_path][40] = [0]
    pstree(tmp_path, TASKS[tmp_path])
    zombie_core(tmp_path, 40, 2)
    assert check_images(tmp_path, confined()) == 1


def test_only_a_dead_state_excuses_a_task_from_its_checks(tmp_path: Path) -> None:
    """A task listed as a zombie but alive in its core is restored alive: refused."""
    core(tmp_path, 1, set(ENGINE_DEFAULT))
    TASKS[tmp_path][40] = [0]
    pstree(tmp_path, TASKS[tmp_path])
    zombie_core(tmp_path, 40, 1)  # TASK_ALIVE
    with pytest.raises(Refused, match="lists task 40 without itself among its threads"):
        check_images(tmp_path, confined())


@pytest.mark.parametrize("chain,why", [
    ([(kit.allow_all(), FLAG_TSYNC)], "let kexec_load through"),
    ([(kit.deny(), 0), (kit.allow_all(), FLAG_TSYNC)], None),  # the strictest answer wins
    ([(kit.allow_all(), 0), (kit.allow_all(), FLAG_TSYNC)], "let kexec_load through"),
    ([(kit.deny(), FLAG_TSYNC | 8)], "flags 0x9"),
    ([(b"", FLAG_TSYNC)], "not a BPF program"),
])
def test_a_filter_weaker_than_the_engines_is_refused(tmp_path: Path, chain, why) -> None:
    core(tmp_path, 1, set(ENGINE_DEFAULT), filter_index=len(chain) - 1)
    (tmp_path / "seccomp.img").write_bytes(kit.seccomp_image(*chain))
    if why is None:
        assert check_images(tmp_path, confined()) == 1
        return
    with pytest.raises(Refused, match=why):
        check_images(tmp_path, confined())
    # a profile the operator chose (allowed as privileged) is not the engine's: not read
    if "flags" not in why and "BPF" not in why:
        assert check_images(tmp_path, confined(default_profile=False)) == 1


@pytest.mark.parametrize("index,prevs,why", [
    (3, [None], "names seccomp filter 3 of 1"),
    (0, [0], "loops"),
    (1, [1, 0], "loops"),
    (0, [5], "names seccomp filter 5 of 1"),
])
def test_a_broken_filter_chain_is_refused_where_criu_would_fail_or_loop(
        tmp_path: Path, index: int, prevs: list[int | None], why: str) -> None:
    core(tmp_path, 1, set(ENGINE_DEFAULT), filter_index=index)
    entry = img.seccomp_entry()
    for prev in prevs:
        f = entry.seccomp_filters.add(filter=kit.deny(), flags=FLAG_TSYNC)
        if prev is not None:
            f.prev = prev
    image(tmp_path / "seccomp.img", SECCOMP_MAGIC, entry.SerializeToString())
    with pytest.raises(Refused, match=why):
        check_images(tmp_path, confined())


def test_a_capability_the_container_holds_lets_its_syscalls_through(tmp_path: Path) -> None:
    """With SYS_ADMIN added (the operator's leave), the engine's profile allows mount: so may
    the checkpoint's filter; it still may not allow reboot."""
    core(tmp_path, 1, set(ENGINE_DEFAULT))
    (tmp_path / "seccomp.img").write_bytes(kit.seccomp_image((kit.deny({"mount"}), FLAG_TSYNC)))
    with pytest.raises(Refused, match="let mount through"):
        check_images(tmp_path, confined())
    assert check_images(tmp_path, confined(ENGINE_DEFAULT | {"SYS_ADMIN"})) == 1


@pytest.mark.parametrize("profile,lsm,ok", [
    ("", "", True),
    ("docker-default (enforce)", "docker-default", True),
    ("unconfined", "docker-default", False),  # out of the engine's AppArmor profile
    ("docker-default (enforce)", "", False),  # the container has none here
    ("", "docker-default", False),  # none in the image: CRIU would leave it unconfined
    ("system_u:system_r:spc_t:s0", "system_u:system_r:container_t:s0:c1,c2", False),
])
def test_a_security_profile_other_than_the_containers_is_refused(
        tmp_path: Path, profile: str, lsm: str, ok: bool) -> None:
    path = core(tmp_path, 1, set(ENGINE_DEFAULT))
    entry = img.core_entry()
    entry.ParseFromString(path.read_bytes()[12:])
    entry.thread_core.creds.lsm_profile = profile
    path.write_bytes(kit.core_image(entry.SerializeToString()))
    allowed = Confinement(ENGINE_DEFAULT, True, True, kit.MASKED, kit.READONLY, lsm)
    if ok:
        assert check_images(tmp_path, allowed) == 1
    else:
        with pytest.raises(Refused, match=re.escape(f"security profile '{profile}'")):
            check_images(tmp_path, allowed)


def test_the_confinement_is_read_from_the_created_container() -> None:
    c = Confinement.of({"HostConfig": {"CapAdd": ["NET_ADMIN"], "MaskedPaths": ["/proc/kcore"],
                                       "ReadonlyPaths": ["/proc/sys"],
                                       "SecurityOpt": ["seccomp=/etc/p.json"]},
                        "AppArmorProfile": "docker-default"}, engine_has_seccomp=True)
    assert c == Confinement(ENGINE_DEFAULT | {"NET_ADMIN"}, True, False, ("/proc/kcore",),
                            ("/proc/sys",), "docker-default", devices=None)
    # the engine lists neither unless asked for others: its own apply (Docker 20.10 here)
    c = Confinement.of({"HostConfig": {}}, engine_has_seccomp=False)
    assert (c.masked, c.readonly) == (kit.MASKED, kit.READONLY) and "/proc/kcore" in c.masked
    for host in ({"Privileged": True}, {"SecurityOpt": ["systempaths=unconfined"]}):
        c = Confinement.of({"HostConfig": host}, engine_has_seccomp=False)
        assert (c.masked, c.readonly) == ((), ())


def test_no_new_privileges_is_kept_where_the_container_has_it(tmp_path: Path) -> None:
    core(tmp_path, 1, set(ENGINE_DEFAULT))
    nnp = Confinement(ENGINE_DEFAULT, True, True, kit.MASKED, kit.READONLY, "", True)
    with pytest.raises(Refused, match="without no-new-privileges"):
        check_images(tmp_path, nnp)
    assert Confinement.of({"HostConfig": {"SecurityOpt": ["no-new-privileges:true"]}},
                          engine_has_seccomp=True).no_new_privs


def test_images_that_reach_the_host_are_refused(tmp_path: Path) -> None:
    """The red team's r09: CRIU loads apparmor.img's policies into the host's AppArmor, and
    moves a task of a second cgroup set to that set's path unrewritten ("/": the host's root
    cgroup, without the container's device rules)."""
    core(tmp_path, 1, set(ENGINE_DEFAULT))
    sets = img.cgroup_entry()
    for i, path in ((2, "/docker/abc"), (3, "/")):
        sets.sets.add(id=i).ctls.add(name="devices", path=path)
    image(tmp_path / "cgroup.img", CGROUP_MAGIC, sets.SerializeToString())
    with pytest.raises(Refused, match="2 cgroup sets"):
        check_images(tmp_path, confined())
    del sets.sets[1]
    image(tmp_path / "cgroup.img", CGROUP_MAGIC, sets.SerializeToString())
    assert check_images(tmp_path, confined()) == 1
    (tmp_path / "apparmor.img").write_bytes(b"")
    with pytest.raises(Refused, match="holds apparmor.img"):
        check_images(tmp_path, confined())


@pytest.mark.parametrize("ns", ["user", "mnt", "net", "pid"])
def test_a_task_in_a_nested_namespace_is_refused(tmp_path: Path, ns: str) -> None:
    """A nested namespace takes CAP_SYS_ADMIN (a user namespace, what the engine's profile
    refuses): CRIU would create it, its root holding every capability in it."""
    core(tmp_path, 1, set(ENGINE_DEFAULT))
    core(tmp_path, 7, set(ENGINE_DEFAULT))
    assert check_images(tmp_path, confined()) == 2
    (tmp_path / "ids-7.img").write_bytes(kit.ids_image(**{ns: 99}))
    with pytest.raises(Refused, match=f"puts task 7 in its own {ns} namespace"):
        check_images(tmp_path, confined())
    assert check_images(tmp_path, confined(ENGINE_DEFAULT | {"SYS_ADMIN"})) == 2
    (tmp_path / "ids-7.img").unlink()
    with pytest.raises(Refused, match="has no ids-7.img"):
        check_images(tmp_path, confined())
