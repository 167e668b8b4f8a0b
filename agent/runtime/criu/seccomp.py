"""What a checkpoint's seccomp filters let through, read from their BPF before a restore.

CRIU installs the filters the dump wrote (seccomp.img), not the engine's: a source that is not
trusted could send a filter that allows everything, with the mode still "filter". The engine's
default profile (moby's profiles/seccomp/default.json) refuses the syscalls in GUARDED unless
the container holds one of the listed capabilities; it did so identically in Docker 20.10 and
in today's profile. So each restored thread's filters are run, as the kernel would run them,
for every GUARDED syscall its container may not make, on every ABI of this machine, with the
syscall's arguments unknown (both sides of each test on them are followed): if every filter
can answer one that lets the call through, the checkpoint is refused.

clone is checked with each namespace flag set (the profile refuses them without CAP_SYS_ADMIN).
GUARDED is every syscall of Linux 6.1's tables that both Docker 20.10's profile and today's
refuse (the unimplemented afs_syscall, getpmsg, putpmsg, security, tuxcall and vserver aside).
What this does not prove: that the filter equals the engine's (another engine version filters
other syscalls, so the bytes differ), nor anything about the syscalls only one of them
refuses (io_uring's: refused today, allowed by 20.10; pkey_*, process_vm_*,
name_to_handle_at: the other way round) or newer than 6.1.
"""

from __future__ import annotations

import functools
import platform
import struct
from collections.abc import Iterable

from migctl.common.errors import Refused

# syscall: (capabilities any of which lets the engine's profile allow it, its number on
#           x86_64, x32 (without the x32 bit), i386, aarch64 (asm-generic)); None: not there
GUARDED: dict[str, tuple[tuple[str, ...], int | None, int | None, int | None, int | None]] = {
    "kexec_load": ((), 246, 528, 283, 104),
    "kexec_file_load": ((), 320, 320, None, 294),
    "create_module": ((), 174, None, 127, None),
    "get_kernel_syms": ((), 177, None, 130, None),
    "query_module": ((), 178, None, 167, None),
    "nfsservctl": ((), 180, None, 169, 42),
    "uselib": ((), 134, None, 86, None),
    "ustat": ((), 136, 136, 62, None),
    "sysfs": ((), 139, 139, 135, None),
    "_sysctl": ((), 156, None, 149, None),
    "vm86": ((), None, None, 166, None),
    "vm86old": ((), None, None, 113, None),
    "keyctl": ((), 250, 250, 288, 219),
    "add_key": ((), 248, 248, 286, 217),
    "request_key": ((), 249, 249, 287, 218),
    "swapon": ((), 167, 167, 87, 224),
    "swapoff": ((), 168, 168, 115, 225),
    "userfaultfd": ((), 323, 323, 374, 282),
    "pivot_root": ((), 155, 155, 217, 41),
    "move_pages": ((), 279, 533, 317, 239),
    "init_module": (("SYS_MODULE",), 175, 175, 128, 105),
    "finit_module": (("SYS_MODULE",), 313, 313, 350, 273),
    "delete_module": (("SYS_MODULE",), 176, 176, 129, 106),
    "acct": (("SYS_PACCT",), 163, 163, 51, 89),
    "reboot": (("SYS_BOOT",), 169, 169, 88, 142),
    "settimeofday": (("SYS_TIME",), 164, 164, 79, 170),
    "clock_settime": (("SYS_TIME",), 227, 227, 264, 112),
    "stime": (("SYS_TIME",), None, None, 25, None),
    "mount": (("SYS_ADMIN",), 165, 165, 21, 40),
    "umount2": (("SYS_ADMIN",), 166, 166, 52, 39),
    "umount": (("SYS_ADMIN",), None, None, 22, None),
    "unshare": (("SYS_ADMIN",), 272, 272, 310, 97),
    "setns": (("SYS_ADMIN",), 308, 308, 346, 268),
    "quotactl": (("SYS_ADMIN",), 179, 179, 131, 60),
    "lookup_dcookie": (("SYS_ADMIN",), 212, 212, 253, 18),
    "fsopen": (("SYS_ADMIN",), 430, 430, 430, 430),
    "fsmount": (("SYS_ADMIN",), 432, 432, 432, 432),
    "fsconfig": (("SYS_ADMIN",), 431, 431, 431, 431),
    "fspick": (("SYS_ADMIN",), 433, 433, 433, 433),
    "open_tree": (("SYS_ADMIN",), 428, 428, 428, 428),
    "move_mount": (("SYS_ADMIN",), 429, 429, 429, 429),
    "mount_setattr": (("SYS_ADMIN",), 442, 442, 442, 442),
    "sethostname": (("SYS_ADMIN",), 170, 170, 74, 161),
    "setdomainname": (("SYS_ADMIN",), 171, 171, 121, 162),
    "fanotify_init": (("SYS_ADMIN",), 300, 300, 338, 262),
    "bpf": (("SYS_ADMIN", "BPF"), 321, 321, 357, 280),
    "perf_event_open": (("SYS_ADMIN", "PERFMON"), 298, 298, 336, 241),
    "open_by_handle_at": (("DAC_READ_SEARCH",), 304, 304, 342, 265),
    "iopl": (("SYS_RAWIO",), 172, 172, 110, None),
    "ioperm": (("SYS_RAWIO",), 173, 173, 101, None),
    "vhangup": (("SYS_TTY_CONFIG",), 153, 153, 111, 58),
    "syslog": (("SYS_ADMIN", "SYSLOG"), 103, 103, 103, 116),
    "mbind": (("SYS_NICE",), 237, 237, 274, 235),
    "set_mempolicy": (("SYS_NICE",), 238, 238, 276, 237),
    "get_mempolicy": (("SYS_NICE",), 239, 239, 275, 236),
    "kcmp": (("SYS_PTRACE",), 312, 312, 349, 272),
    "pidfd_getfd": (("SYS_PTRACE",), 438, 438, 438, 438),
    "migrate_pages": ((), 256, 256, 294, 238),
    "process_madvise": (("SYS_PTRACE",), 440, 440, 440, 440),
    "set_mempolicy_home_node": (("SYS_NICE",), 450, 450, 450, 450),
    "quotactl_fd": (("SYS_ADMIN",), 443, 443, 443, 443),
    "clone3": (("SYS_ADMIN",), 435, 435, 435, 435),
}

