"""CRIU images and seccomp filters written by hand, as a source (honest or not) would send them:
for the image checks' unit tests and the hostile source."""

from __future__ import annotations

import struct
from pathlib import Path

from migctl.agent.runtime.criu import images_pb2 as img
from migctl.agent.runtime.criu.imagefile import (
    CORE_MAGIC,
    IDS_MAGIC,
    IMG_COMMON_MAGIC,
    MNTS_MAGIC,
    PSTREE_MAGIC,
    SECCOMP_MAGIC,
)
from migctl.agent.runtime.criu.images import CAPABILITIES, NAMESPACES
from migctl.agent.runtime.criu.mounts import ENGINE_MASKED, ENGINE_READONLY
from migctl.agent.runtime.criu.seccomp import ABIS, CLONE, CLONE_NAMESPACES, GUARDED

ALLOW, ERRNO, KILL = 0x7FFF0000, 0x00050001, 0x80000000
LD_ABS, LD_IMM, JEQ, JSET, RET_K, RET_A = 0x20, 0x00, 0x15, 0x45, 0x06, 0x16


def encode(*messages: bytes, magic: int) -> bytes:
    """A CRIU image: the two magics, then each entry after its little-endian size."""
    return struct.pack("<II", IMG_COMMON_MAGIC, magic) + b"".join(
        struct.pack("<I", len(m)) + m for m in messages)


def write(path: Path, magic: int, *messages: bytes) -> Path:
    path.write_bytes(encode(*messages, magic=magic))
    return path


def words(caps: set[str] | frozenset[str]) -> list[int]:
    bits = sum(1 << CAPABILITIES.index(c) for c in caps)
    return [bits & 0xFFFFFFFF, bits >> 32]


