"""What a checkpoint's images would give the restored process, checked before the restore.

CRIU restores every thread's credentials and seccomp mode as the dump wrote them, over what
the engine gave the container it created. The dump comes from the source, which is not
trusted: a container described with no added capabilities came back with SYS_ADMIN,
NET_ADMIN and SYS_PTRACE and no seccomp filter. So every thread's capability sets must lie
within the container's (the engine's defaults, plus what was added with the operator's
leave, minus what was dropped), and where the engine would give the container a seccomp
filter, every thread must run filtered, by filters that refuse what the engine's profile
refuses (agent/runtime/criu/seccomp.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from migctl.agent.runtime.criu import images_pb2 as img
from migctl.agent.runtime.criu.imagefile import (
    CGROUP_MAGIC,
    CORE_MAGIC,
    IDS_MAGIC,
    PSTREE_MAGIC,
    SECCOMP_MAGIC,
    entries,
    first,
    parse,
    required,
)
from migctl.agent.runtime.criu.mounts import ENGINE_MASKED, ENGINE_READONLY, check_mounts
from migctl.agent.runtime.criu.seccomp import FLAG_TSYNC, check_chain
from migctl.agent.runtime.criu.tmpfs import DEFAULT_DEVICES, device_nodes, rewrite_archives
from migctl.common.errors import Refused

MAX_TASKS = 1 << 16

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


def security_opts(host: dict) -> list[str]:
    """HostConfig's SecurityOpt, each as KEY=VALUE (the engine takes KEY:VALUE too)."""
    return [str(o).replace(":", "=", 1) for o in host.get("SecurityOpt") or []]


def seccomp_expected(host: dict, engine_has_seccomp: bool) -> bool:
    """Whether the engine confines the container with a seccomp filter."""
    if not engine_has_seccomp or host.get("Privileged"):
        return False
    return "seccomp=unconfined" not in security_opts(host)


TASK_DEAD = 2  # a core image's task_state for a zombie (CRIU's compel/include/uapi/task-state.h)


def tasks(images: Path) -> list[tuple[int, list[int]]]:
    """Every task CRIU restores alive from IMAGES, as (pid, its threads with the pid first):
    those pstree.img lists (a core image of no listed thread is never read by CRIU, and a
    stale one may lie beside them), but zombies."""
    pstree = images / "pstree.img"
    if not pstree.is_file():
        raise Refused(f"checkpoint {images.name} holds no process tree (pstree.img)")
    out = []
    for data in entries(pstree, PSTREE_MAGIC, MAX_TASKS):
        entry = parse(img.pstree_entry(), data, pstree.name)
        tids = list(entry.threads) or [entry.pid]
        leader = required(images, f"core-{entry.pid}.img", CORE_MAGIC, img.core_entry(),
                          f"task {entry.pid}")
        if leader.tc.task_state == TASK_DEAD:
            # a zombie (CRIU lists it without its thread's id): its restore forks a process
            # that exits at once, as CRIU reads this same state; nothing of it ever runs
            continue
        if entry.pid not in tids:
            raise Refused(f"checkpoint image {pstree.name} lists task {entry.pid} without "
                          "itself among its threads")
        out.append((entry.pid, [entry.pid] + [t for t in tids if t != entry.pid]))
    return out


def cores(images: Path, listed: list[tuple[int, list[int]]]
          ) -> Iterator[tuple[str, img.core_entry, bool]]:
    """The core image of every thread of the LISTED tasks (tasks()), read as CRIU wrote it,
    each task's leader (its thread whose id is the task's) first and marked: CRIU reads the
    task part only there."""
    for pid, tids in listed:
        for tid in tids:
            name = f"core-{tid}.img"
            yield name, required(images, name, CORE_MAGIC, img.core_entry(),
                                 f"thread {tid}"), tid == pid


def _caps(words: Iterable[int]) -> set[str]:
    out = set()
    for i, word in enumerate(words):
        for bit in range(32):
            if word >> bit & 1:
                n = i * 32 + bit
                out.add(CAPABILITIES[n] if n < len(CAPABILITIES) else f"capability {n}")
    return out


