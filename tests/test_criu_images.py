"""The destination reads what a checkpoint's images would give the restored process, and
refuses more than its container has (second red team: a container described with no added
capabilities was restored with SYS_ADMIN, NET_ADMIN, SYS_PTRACE and no seccomp filter)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from agent.errors import Refused
from agent.runtime.criu import images_pb2 as img
from agent.runtime.criu.images import (
    CAPABILITIES,
    CORE_MAGIC,
    ENGINE_DEFAULT,
    IMG_COMMON_MAGIC,
    PSTREE_MAGIC,
    check_images,
    container_capabilities,
    seccomp_expected,
)


def words(caps: set[str]) -> list[int]:
    bits = sum(1 << CAPABILITIES.index(c) for c in caps)
    return [bits & 0xFFFFFFFF, bits >> 32]


def image(path: Path, magic: int, *messages: bytes) -> Path:
    path.write_bytes(struct.pack("<II", IMG_COMMON_MAGIC, magic) + b"".join(
        struct.pack("<I", len(m)) + m for m in messages))
    return path


def pstree(folder: Path, tasks: dict[int, list[int]]) -> None:
    """pstree.img listing each task (its pid) with its threads (the pid first)."""
    entries = []
    for pid, tids in tasks.items():
        e = img.pstree_entry(pid=pid, ppid=0)
        e.threads.extend(tids)
        entries.append(e.SerializeToString())
    image(folder / "pstree.img", PSTREE_MAGIC, *entries)


def core(folder: Path, pid: int, caps: set[str], seccomp: int | None = img.filter,
         comm: str = "sh", thread: bool = False) -> Path:
    """A core image as CRIU writes it: a task's leader has the task part (tc), a thread not;
    pstree.img gains the task, or the thread in the last task."""
    tasks = TASKS.setdefault(folder, {})
    if thread:
        tasks[list(tasks)[-1]].append(pid)
    else:
        tasks[pid] = [pid]
    pstree(folder, tasks)
    entry = img.core_entry()
    if thread:
        entry.thread_core.comm = comm
    else:
        entry.tc.comm = comm
    creds = entry.thread_core.creds
    creds.uid = 0
    for field in ("cap_prm", "cap_eff", "cap_bnd"):
        getattr(creds, field).extend(words(caps))
    if seccomp is not None:
        entry.thread_core.seccomp_mode = seccomp
    return image(folder / f"core-{pid}.img", CORE_MAGIC, entry.SerializeToString())


TASKS: dict[Path, dict[int, list[int]]] = {}


def test_a_dump_within_its_containers_powers_passes(tmp_path: Path) -> None:
    core(tmp_path, 1, set(ENGINE_DEFAULT))
    core(tmp_path, 7, set())  # a process that dropped everything
    # a thread: CRIU 4.2 writes no seccomp mode for it; the restore gives it the leader's
    core(tmp_path, 8, set(ENGINE_DEFAULT), seccomp=None, comm="jemalloc_bg_thd", thread=True)
    assert check_images(tmp_path, ENGINE_DEFAULT, seccomp=True) == 3


def test_a_threads_capabilities_are_checked_too(tmp_path: Path) -> None:
    core(tmp_path, 1, set(ENGINE_DEFAULT))
    core(tmp_path, 8, set(ENGINE_DEFAULT) | {"SYS_ADMIN"}, seccomp=None, comm="worker",
         thread=True)
    with pytest.raises(Refused, match=r"core-8.img \(worker\) gives the process SYS_ADMIN"):
        check_images(tmp_path, ENGINE_DEFAULT, seccomp=True)


@pytest.mark.parametrize("caps", [{"SYS_ADMIN"}, {"NET_ADMIN", "SYS_PTRACE"},
                                  {"CHECKPOINT_RESTORE"}])
def test_a_capability_the_container_lacks_is_refused_by_name(tmp_path: Path, caps) -> None:
    core(tmp_path, 1, set(ENGINE_DEFAULT))
    core(tmp_path, 9, set(ENGINE_DEFAULT) | caps, comm="victim")
    with pytest.raises(Refused, match="core-9.img \\(victim\\) gives the process " +
                       ", ".join(sorted(caps))):
        check_images(tmp_path, ENGINE_DEFAULT, seccomp=True)


@pytest.mark.parametrize("mode", [img.disabled, img.strict, None])
def test_a_process_without_the_seccomp_filter_is_refused(tmp_path: Path, mode) -> None:
    core(tmp_path, 1, set(ENGINE_DEFAULT), seccomp=mode)
    with pytest.raises(Refused, match="without the seccomp filter"):
        check_images(tmp_path, ENGINE_DEFAULT, seccomp=True)
    assert check_images(tmp_path, ENGINE_DEFAULT, seccomp=False) == 1  # unconfined here


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
        check_images(tmp_path, ENGINE_DEFAULT, seccomp=False)


def test_a_checkpoint_without_its_tree_or_a_listed_core_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Refused, match="no process tree"):
        check_images(tmp_path, ENGINE_DEFAULT, seccomp=False)
    pstree(tmp_path, {1: [1, 2]})
    image(tmp_path / "core-1.img", CORE_MAGIC, img.core_entry(
        tc=img.task_core_entry(comm="sh"),
        thread_core=img.thread_core_entry(creds=img.creds_entry(uid=0))).SerializeToString())
    with pytest.raises(Refused, match="lists thread 2 but has no core-2.img"):
        check_images(tmp_path, ENGINE_DEFAULT, seccomp=False)


def test_a_stale_core_image_beside_the_tree_is_not_read(tmp_path: Path) -> None:
    """A pre-copy process gone by the final checkpoint (the toy's `sleep`) leaves its core
    image in the folder the final pass updates; CRIU never reads it, and neither do we."""
    core(tmp_path, 1, set(ENGINE_DEFAULT))
    (tmp_path / "core-20.img").write_bytes(b"whatever is left")
    assert check_images(tmp_path, ENGINE_DEFAULT, seccomp=True) == 1


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
        check_images(tmp_path, ENGINE_DEFAULT, seccomp=True)


def test_a_thread_carrying_a_mode_must_carry_the_filter(tmp_path: Path) -> None:
    core(tmp_path, 1, set(ENGINE_DEFAULT))
    core(tmp_path, 8, set(ENGINE_DEFAULT), seccomp=img.strict, comm="worker", thread=True)
    with pytest.raises(Refused, match=r"core-8.img \(worker\) runs the process without"):
        check_images(tmp_path, ENGINE_DEFAULT, seccomp=True)