AUDIT_ARCH_X86_64, AUDIT_ARCH_I386, AUDIT_ARCH_AARCH64 = 0xC000003E, 0x40000003, 0xC00000B7
X32_SYSCALL_BIT = 0x40000000
ABIS = {  # machine: (ABI name, AUDIT_ARCH, column of GUARDED, bits ORed into the number)
    "x86_64": (("x86_64", AUDIT_ARCH_X86_64, 1, 0), ("x32", AUDIT_ARCH_X86_64, 2, X32_SYSCALL_BIT),
               ("i386", AUDIT_ARCH_I386, 3, 0)),
    "aarch64": (("aarch64", AUDIT_ARCH_AARCH64, 4, 0),),
}
CLONE = {"x86_64": 56, "x32": 56, "i386": 120, "aarch64": 220}
CLONE_NAMESPACES = 0x7E020000  # CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
"""clone's flags (its first argument on these ABIs) the engine's profile refuses without
CAP_SYS_ADMIN: clone is checked with each of these flags set."""
"""The ABIs a process can call the kernel through, per machine (aarch64's 32-bit ARM ABI is
not listed: its numbers are not in GUARDED; docs/security.md says so)."""

# what a filter answers (SECCOMP_RET_ACTION_FULL), and those that let the call through: a
# tracer (TRACE) or a supervisor (USER_NOTIF) decides, which the container may be itself
RET_ACTION = 0xFFFF0000
PASSES = {0x7FFF0000: "ALLOW", 0x7FFC0000: "LOG", 0x7FF00000: "TRACE", 0x7FC00000: "USER_NOTIF"}
FLAG_TSYNC, FLAG_LOG, FLAG_SPEC_ALLOW = 1, 2, 4
FLAGS_ALLOWED = FLAG_TSYNC | FLAG_LOG | FLAG_SPEC_ALLOW
"""Filter flags a checkpoint may ask CRIU to install with; a new listener (8) would hand the
restored process a supervisor's file descriptor."""
MAX_INSNS = 4096  # the kernel's BPF_MAXINSNS per filter
MAX_CHAIN_INSNS = 32768  # the kernel's MAX_INSNS_PER_PATH, over a thread's whole chain
MAX_STATES = 200_000
SECCOMP_DATA_LEN = 64  # struct seccomp_data: nr, arch, instruction_pointer, args[6]
BPF_MEMWORDS = 16

Value = int | None  # None: depends on the syscall's arguments or instruction pointer


