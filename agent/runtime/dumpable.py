"""What CRIU will refuse to dump, read from /proc before anything moves.

CRIU's own refusals come at the first checkpoint, as a line of its log. `migctl ps`, `plan` and
a migration's request phase say it first, naming the process and what to do:
  - a process whose user or group is not root's, when this node's root lacks CAP_SYS_RESOURCE
    (machines whose root runs in a container or sandbox drop it): the kernel then lets CRIU
    read the resource limits only of root's own processes ("Can't get rlimit");
  - an io_uring instance, which CRIU 4.2 cannot dump;
  - any other kind of anonymous inode CRIU does not know.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

CAP_SYS_RESOURCE = 24
DUMPABLE_ANON_INODES = frozenset({
    "[eventfd]", "[eventpoll]", "inotify", "[fanotify]", "[signalfd]", "[timerfd]",
    "bpf-map", "[pidfd]",
})
"""The anonymous inodes CRIU 4.2 dumps (criu/files.c: eventfd, epoll, inotify, fanotify,
signalfd, timerfd, bpf maps, pidfd); anything else fails the dump."""
SHOWN = 3  # processes named per problem


def has_sys_resource(proc: Path = Path("/proc")) -> bool:
    """Whether this process (the agent, root) holds CAP_SYS_RESOURCE."""
    for line in (proc / "self" / "status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return False


def _status(proc: Path, pid: int) -> dict[str, str]:
    out = {}
    for line in (proc / str(pid) / "status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def problems(pids: Iterable[int], sys_resource: bool, proc: Path = Path("/proc")) -> list[str]:
    """What keeps CRIU from dumping the processes PIDS, one sentence a kind, each naming the
    processes and what to do; processes gone meanwhile are skipped."""
    other_user: list[str] = []
    uring: list[str] = []
    anon: dict[str, list[str]] = {}
    for pid in pids:
        try:
            status = _status(proc, pid)
            fds = os.listdir(proc / str(pid) / "fd")
        except (FileNotFoundError, ProcessLookupError):
            continue
        who = f"{status.get('Name', '?')} (pid {pid})"
        ids = status.get("Uid", "0").split()[:3] + status.get("Gid", "0").split()[:3]
        if not sys_resource and any(i != "0" for i in ids):
            uid, gid = status.get("Uid", "?").split()[:2], status.get("Gid", "?").split()[:2]
            other_user.append(f"{who[:-1]}, uid {'/'.join(uid)} gid {'/'.join(gid)})")
        kinds = set()
        for fd in fds:
            try:
                target = os.readlink(proc / str(pid) / "fd" / fd)
            except OSError:
                continue
            if target.startswith("anon_inode:"):
                kinds.add(target.removeprefix("anon_inode:"))
        if "[io_uring]" in kinds:
            uring.append(who)
        for kind in sorted(kinds - DUMPABLE_ANON_INODES - {"[io_uring]"}):
            anon.setdefault(kind, []).append(who)
    out = []
    if other_user:
        out.append(f"{_few(other_user, 'does', 'do')} not run as root, and this node's root "
                   "lacks CAP_SYS_RESOURCE: CRIU cannot read such a process's resource limits "
                   "(\"Can't get rlimit\"). Run the service as root, or the agent on a node "
                   "whose root has CAP_SYS_RESOURCE (docs/runtime.md)")
    if uring:
        out.append(f"{_few(uring, 'uses', 'use')} io_uring, which CRIU cannot dump: turn it off "
                   "in the service (MariaDB: innodb_use_native_aio=0)")
    for kind, who in sorted(anon.items()):
        out.append(f"{_few(who, 'holds', 'hold')} an anonymous inode {kind}, which CRIU "
                   "cannot dump")
    return out


def _few(who: list[str], one: str, many: str) -> str:
    more = f" and {len(who) - SHOWN} more" if len(who) > SHOWN else ""
    if len(who) == 1:
        return f"process {who[0]} {one}"
    return f"processes {', '.join(who[:SHOWN])}{more} {many}"
