"""A checkpoint's seccomp filters are run as the kernel would run them, for every syscall the
engine's profile refuses, on every ABI, whatever the arguments: a filter a hostile source wrote
to let one through is refused, and so is a program the kernel would not load."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from migctl.agent.runtime.criu.images import ENGINE_DEFAULT
from migctl.agent.runtime.criu.seccomp import (
    AUDIT_ARCH_I386,
    AUDIT_ARCH_X86_64,
    GUARDED,
    X32_SYSCALL_BIT,
    answers,
    check_chain,
    guarded,
    instructions,
)
from migctl.agent.runtime.criu.seccomp import CLONE as GUARDED_CLONE
from migctl.common.errors import Refused
from tests.criu_kit import ALLOW, ERRNO, JEQ, JSET, KILL, LD_ABS, RET_A, RET_K, deny, insn

MOUNT = GUARDED["mount"][1]


def check(program: bytes, caps: frozenset[str] = ENGINE_DEFAULT) -> None:
    check_chain([(program, 0)], caps, "filter", machine="x86_64")


def test_a_filter_as_strict_as_the_profile_passes_on_each_machine() -> None:
    for machine in ("x86_64", "aarch64"):
        check_chain([(deny(), 0)], ENGINE_DEFAULT, "filter", machine=machine)


def test_a_filter_that_lets_mount_through_when_an_argument_matches_is_refused() -> None:
    """The arguments are the caller's: both sides of a test on them are followed."""
    program = (insn(LD_ABS, 0) + insn(JEQ, MOUNT, 0, 3) + insn(LD_ABS, 16) +
               insn(JEQ, 0x1234, 0, 1) + insn(RET_K, ALLOW)) + deny()
    with pytest.raises(Refused, match=r"let mount through \(x86_64 ABI\)"):
        check(program)


def test_a_filter_that_filters_only_the_native_abi_is_refused_for_the_others() -> None:
    native_only = insn(LD_ABS, 4) + insn(JEQ, AUDIT_ARCH_X86_64, 1, 0) + insn(RET_K, ALLOW)
    with pytest.raises(Refused, match=r"\(i386 ABI\)"):
        check(native_only + deny())
    # the x32 ABI shares the arch and sets a bit in the number
    not_x32 = (insn(LD_ABS, 4) + insn(JEQ, AUDIT_ARCH_I386, 2, 0) + insn(LD_ABS, 0) +
               insn(JSET, X32_SYSCALL_BIT, 0, 1) + insn(RET_K, ALLOW))
    with pytest.raises(Refused, match=r"\(x32 ABI\)"):
        check(not_x32 + deny())


def test_an_answer_computed_from_the_arguments_might_let_it_through() -> None:
    with pytest.raises(Refused, match="let kexec_load through"):
        check(insn(LD_ABS, 16) + insn(RET_A))


@pytest.mark.parametrize("answer", [KILL, ERRNO, 0x00030000, 0])  # kill, errno, trap, kill
def test_refusing_answers_pass(answer: int) -> None:
    check(insn(RET_K, answer))


@pytest.mark.parametrize("answer", [0x7FFC0000, 0x7FF00000, 0x7FC00000])  # log, trace, notify
def test_answers_that_hand_the_call_to_someone_else_let_it_through(answer: int) -> None:
    with pytest.raises(Refused, match="let kexec_load through"):
        check(insn(RET_K, answer))


@pytest.mark.parametrize("program,why", [
    (b"\x00" * 7, "not a BPF program"),
    (insn(0x06, ALLOW) * 4097, "not a BPF program"),
    (insn(LD_ABS, 64) + insn(RET_K, ALLOW), "outside the syscall's data"),
    (insn(LD_ABS, 2) + insn(RET_K, ALLOW), "outside the syscall's data"),
    (insn(0x28, 0) + insn(RET_K, ALLOW), "seccomp refuses"),  # LD H ABS
    (insn(JEQ, 1, 5, 5), "past its end"),
    (insn(0x05, 9), "past its end"),  # JA
    (insn(0x34, 0) + insn(RET_K, ALLOW), "divides by zero"),
    (insn(0x60, 16) + insn(RET_K, ALLOW), "scratch memory slot 16"),
    (insn(0x0E, 0), "returns in a way"),
])
def test_a_program_the_kernel_would_not_load_is_refused(program: bytes, why: str) -> None:
    with pytest.raises(Refused, match=why):
        check(program)