def guarded(capabilities: Iterable[str], machine: str | None = None
            ) -> list[tuple[str, str, int, int, int | None]]:
    """(syscall, ABI, AUDIT_ARCH, number, its first argument or None: any) the engine's
    profile refuses a container holding CAPABILITIES, on every ABI of MACHINE (this one by
    default)."""
    caps = set(capabilities)
    abis = ABIS.get(machine or platform.machine())
    if abis is None:
        raise Refused(f"this node's machine {machine or platform.machine()!r} has no table of "
                      "guarded syscalls to check a checkpoint's seccomp filters with")
    out = []
    for name, (allowed_by, *numbers) in GUARDED.items():
        if caps & set(allowed_by):
            continue
        for abi, arch, column, bits in abis:
            nr = numbers[column - 1]
            if nr is not None:
                out.append((name, abi, arch, nr | bits, None))
    if "SYS_ADMIN" not in caps:
        for abi, arch, _, bits in abis:
            for flag in (1 << b for b in range(32) if CLONE_NAMESPACES >> b & 1):
                out.append((f"clone with flag {flag:#x}", abi, arch, CLONE[abi] | bits, flag))
    return out


def instructions(program: bytes, where: str) -> list[tuple[int, int, int, int]]:
    """The BPF program as (code, jt, jf, k), refused when the kernel would refuse it."""
    if not program or len(program) % 8 or len(program) // 8 > MAX_INSNS:
        raise Refused(f"{where} is not a BPF program the kernel loads ({len(program)} bytes)")
    return [struct.unpack_from("<HBBI", program, i) for i in range(0, len(program), 8)]


def answers(program: list[tuple[int, int, int, int]], nr: int, arch: int, where: str,
            arg0: int | None = None) -> set[int | None]:
    """Every answer the program can give syscall NR of ARCH, whatever its arguments (None:
    an answer computed from them), but ARG0 for the low word of the first when given. Follows
    classic BPF as seccomp accepts it (kernel/seccomp.c, seccomp_check_filter; the kernel
    runs it as eBPF's 32-bit arithmetic); anything else is refused."""
    out: set[int | None] = set()
    seen: set[tuple] = set()
    todo: list[tuple[int, Value, Value, tuple[Value, ...]]] = [(0, 0, 0, (0,) * BPF_MEMWORDS)]
    while todo:
        state = todo.pop()
        if state in seen:
            continue
        seen.add(state)
        if len(seen) > MAX_STATES:
            raise Refused(f"{where} has more paths than a check follows ({MAX_STATES})")
        pc, a, x, mem = state
        if pc >= len(program):
            raise Refused(f"{where} runs past its end (instruction {pc})")
        code, jt, jf, k = program[pc]
        cls, nxt = code & 0x07, pc + 1
        if code == 0x20:  # LD W ABS
            if k % 4 or k >= SECCOMP_DATA_LEN:
                raise Refused(f"{where} loads outside the syscall's data (offset {k})")
            known = {0: nr, 4: arch, 16: arg0}
            todo.append((nxt, known.get(k), x, mem))
        elif code in (0x80, 0x81):  # LD/LDX W LEN
            todo.append((nxt, SECCOMP_DATA_LEN, x, mem) if cls == 0 else
                        (nxt, a, SECCOMP_DATA_LEN, mem))
        elif code in (0x00, 0x01):  # LD/LDX IMM
            todo.append((nxt, k, x, mem) if cls == 0 else (nxt, a, k, mem))
        elif code in (0x60, 0x61):  # LD/LDX MEM
            _slot(k, where)
            todo.append((nxt, mem[k], x, mem) if cls == 0 else (nxt, a, mem[k], mem))
        elif code in (0x02, 0x03):  # ST/STX
            _slot(k, where)
            stored = a if cls == 2 else x
            todo.append((nxt, a, x, mem[:k] + (stored,) + mem[k + 1:]))
        elif cls == 0x04:  # ALU
            todo.append((nxt, _alu(code, a, x, k, where), x, mem))
        elif cls == 0x05:  # JMP
            op = code & 0xF0
            if op == 0x00:  # JA
                todo.append((nxt + k, a, x, mem))
                continue
            if op not in (0x10, 0x20, 0x30, 0x40):
                raise Refused(f"{where} holds a jump the kernel refuses (code {code:#x})")
            other = x if code & 0x08 else k
            if a is None or other is None:
                taken: tuple[bool, ...] = (True, False)
            else:
                taken = ({0x10: a == other, 0x20: a > other, 0x30: a >= other,
                          0x40: bool(a & other)}[op],)
            for t in taken:
                todo.append((nxt + (jt if t else jf), a, x, mem))
        elif cls == 0x06:  # RET
            if code == 0x06:
                out.add(k)
            elif code == 0x16:
                out.add(a)
            else:
                raise Refused(f"{where} returns in a way the kernel refuses (code {code:#x})")
        elif code == 0x07:  # TAX
            todo.append((nxt, a, a, mem))
        elif code == 0x87:  # TXA
            todo.append((nxt, x, x, mem))
        else:
            raise Refused(f"{where} holds an instruction seccomp refuses (code {code:#x})")
    return out


