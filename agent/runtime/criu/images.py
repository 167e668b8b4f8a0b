"""What a checkpoint's images would give the restored process, checked before the restore.

CRIU restores every thread's credentials and seccomp mode as the dump wrote them, over what
the engine gave the container it created. The dump comes from the source, which is not
trusted: a container described with no added capabilities came back with SYS_ADMIN,
NET_ADMIN and SYS_PTRACE and no seccomp filter. So every thread's capability sets must lie
within the container's (the engine's defaults, plus what was added with the operator's
leave, minus what was dropped), and each task's seccomp mode must be a filter where the
engine would give the container one.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

from google.protobuf.message import Message

from agent.errors import Refused
from agent.runtime.criu import images_pb2 as img

IMG_COMMON_MAGIC = 0x54564319
CORE_MAGIC = 0x55053847
PSTREE_MAGIC = 0x50273030
MAX_TASKS = 1 << 16
MAX_ENTRY = 1 << 20  # a core entry is a few KB

# Linux capability numbers (include/uapi/linux/capability.h)
CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)
ENGINE_DEFAULT = frozenset({
    "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
    "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
})
"""What Docker gives a container that adds and drops nothing (moby oci/caps/defaults.go)."""
SECCOMP_FILTER = img.filter


def container_capabilities(host: dict) -> frozenset[str]:
    """The capabilities the engine gives a container created with HOST (its HostConfig as
    this node created it): everything when privileged, else the defaults with CapAdd and
    without CapDrop ("ALL" in either, names with or without CAP_)."""
    if host.get("Privileged"):
        return frozenset(CAPABILITIES)

    def names(key: str) -> set[str]:
        return {str(c).upper().removeprefix("CAP_") for c in host.get(key) or []}

    adds, drops = names("CapAdd"), names("CapDrop")
    # the engine's own rule (moby's TweakCapabilities): ALL added is everything but what is
    # dropped, ALL dropped leaves only what is added, else the defaults less drops plus adds
    if "ALL" in adds:
        return frozenset(set(CAPABILITIES) - drops)
    if "ALL" in drops:
        return frozenset(adds)
    return frozenset((ENGINE_DEFAULT - drops) | adds)


def seccomp_expected(host: dict, engine_has_seccomp: bool) -> bool:
    """Whether the engine confines the container with a seccomp filter."""
    if not engine_has_seccomp or host.get("Privileged"):
        return False
    opts = [str(o).replace(":", "=", 1) for o in host.get("SecurityOpt") or []]
    return "seccomp=unconfined" not in opts


def _entries(path: Path, magic: int, limit: int) -> Iterator[bytes]:
    """The entries of a CRIU image (after its two magics: a little-endian size, then that
    many bytes), at most LIMIT of them."""
    data = path.read_bytes()
    if len(data) < 8 or struct.unpack_from("<II", data) != (IMG_COMMON_MAGIC, magic):
        raise Refused(f"checkpoint image {path.name} is not the CRIU image it is named for")
    pos, count = 8, 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise Refused(f"checkpoint image {path.name} is truncated")
        (size,) = struct.unpack_from("<I", data, pos)
        if size > MAX_ENTRY or pos + 4 + size > len(data):
            raise Refused(f"checkpoint image {path.name} announces an entry of {size} bytes")
        count += 1
        if count > limit:
            raise Refused(f"checkpoint image {path.name} holds more than {limit} entries")
        yield data[pos + 4:pos + 4 + size]
        pos += 4 + size


def _parse(message: Message, data: bytes, name: str) -> Message:
    try:
        message.ParseFromString(data)
    except Exception as err:  # noqa: BLE001 - any decoding failure is a refusal
        raise Refused(f"checkpoint image {name} cannot be read: {err}") from None
    return message


def threads(images: Path) -> list[int]:
    """Every thread CRIU restores from IMAGES: those of the tasks pstree.img lists (a core
    image of no listed thread is never read by CRIU, and a stale one may lie beside them)."""
    pstree = images / "pstree.img"
    if not pstree.is_file():
        raise Refused(f"checkpoint {images.name} holds no process tree (pstree.img)")
    out: list[int] = []
    for data in _entries(pstree, PSTREE_MAGIC, MAX_TASKS):
        entry = _parse(img.pstree_entry(), data, pstree.name)
        out += list(entry.threads) or [entry.pid]
    return out


def cores(images: Path) -> Iterator[tuple[str, img.core_entry]]:
    """The core image of every thread CRIU restores, read as CRIU wrote it."""
    for tid in threads(images):
        path = images / f"core-{tid}.img"
        if not path.is_file():
            raise Refused(f"checkpoint {images.name} lists thread {tid} but has no {path.name}")
        entries = list(_entries(path, CORE_MAGIC, 1))
        if not entries:
            raise Refused(f"checkpoint image {path.name} holds no entry")
        yield path.name, _parse(img.core_entry(), entries[0], path.name)


def _caps(words: Iterable[int]) -> set[str]:
    out = set()
    for i, word in enumerate(words):
        for bit in range(32):
            if word >> bit & 1:
                n = i * 32 + bit
                out.add(CAPABILITIES[n] if n < len(CAPABILITIES) else f"capability {n}")
    return out


def check_images(images: Path, allowed: frozenset[str], seccomp: bool) -> int:
    """Refuses a checkpoint whose threads would hold a capability outside ALLOWED, or run
    without a seccomp filter when SECCOMP; returns the number of threads checked."""
    checked = 0
    for name, core in cores(images):
        if not core.HasField("thread_core") or not core.thread_core.HasField("creds"):
            raise Refused(f"checkpoint image {name} carries no credentials to check")
        creds = core.thread_core.creds
        comm = core.thread_core.comm or core.tc.comm or name
        extra = set()
        for field in ("cap_prm", "cap_eff", "cap_inh", "cap_bnd", "cap_amb"):
            extra |= _caps(getattr(creds, field)) - allowed
        if extra:
            raise Refused(f"checkpoint image {name} ({comm}) gives the process "
                          f"{', '.join(sorted(extra))}, which its container does not have "
                          "here (a source cannot grant capabilities)")
        # as CRIU reads it (cr-restore.c, check_core): the task part's old field wins
        mode = core.tc.old_seccomp_mode if core.tc.HasField("old_seccomp_mode") \
            else core.thread_core.seccomp_mode
        # A task's leader (its core has the task part) carries the mode; CRIU 4.2 writes none
        # for the other threads, which the restore gives the leader's filter (Redis's threads,
        # seen here: Seccomp 2 after the restore). A mode a thread does carry must be one.
        carries = core.HasField("tc") or core.thread_core.HasField("seccomp_mode")
        if seccomp and carries and mode != SECCOMP_FILTER:
            raise Refused(f"checkpoint image {name} ({comm}) runs the process without the "
                          "seccomp filter its container has here (a source cannot lift it)")
        checked += 1
    if not checked:
        raise Refused(f"checkpoint {images.name} holds no core image")
    return checked