def insn(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


def deny(exclude: frozenset[str] | set[str] = frozenset()) -> bytes:
    """A filter that answers EPERM for every GUARDED syscall but EXCLUDE, on each ABI (by its
    arch and number), and for clone with a namespace flag, and lets the rest through: as
    strict as the engine's profile where it is checked."""
    out = b""
    for abis in ABIS.values():
        for abi, arch, column, bits in abis:
            for name, (_, *numbers) in GUARDED.items():
                nr = numbers[column - 1]
                if nr is None or name in exclude:
                    continue
                out += (insn(LD_ABS, 4) + insn(JEQ, arch, 0, 3) + insn(LD_ABS, 0) +
                        insn(JEQ, nr | bits, 0, 1) + insn(RET_K, ERRNO))
            if "clone" not in exclude:
                out += (insn(LD_ABS, 4) + insn(JEQ, arch, 0, 5) + insn(LD_ABS, 0) +
                        insn(JEQ, CLONE[abi] | bits, 0, 3) + insn(LD_ABS, 16) +
                        insn(JSET, CLONE_NAMESPACES, 0, 1) + insn(RET_K, ERRNO))
    return out + insn(RET_K, ALLOW)


def allow_all() -> bytes:
    return insn(RET_K, ALLOW)


def core_entry(caps: set[str] | frozenset[str], mode: int | None = img.filter, filter_index: int
               | None = 0, comm: str = "sh", leader: bool = True) -> bytes:
    """A core image's entry as CRIU writes it: a task's leader has the task part (tc)."""
    entry = img.core_entry()
    if leader:
        entry.tc.comm = comm
    else:
        entry.thread_core.comm = comm
    creds = entry.thread_core.creds
    creds.uid = 0
    for field in ("cap_prm", "cap_eff", "cap_bnd"):
        getattr(creds, field).extend(words(caps))
    if mode is not None:
        entry.thread_core.seccomp_mode = mode
    if filter_index is not None and mode == img.filter:
        entry.thread_core.seccomp_filter = filter_index
    return entry.SerializeToString()


def seccomp_image(*chain: tuple[bytes, int]) -> bytes:
    """seccomp.img of one chain, oldest first: (program, flags); each filter's prev is the
    one before, so the chain's last filter (index len-1) is the one a thread names."""
    entry = img.seccomp_entry()
    for i, (program, flags) in enumerate(chain):
        f = entry.seccomp_filters.add(filter=program, flags=flags)
        if i:
            f.prev = i - 1
    return encode(entry.SerializeToString(), magic=SECCOMP_MAGIC)


def pstree_image(tasks: dict[int, list[int]]) -> bytes:
    """pstree.img listing each task (its pid) with its threads."""
    return encode(*(img.pstree_entry(pid=pid, ppid=0, threads=tids).SerializeToString()
                    for pid, tids in tasks.items()), magic=PSTREE_MAGIC)


def core_image(entry: bytes) -> bytes:
    return encode(entry, magic=CORE_MAGIC)


def ids_image(**nested: int) -> bytes:
    """ids-<pid>.img of a task in the container's namespaces (ids 1..8), but NESTED ones
    (pid=20: its own pid namespace)."""
    ids = {f"{ns}_ns_id": i + 1 for i, ns in enumerate(NAMESPACES)}
    ids.update({f"{ns}_ns_id": v for ns, v in nested.items()})
    return encode(img.task_kobj_ids_entry(**ids).SerializeToString(), magic=IDS_MAGIC)


def mounts_image(*entries: img.mnt_entry) -> bytes:
    return encode(*(e.SerializeToString() for e in entries), magic=MNTS_MAGIC)


MASKED, READONLY = ENGINE_MASKED, ENGINE_READONLY
ROOT_DEV, PROC_DEV, DEV_DEV, SYS_DEV, DISK_DEV = 0x2A, 0x30, 0x31, 0x32, 0x801


def container_mounts(masked: tuple[str, ...] = MASKED, readonly: tuple[str, ...] = READONLY,
                     volume: str = "/data") -> list[img.mnt_entry]:
    """A container's mount namespace as runc builds it and CRIU 4.2 dumps it (read from a real
    checkpoint of the toy): the root, proc, /dev, sysfs and cgroup read-only, the engine's
    files and a volume (runc's external mounts, named by their mount points), the masks
    (/dev/null, external, over a file; a read-only tmpfs over a folder) and the read-only
    binds of proc; every entry with its superblock flags."""
    out: list[img.mnt_entry] = []

    def add(point: str, fstype: int, dev: int, parent: int, root: str = "/", flags: int = 0,
            source: str = "none", **extra) -> None:
        out.append(img.mnt_entry(fstype=fstype, mnt_id=len(out) + 100, root_dev=dev,
                                 parent_mnt_id=parent, flags=flags, root=root,
                                 mountpoint=point, source=source, options="", sb_flags=0,
                                 **extra))

    add("/", 17, ROOT_DEV, 1, source="overlay")
    add("/proc", 1, PROC_DEV, 100, flags=0xE, source="proc")
    add("/dev", 5, DEV_DEV, 100, source="tmpfs")
    add("/dev/pts", 6, 0x40, 102, source="devpts")
    add("/sys", 2, SYS_DEV, 100, flags=0xF, source="sysfs")
    add("/sys/fs/cgroup", 23, 0x1A, 104, flags=0xF, source="cgroup")
    add("/dev/mqueue", 14, 0x41, 102, source="mqueue")
    add("/dev/shm", 5, 0x42, 102, source="shm")
    for i, point in enumerate(("/etc/resolv.conf", "/etc/hostname", "/etc/hosts", volume)):
        add(point, 0, DISK_DEV, 100, root=f"/var/lib/docker/x{i}", ext_key=point,
            source="/dev/vda1")
    for point in masked:
        if point.startswith("/sys"):
            add(point, 5, 0x50 + len(out), 104, flags=1, source="tmpfs")
        elif point in ("/proc/asound", "/proc/acpi", "/proc/scsi"):
            add(point, 5, 0x50 + len(out), 101, flags=1, source="tmpfs")
        else:
            add(point, 5, DEV_DEV, 101, root="/null", source="tmpfs", ext_key="/dev/null")
    for point in readonly:
        add(point, 1, PROC_DEV, 101, root=point.removeprefix("/proc"), flags=0xF, source="proc")
    return out


def fake_host(root: Path, paths: tuple[str, ...] = MASKED + READONLY) -> Path:
    """A host root where PATHS exist (as this node's /proc and /sys would show them)."""
    for p in paths:
        (root / p.lstrip("/")).mkdir(parents=True, exist_ok=True)
    return root