def _slot(k: int, where: str) -> None:
    if k >= BPF_MEMWORDS:
        raise Refused(f"{where} uses scratch memory slot {k} of {BPF_MEMWORDS}")


def _alu(code: int, a: Value, x: Value, k: int, where: str) -> Value:
    op, other = code & 0xF0, (x if code & 0x08 else k)
    if op == 0x80:  # NEG
        return None if a is None else -a & 0xFFFFFFFF
    if op not in (0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x90, 0xA0):
        raise Refused(f"{where} holds an arithmetic the kernel refuses (code {code:#x})")
    if op in (0x30, 0x90) and not code & 0x08 and k == 0:
        raise Refused(f"{where} divides by zero")
    if op in (0x60, 0x70) and not code & 0x08 and k >= 32:
        raise Refused(f"{where} shifts by {k} (the kernel refuses shifts of 32 or more)")
    if op == 0x50 and 0 in (a, other):
        return 0  # whatever the unknown side
    if a is None or other is None or (op in (0x30, 0x90) and other == 0):
        return None  # the kernel's division by a zero X ends the program: not worth a guess
    # shifts by X take its low 5 bits, as the kernel's 32-bit eBPF and the CPUs do
    value = {0x00: a + other, 0x10: a - other, 0x20: a * other, 0x30: a // other,
             0x40: a | other, 0x50: a & other, 0x60: a << (other & 31),
             0x70: a >> (other & 31), 0x90: a % other, 0xA0: a ^ other}[op]
    return value & 0xFFFFFFFF


def passes(answer: int | None) -> bool:
    """Whether an answer lets the call through (an unknown one might)."""
    return answer is None or answer & RET_ACTION in PASSES


def check_chain(chain: list[tuple[bytes, int]], capabilities: Iterable[str], where: str,
                machine: str | None = None) -> None:
    """Refuses a thread's filters (program, flags; all of them apply, the strictest answer
    wins) when they can let through a syscall the engine's profile refuses its container.
    The verdict is kept: the final checkpoint's filters are the pre-copy checkpoint's, checked
    before the freeze, so that the frozen window pays a lookup (and every thread of a task
    shares its chain)."""
    why = _verdict(tuple(chain), frozenset(capabilities), machine or platform.machine())
    if why:
        raise Refused(f"{where}{why}")


@functools.lru_cache(maxsize=64)
def _verdict(chain: tuple[tuple[bytes, int], ...], capabilities: frozenset[str],
             machine: str) -> str:
    """What is wrong with CHAIN, to follow the name of what holds it ("": nothing)."""
    try:
        _check(list(chain), capabilities, machine)
    except Refused as err:
        return str(err)
    return ""


def _check(chain: list[tuple[bytes, int]], capabilities: frozenset[str], machine: str) -> None:
    """Refuses CHAIN with words that follow its holder's name (check_chain adds it)."""
    where = ""
    programs = []
    total = 0
    for i, (program, flags) in enumerate(chain):
        if flags & ~FLAGS_ALLOWED:
            raise Refused(f"{where} installs filter {i} with flags {flags:#x} (a checkpoint "
                          f"may only ask for {FLAGS_ALLOWED:#x})")
        programs.append(instructions(program, f"{where}, filter {i}"))
        total += len(programs[-1]) + 4  # the kernel's per-filter overhead
    if total > MAX_CHAIN_INSNS:
        raise Refused(f"{where} stacks {total} instructions of filters (the kernel takes "
                      f"{MAX_CHAIN_INSNS})")
    try:
        rules = guarded(capabilities, machine)
    except Refused as err:
        raise Refused(f": {err}") from None
    for name, abi, arch, nr, arg0 in rules:
        if all(any(passes(r) for r in answers(p, nr, arch, f"{where}, filter {i}", arg0))
               for i, p in enumerate(programs)):
            raise Refused(f"{where}: its seccomp filters let {name} through ({abi} ABI), which "
                          "the engine's profile refuses its container here (a source cannot "
                          "lift a filter)")