@dataclass(frozen=True)
class Confinement:
    """What the engine gave the container this node created, which the images may not exceed."""

    capabilities: frozenset[str]
    seccomp: bool  # the engine confines it with a seccomp filter
    default_profile: bool = True  # that filter is the engine's default profile
    masked: tuple[str, ...] = ()  # paths the engine masks in it
    readonly: tuple[str, ...] = ()  # paths the engine makes read-only in it
    lsm: str = ""  # its AppArmor profile or SELinux label ("": none)
    no_new_privs: bool = False  # created with no-new-privileges
    devices: frozenset[tuple[str, int, int]] | None = DEFAULT_DEVICES  # nodes it may have

    @classmethod
    def of(cls, container: dict, engine_has_seccomp: bool) -> Confinement:
        """From the created container (as this node's engine inspects it)."""
        host = container.get("HostConfig") or {}
        opts = security_opts(host)
        # the engine lists its masked and read-only paths in HostConfig only when asked for
        # others; otherwise its own (none when privileged or with systempaths=unconfined)
        own = not host.get("Privileged") and "systempaths=unconfined" not in opts
        masked, readonly = host.get("MaskedPaths"), host.get("ReadonlyPaths")
        caps = container_capabilities(host)
        # with CAP_MKNOD it may make any device node itself (the device cgroup guards them)
        devices = None if "MKNOD" in caps else DEFAULT_DEVICES | device_nodes(
            [str(d.get("PathOnHost") or "") for d in host.get("Devices") or []])
        return cls(caps, seccomp_expected(host, engine_has_seccomp),
                   not any(o.startswith("seccomp=") for o in opts),
                   tuple(map(str, ENGINE_MASKED if masked is None and own else masked or ())),
                   tuple(map(str, ENGINE_READONLY if readonly is None and own else
                             readonly or ())),
                   str(container.get("AppArmorProfile") or container.get("ProcessLabel") or ""),
                   any(o in ("no-new-privileges", "no-new-privileges=true") for o in opts),
                   devices)

    @property
    def sys_admin(self) -> bool:
        """With CAP_SYS_ADMIN (privileged, or added with the operator's leave) the container
        may mount what it likes and make namespaces itself: its mount images and namespaces
        are not checked."""
        return "SYS_ADMIN" in self.capabilities


def filters(images: Path) -> list[img.seccomp_filter]:
    """seccomp.img's filters (none when the dump wrote no such image)."""
    path = images / "seccomp.img"
    got = first(path, SECCOMP_MAGIC, img.seccomp_entry()) if path.is_file() else None
    return list(got.seccomp_filters) if got else []


def chain(table: list[img.seccomp_filter], index: int, where: str) -> list[tuple[bytes, int]]:
    """The filters a thread is restored with, newest first, as CRIU follows them (`prev`);
    refused where CRIU would fail or loop."""
    out, seen = [], set()
    while True:
        if index >= len(table):
            raise Refused(f"{where} names seccomp filter {index} of {len(table)}")
        if index in seen:
            raise Refused(f"{where} names a seccomp filter chain that loops (filter {index})")
        seen.add(index)
        f = table[index]
        out.append((f.filter, f.flags))
        if not f.HasField("prev"):
            return out
        index = f.prev


REFUSED_IMAGES = {"apparmor.img": "AppArmor policy namespaces, which CRIU would load into "
                                  "this host's AppArmor"}


NAMESPACES = ("pid", "net", "ipc", "uts", "mnt", "user", "cgroup", "time")


def check_namespaces(images: Path, listed: list[tuple[int, list[int]]]) -> None:
    """Every LISTED task (tasks()) in the container's own namespaces (ids-<pid>.img): a nested
    one takes CAP_SYS_ADMIN, or a user namespace the engine's profile refuses, and CRIU would
    create it (a user namespace whose root holds every capability in it)."""
    root: tuple[int, ...] | None = None
    for pid, _ in listed:
        name = f"ids-{pid}.img"
        ids = required(images, name, IDS_MAGIC, img.task_kobj_ids_entry(), f"task {pid}")
        mine = tuple(getattr(ids, f"{ns}_ns_id") for ns in NAMESPACES)
        if root is None:
            root = mine
        elif mine != root:
            nested = [ns for ns, a, b in zip(NAMESPACES, mine, root, strict=True) if a != b]
            raise Refused(f"checkpoint image {name} puts task {pid} in its own "
                          f"{', '.join(nested)} namespace: the container has none nested here")