def test_arithmetic_and_scratch_memory_are_followed() -> None:
    """A = nr + 1, stored and loaded back, compared with kexec_load + 1: a program that
    hides the number still answers as the kernel would."""
    kexec = GUARDED["kexec_load"][1]
    program = [insn(LD_ABS, 0), insn(0x04, 1), insn(0x02, 3), insn(0x00, 0), insn(0x60, 3),
               insn(JEQ, kexec + 1, 0, 1), insn(RET_K, ALLOW), insn(RET_K, ERRNO)]
    decoded = instructions(b"".join(program), "filter")
    assert answers(decoded, kexec, AUDIT_ARCH_X86_64, "filter") == {ALLOW}
    assert answers(decoded, 0, AUDIT_ARCH_X86_64, "filter") == {ERRNO}


def test_a_machine_without_a_table_is_named() -> None:
    with pytest.raises(Refused, match="'riscv64' has no table"):
        guarded(ENGINE_DEFAULT, "riscv64")


def test_capabilities_remove_exactly_their_syscalls() -> None:
    names = {g[0] for g in guarded(ENGINE_DEFAULT, "x86_64")}
    assert "mount" in names and "bpf" in names
    names = {g[0] for g in guarded(ENGINE_DEFAULT | {"BPF"}, "x86_64")}
    assert "bpf" not in names and "mount" in names


HEADERS = Path("/usr/include/x86_64-linux-gnu/asm")


@pytest.mark.skipif(not HEADERS.is_dir(), reason="needs the kernel's x86 syscall headers "
                    "(linux-libc-dev) to compare the table with")
def test_the_syscall_numbers_are_the_kernels() -> None:
    def table(path: Path, pattern: str = r"#define __NR_(\w+)\s+(\d+)") -> dict[str, int]:
        return {m[1]: int(m[2]) for m in re.finditer(pattern, path.read_text())}

    x64, i386 = table(HEADERS / "unistd_64.h"), table(HEADERS / "unistd_32.h")
    x32 = table(HEADERS / "unistd_x32.h", r"#define __NR_(\w+)\s+\(__X32_SYSCALL_BIT \+ (\d+)\)")
    generic = table(Path("/usr/include/asm-generic/unistd.h"))
    for name, (_, n64, nx32, n32, n_arm) in GUARDED.items():
        assert (n64, nx32, n32, n_arm) == (x64.get(name), x32.get(name), i386.get(name),
                                           generic.get(name)), name
    assert {abi: x64["clone"] if abi in ("x86_64", "x32") else i386["clone"]
            if abi == "i386" else generic["clone"] for abi in GUARDED_CLONE} == GUARDED_CLONE

def test_shifts_by_a_register_take_its_low_five_bits_as_the_kernel_does() -> None:
    """The red team's r10: 1 << 32 is 1 to the kernel (eBPF's ALU32, the CPU's shift), not 0:
    a filter that compares it with 0 lets everything through."""
    program = (insn(0x01, 32) + insn(0x00, 1) + insn(0x6C) + insn(JEQ, 0, 0, 1) +
               insn(RET_K, ERRNO) + insn(RET_K, ALLOW))
    with pytest.raises(Refused, match="let kexec_load through"):
        check(program)
    with pytest.raises(Refused, match="shifts by 32"):
        check(insn(0x00, 1) + insn(0x64, 32) + insn(RET_K, ALLOW))


def test_x32_has_its_own_numbers() -> None:
    """The red team's r11: on x32, kexec_load is 528 (with the x32 bit), not 246."""
    assert [g[3] for g in guarded(ENGINE_DEFAULT, "x86_64")
            if g[:2] == ("kexec_load", "x32")] == [528 | X32_SYSCALL_BIT]
    with pytest.raises(Refused, match=r"let kexec_load through \(x32 ABI\)"):
        check(insn(LD_ABS, 0) + insn(JEQ, 528 | X32_SYSCALL_BIT, 0, 1) + insn(RET_K, ALLOW) +
              deny())


def test_clone_with_a_namespace_flag_is_guarded() -> None:
    """The profile allows clone without namespace flags, and refuses them without
    CAP_SYS_ADMIN: a filter allowing clone whatever its flags is refused."""
    clone = GUARDED_CLONE["x86_64"]
    allows_clone = insn(LD_ABS, 0) + insn(JEQ, clone, 0, 1) + insn(RET_K, ALLOW)
    with pytest.raises(Refused, match="clone with flag 0x20000 "):
        check(allows_clone + deny({"clone"}))
    check(allows_clone + deny({"clone"}), ENGINE_DEFAULT | {"SYS_ADMIN"})
    check(deny())  # allows clone without namespace flags, as the engine's does
