"""Checks that turn a failing BPF start into one line the user can act on."""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess

from tracer.errors import EnvironmentProblem, NoPrivilege
from tracer.sensors.syscall_table import own_call

CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


def effective_caps(proc: str = "/proc") -> int:
    try:
        with open(os.path.join(proc, "self/status"), encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def require_bpf_privilege(proc: str = "/proc") -> None:
    caps = effective_caps(proc)
    has = lambda cap: bool(caps >> cap & 1)  # noqa: E731
    if has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON)):
        return
    who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    raise NoPrivilege(f"loading BPF probes needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN); "
                      f"running as {who} without them: run as root, e.g. sudo gputrace watch")


def require_tracefs(tracefs: str = "/sys/kernel/tracing") -> str:
    """Mount tracefs if needed; returns the path.  The syscall exit tracepoints must exist."""
    events = os.path.join(tracefs, "events")
    if not os.path.isdir(events):
        if not os.path.isdir(tracefs):
            raise EnvironmentProblem(f"tracefs mount point {tracefs} does not exist (kernel without "
                                     "CONFIG_TRACING?); try --sensor audit")
        proc = subprocess.run(["mount", "-t", "tracefs", "nodev", tracefs],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.isdir(events):
            why = (proc.stderr.strip().splitlines() or ["mount failed"])[-1]
            raise EnvironmentProblem(f"tracefs is not mounted at {tracefs} and mounting it failed "
                                     f"({why}); mount it with: mount -t tracefs nodev {tracefs}")
    if not os.path.isdir(os.path.join(events, "syscalls/sys_exit_openat")):
        raise EnvironmentProblem("the kernel has no syscalls:sys_exit_openat tracepoint "
                                 "(CONFIG_FTRACE_SYSCALLS); try --sensor audit")
    return tracefs


# --- does this kernel let BPF load fexit programs? (detect by loading) -------
_BPF_PROG_LOAD, _BPF_RAW_TRACEPOINT_OPEN = 5, 17
_PROG_TYPE_TRACING, _TRACE_FEXIT = 26, 25


def fexit_supported(attach_btf_id: int) -> tuple[bool, str]:
    """Load and attach a two-instruction fexit program to the function with that
    BTF id.  Returns (ok, reason).  Costs about a millisecond."""
    nr = own_call("bpf")
    if nr is None or attach_btf_id <= 0:
        return False, "fexit target not found in BTF"
    libc = ctypes.CDLL(None, use_errno=True)
    insns = ctypes.create_string_buffer(struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0))
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(144)
    struct.pack_into("<IIQQ", attr, 0, _PROG_TYPE_TRACING, 2, ctypes.addressof(insns),
                     ctypes.addressof(license_))
    struct.pack_into("<I", attr, 68, _TRACE_FEXIT)
    struct.pack_into("<I", attr, 108, attach_btf_id)
    prog_fd = libc.syscall(nr, _BPF_PROG_LOAD, attr, ctypes.sizeof(attr))
    if prog_fd < 0:
        return False, f"fexit program load failed: {os.strerror(ctypes.get_errno())}"
    try:
        link = ctypes.create_string_buffer(16)
        struct.pack_into("<QI", link, 0, 0, prog_fd)
        link_fd = libc.syscall(nr, _BPF_RAW_TRACEPOINT_OPEN, link, ctypes.sizeof(link))
        if link_fd < 0:
            return False, f"fexit attach failed: {os.strerror(ctypes.get_errno())}"
        os.close(link_fd)
        return True, "fexit loads"
    finally:
        os.close(prog_fd)