def check_others(images: Path) -> None:
    """The images CRIU reads besides these, where they could reach the host: AppArmor
    policies (refused: a container has no namespace of its own), and cgroups (every task in
    the one set CRIU moves into the container's cgroup; another set's path is not rewritten,
    and "/" would be the host's root cgroup, without the container's device rules)."""
    for name, why in REFUSED_IMAGES.items():
        if (images / name).exists():
            raise Refused(f"checkpoint {images.name} holds {name}: {why}")
    path = images / "cgroup.img"
    if path.is_file():
        got = first(path, CGROUP_MAGIC, img.cgroup_entry())
        sets = got.sets if got else []
        if len(sets) > 1:
            raise Refused(f"checkpoint image {path.name} puts the container's processes in "
                          f"{len(sets)} cgroup sets: CRIU moves one into the container's cgroup")


def check_images(images: Path, confinement: Confinement, machine: str | None = None,
                 host_root: Path = Path("/"), restored: bool = True) -> int:
    """Refuses a checkpoint whose threads would hold a capability outside the container's, or
    run with a seccomp filter weaker than the engine's where it gives one, or whose mounts
    exceed the container's (agent/runtime/criu/mounts.py); returns the number of threads
    checked. The tmpfs archives of a checkpoint to be RESTORED are written anew with what
    was checked (criu/tmpfs.py). MACHINE and HOST_ROOT: this node's, but for tests."""
    allowed = confinement.capabilities
    table = filters(images) if confinement.seccomp else []
    listed = tasks(images)
    checked = 0
    leader_chain: list[tuple[bytes, int]] | None = None
    for name, core, leader in cores(images, listed):
        if not core.HasField("thread_core") or not core.thread_core.HasField("creds"):
            raise Refused(f"checkpoint image {name} carries no credentials to check")
        creds = core.thread_core.creds
        comm = core.thread_core.comm or core.tc.comm or name
        where = f"checkpoint image {name} ({comm})"
        extra = set()
        for field in ("cap_prm", "cap_eff", "cap_inh", "cap_bnd", "cap_amb"):
            extra |= _caps(getattr(creds, field)) - allowed
        if extra:
            raise Refused(f"{where} gives the process {', '.join(sorted(extra))}, which its "
                          "container does not have here (a source cannot grant capabilities)")
        # CRIU writes the profile back (AppArmor's "changeprofile"): only the container's own;
        # without one in the image it sets none, and the process keeps CRIU's (unconfined)
        profile = creds.lsm_profile.removesuffix(" (enforce)").removesuffix(" (complain)")
        if profile != confinement.lsm:
            raise Refused(f"{where} runs the process under the security profile "
                          f"{creds.lsm_profile!r}, not its container's here "
                          f"({confinement.lsm or 'none'}; a source cannot choose it)")
        if confinement.no_new_privs and not creds.no_new_privs:
            raise Refused(f"{where} runs the process without no-new-privileges, which its "
                          "container has here (a source cannot lift it)")
        checked += 1
        if not confinement.seccomp:
            continue
        # as CRIU reads it (cr-restore.c, check_core): the task part's old fields win, and
        # an old filter makes the leader install with TSYNC (every thread gets its filter)
        tc = core.tc if leader else img.task_core_entry()
        mode = tc.old_seccomp_mode if tc.HasField("old_seccomp_mode") \
            else core.thread_core.seccomp_mode if core.thread_core.HasField("seccomp_mode") \
            else img.disabled
        index = tc.old_seccomp_filter if tc.HasField("old_seccomp_filter") \
            else core.thread_core.seccomp_filter
        if leader:
            leader_chain = None
        if mode == img.strict:
            continue  # read, write, exit, sigreturn: less than any filter lets through
        if mode == img.filter:
            mine = chain(table, index, where)
            if confinement.default_profile:
                check_chain(mine, allowed, where, machine)
            if leader:
                tsync = tc.HasField("old_seccomp_filter") or \
                    any(flags & FLAG_TSYNC for _, flags in mine)
                leader_chain = mine if tsync else None
            continue
        # no filter of its own: a thread gets its leader's when the leader installs it with
        # TSYNC (CRIU 4.2 writes none for Redis's threads, which run filtered after the
        # restore); a leader, or a thread of a leader without TSYNC, would run unfiltered
        if leader or leader_chain is None:
            raise Refused(f"{where} runs the process without the seccomp filter its container "
                          "has here (a source cannot lift it)")
    if not checked:
        raise Refused(f"checkpoint {images.name} holds no core image")
    check_others(images)
    if not confinement.sys_admin:
        check_mounts(images, confinement.masked, confinement.readonly, host_root)
        check_namespaces(images, listed)
    # CRIU's tar unpacks these as root, outside the container: whatever it may do itself
    rewrite_archives(images, confinement.devices, write=restored)
    return checked
