"""A throwaway cgroup v2 (at /sys/fs/cgroup/unified here) with a real device program
attached, compiled by tests/support/device_program_styles.py in a runtime's shape."""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Iterator

from tests.support import device_program_styles as styles
from tracer.enrichment import bpf_syscall as bpf
from tracer.enrichment import device_program

UNIFIED = "/sys/fs/cgroup/unified"


def attach_program(directory: str, rules: styles.RuleSet) -> int:
    """Compile `rules` in its runtime's shape, load it and attach it to the v2 cgroup
    `directory` (BPF_F_ALLOW_MULTI, as runtimes do); returns the program fd."""
    prog_fd = bpf.prog_load(device_program.encode(styles.COMPILERS[rules.style](rules)),
                            name=styles.PROGRAM_NAMES[rules.style])
    cg_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        bpf.prog_attach(cg_fd, prog_fd, flags=bpf.BPF_F_ALLOW_MULTI)
    except OSError:
        os.close(prog_fd)
        raise
    finally:
        os.close(cg_fd)
    return prog_fd


@contextlib.contextmanager
def v2_device_cgroup(rules: styles.RuleSet) -> Iterator[str]:
    """Yields the cgroup directory; its `cgroup.procs` is where a process joins it.
    Processes left in it are moved back to the root before it is removed."""
    directory = os.path.join(UNIFIED, f"gttest-v2dev-{uuid.uuid4().hex[:8]}")
    os.mkdir(directory)
    prog_fd = attach_program(directory, rules)
    try:
        yield directory
    finally:
        os.close(prog_fd)
        with open(os.path.join(directory, "cgroup.procs"), encoding="ascii") as procs:
            left = procs.read().split()
        for pid in left:
            with contextlib.suppress(OSError):
                with open(os.path.join(UNIFIED, "cgroup.procs"), "w", encoding="ascii") as root:
                    root.write(pid)
        os.rmdir(directory)


def deny_major(major: int, style: str = "systemd") -> styles.RuleSet:
    """A policy that refuses every device of `major` and allows the others."""
    if style == "runc":
        return styles.RuleSet("runc", True, (styles.Rule(False, "c", major, None, "rwm"),))
    if style == "crun":
        return styles.RuleSet("crun", False, (styles.Rule(False, "c", major, None, "rwm"),
                                              styles.Rule(True, "a", None, None, "rwm")))
    # systemd only lists what is allowed: every char major but this one, and all blocks
    allowed = tuple(styles.Rule(True, "c", m, None, "rwm") for m in range(0, 256) if m != major)
    return styles.RuleSet("systemd", False, allowed[:40] + (styles.Rule(True, "b", None, None, "rwm"),))
