"""Open a node from inside a real restriction: a seccomp filter or a Landlock sandbox.

Run as a script: `python -m tests.support.restricted_open MODE PATH [hold]`.
MODE is `seccomp` (a classic-BPF filter returning EPERM for openat, as systemd's
SystemCallFilter= or a container profile would), `container-filter` (a filter that
lets openat through, as docker's and podman's default profiles do: the process is
filtered, but the filter is not what refuses) or `landlock` (a ruleset handling
file read/write with no rule allowing anything).  With GTTEST_CGROUP_PROCS set, it
first joins that cgroup (writes its pid to that cgroup.procs file).  It prints "<pid> <errno>" and
exits at once (as in the field), or with `hold` waits for a line on stdin first.
Everything it needs is imported before the restriction goes on.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys

PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
ARCH = {"x86_64": (0xC000003E, 257, (444, 445, 446)), "aarch64": (0xC00000B7, 56, (444, 445, 446))}
LANDLOCK_WRITE_FILE, LANDLOCK_READ_FILE = 1 << 1, 1 << 2
NO_SUCH_SYSCALL = 4000  # a filter that refuses only this one refuses nothing real

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def seccomp_eperm_for_openat() -> None:
    seccomp_errno_for(ARCH[platform.machine()][1], 1)


def seccomp_errno_for(nr: int, err: int) -> None:
    """A filter answering system call `nr` with errno `err` (EPERM as systemd's
    SystemCallFilter=, ENOSYS as container profiles answer calls they do not know)."""
    audit_arch = ARCH[platform.machine()][0]
    insns = [(0x20, 0, 0, 4),                 # A = arch
             (0x15, 0, 2, audit_arch),        # if A != arch goto allow
             (0x20, 0, 0, 0),                 # A = nr
             (0x15, 1, 0, nr),                # if A == nr goto errno
             (0x06, 0, 0, SECCOMP_RET_ALLOW),
             (0x06, 0, 0, SECCOMP_RET_ERRNO | err)]
    program = ctypes.create_string_buffer(b"".join(struct.pack("<HBBI", *i) for i in insns))
    fprog = struct.pack("<HxxxxxxQ", len(insns), ctypes.addressof(program))
    fprog_buf = ctypes.create_string_buffer(fprog, len(fprog))
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, fprog_buf, 0, 0), "seccomp")


def landlock_no_files() -> None:
    create, _, restrict = ARCH[platform.machine()][2]
    attr = ctypes.create_string_buffer(struct.pack("<Q", LANDLOCK_READ_FILE | LANDLOCK_WRITE_FILE), 8)
    fd = _check(_libc.syscall(create, attr, ctypes.c_size_t(8), ctypes.c_uint32(0)),
                "landlock_create_ruleset")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(_libc.syscall(restrict, ctypes.c_int(fd), ctypes.c_uint32(0)), "landlock_restrict_self")


def main() -> None:
    mode, path = sys.argv[1], sys.argv[2]
    hold = len(sys.argv) > 3 and sys.argv[3] == "hold"
    if os.environ.get("GTTEST_CGROUP_PROCS"):
        with open(os.environ["GTTEST_CGROUP_PROCS"], "w", encoding="ascii") as procs:
            procs.write(str(os.getpid()))
    if mode == "container-filter":
        seccomp_errno_for(NO_SUCH_SYSCALL, 1)
    else:
        (seccomp_eperm_for_openat if mode == "seccomp" else landlock_no_files)()
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY)
        os.close(fd)
        err = 0
    except OSError as exc:
        err = exc.errno or -1
    os.write(1, f"{os.getpid()} {err}\n".encode())
    if hold:
        os.read(0, 1)
    os._exit(0)


if __name__ == "__main__":
    main()
