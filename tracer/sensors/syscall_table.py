"""The one syscall table per architecture, shared by both sensors.

The BPF sensor needs the pt_regs argument registers and the syscall wrapper
symbol prefix (fexit); the audit sensor needs the AUDIT_ARCH value and the
syscall numbers for its rules and records.  Both read them from here.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field

from tracer.errors import EnvironmentProblem


@dataclass(frozen=True)
class Arch:
    machine: str
    audit_arch: int                   # AUDIT_ARCH_* value the kernel reports as `arch=`
    syscalls: dict[str, int]          # name -> number; absent = not on this arch
    # role -> (pt_regs member, extra byte offset); empty: the BPF sensor does not support it
    regs: dict[str, tuple[str, int]] = field(default_factory=dict)
    syscall_prefix: str = ""          # symbol prefix of syscall wrappers (fexit mode)
    # syscalls gputrace itself makes through ctypes (never audited): bpf, open_by_handle_at
    own_calls: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.machine


_GENERIC = {"openat": 56, "openat2": 437, "ioctl": 29}  # asm-generic numbers (arm64, riscv)
_GENERIC_OWN = {"bpf": 280, "open_by_handle_at": 265}

ARCHES: dict[str, Arch] = {
    "x86_64": Arch(
        "x86_64", 0xC000003E,
        {"open": 2, "creat": 85, "openat": 257, "openat2": 437, "ioctl": 16},
        {"ARG0": ("pt_regs.di", 0), "ARG1": ("pt_regs.si", 0), "ARG2": ("pt_regs.dx", 0),
         "ARG3": ("pt_regs.r10", 0)},
        "__x64_sys_", {"bpf": 321, "open_by_handle_at": 304}),
    "aarch64": Arch(
        "aarch64", 0xC00000B7, dict(_GENERIC),
        # arg0's register is overwritten by the return value; orig_x0 keeps it.
        {"ARG0": ("pt_regs.orig_x0", 0), "ARG1": ("pt_regs.regs", 8),
         "ARG2": ("pt_regs.regs", 16), "ARG3": ("pt_regs.regs", 24)},
        "__arm64_sys_", dict(_GENERIC_OWN)),
    "riscv64": Arch("riscv64", 0xC00000F3, dict(_GENERIC), own_calls=dict(_GENERIC_OWN)),
}


def arch_for(machine: str | None, sensor: str) -> Arch:
    """This machine's entry; `sensor` ("bpf" or "audit") names who needs it in the error."""
    machine = machine or platform.machine()
    arch = ARCHES.get(machine)
    if arch is None or (sensor == "bpf" and not arch.regs):
        hint = "; use --sensor audit" if sensor == "bpf" else ""
        raise EnvironmentProblem(f"architecture {machine} is not supported by the {sensor} "
                                 f"sensor{hint}")
    return arch


def own_call(name: str, machine: str | None = None) -> int | None:
    """The number of a syscall gputrace makes itself on this machine, or None."""
    arch = ARCHES.get(machine or platform.machine())
    return arch.own_calls.get(name) if arch is not None else None
