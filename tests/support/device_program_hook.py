"""Change a cgroup v2 device program the way the field does, from a process of its
own (so the access-change probe records a caller that is not the test):

    python3 -m tests.support.device_program_hook grant CGROUP_DIR MAJOR MINOR SAVED
        as libnvidia-container's cgroup v2 code does for the legacy hook: every
        program attached to the cgroup is replaced by one that first allows
        c MAJOR:MINOR and then runs the old program's instructions; the old
        instructions are saved to SAVED.
    python3 -m tests.support.device_program_hook reapply CGROUP_DIR SAVED
        as a re-apply does (systemd at daemon-reload, a runtime's update): the
        program the runtime had compiled from its config (SAVED) replaces
        whatever is attached, and the grant is gone.

The process names itself gt-hook / gt-reapply (PR_SET_NAME) and prints its pid.
"""

from __future__ import annotations

import base64
import ctypes
import os
import sys

from tracer.enrichment import bpf_syscall as bpf
from tracer.enrichment.device_program import DEV_CHAR, Insn, decode, encode

LDX_W, AND_K, JNE_K, MOV32_K, EXIT = 0x61, 0x54, 0x55, 0xB4, 0x95
PR_SET_NAME = 15


def allow_first(major: int, minor: int) -> list[Insn]:
    """If the device is c MAJOR:MINOR return 1; else fall through to what follows."""
    return [Insn(LDX_W, 2, 1, 0, 0), Insn(AND_K, 2, 0, 0, 0xFFFF),
            Insn(JNE_K, 2, 0, 6, DEV_CHAR),
            Insn(LDX_W, 4, 1, 4, 0), Insn(JNE_K, 4, 0, 4, major),
            Insn(LDX_W, 5, 1, 8, 0), Insn(JNE_K, 5, 0, 2, minor),
            Insn(MOV32_K, 0, 0, 0, 1), Insn(EXIT, 0, 0, 0, 0)]


def attached(cgroup_fd: int) -> list[int]:
    return bpf.prog_query(cgroup_fd, bpf.BPF_CGROUP_DEVICE, effective=False)


def replace_all(cgroup_fd: int, new_insns: list[Insn], name: str) -> None:
    for prog_id in attached(cgroup_fd):
        old_fd = bpf.prog_get_fd_by_id(prog_id)
        new_fd = bpf.prog_load(encode(new_insns), name=name)
        try:
            bpf.prog_attach(cgroup_fd, new_fd, replace_fd=old_fd)
        finally:
            os.close(new_fd)
            os.close(old_fd)


def main(argv: list[str]) -> int:
    command, cgroup = argv[0], argv[1]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, ("gt-hook" if command == "grant" else "gt-reapply").encode(), 0, 0, 0)
    print(os.getpid(), flush=True)
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ids = attached(fd)
        if command == "grant":
            major, minor, saved = int(argv[2]), int(argv[3]), argv[4]
            prog_fd = bpf.prog_get_fd_by_id(ids[0])
            try:
                old = bpf.prog_info(prog_fd).xlated
            finally:
                os.close(prog_fd)
            with open(saved, "w", encoding="ascii") as out:
                out.write(base64.b64encode(old).decode())
            replace_all(fd, allow_first(major, minor) + decode(old), "gt_hook")
        elif command == "reapply":
            with open(argv[2], encoding="ascii") as saved_file:
                original = decode(base64.b64decode(saved_file.read()))
            replace_all(fd, original, "gt_reapply")
        else:
            raise SystemExit(f"unknown command {command!r}")
    finally:
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
