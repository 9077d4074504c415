"""cgroup v2 device policy: the effective BPF_CGROUP_DEVICE programs of a cgroup.

From the cgroup id the kernel captured with the event (bpf_get_current_cgroup_id),
or the process's `0::/path` line, open the v2 cgroup, query its effective device
programs (own and inherited) and fetch each one's xlated instructions, name and
tag.  The programs vanish with the cgroup (a `--rm` container), so the container
tracker should call `snapshot_device_programs` when a container starts.

A failed bpf() call is never "no program attached": EPERM means gputrace may not
ask (BPF_PROG_QUERY needs CAP_NET_ADMIN or CAP_SYS_ADMIN, BPF_PROG_GET_FD_BY_ID
CAP_SYS_ADMIN, which the systemd unit does not grant; its BPF sensor reads the
programs at the denial instead, tracer/sensors/kernel_device_programs.py), and the
fact says so, with the capability.  Only ENOENT (detached since the query) skips.
"""

from __future__ import annotations

import errno
import os
from dataclasses import replace
from typing import Optional

from tracer.enrichment import bpf_syscall as bpf
from tracer.device_programs import DeviceProgram
from tracer.enrichment.device_rules import V2DevicePrograms
from tracer.facts import LIVE, Facts

MAX_EFFECTIVE = 64
MAX_RECORDED_INSN_BYTES = 64 << 10  # 8192 instructions; runtimes emit a few hundred


def read_device_programs(cgroup_fd: int, cgroup: str = "") -> V2DevicePrograms:
    """The effective device programs of the open cgroup `cgroup_fd` (raises OSError)."""
    programs = []
    for prog_id in bpf.prog_query(cgroup_fd, bpf.BPF_CGROUP_DEVICE, effective=True)[:MAX_EFFECTIVE]:
        try:
            fd = bpf.prog_get_fd_by_id(prog_id)
        except bpf.BpfCallFailed as exc:
            if exc.errno == errno.ENOENT:
                continue  # detached since the query: it no longer applies
            raise
        try:
            info = bpf.prog_info(fd)
        finally:
            os.close(fd)
        programs.append(DeviceProgram(info.id, info.name, info.tag, info.xlated))
    return V2DevicePrograms(tuple(programs), cgroup)


def open_v2_cgroup(mount: str, cgroup_id: Optional[int], path: Optional[str]) -> tuple[int, str]:
    """(fd, path under the mount) by id when known (exact even for an exited process),
    else by the `/proc/PID/cgroup` path."""
    if cgroup_id and cgroup_id >= 1:
        fd = bpf.open_cgroup_by_id(mount, cgroup_id)
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            where = f"cgroup id {cgroup_id}"
        return fd, where
    if path is None:
        raise FileNotFoundError("neither the cgroup id nor the cgroup path is known")
    full = os.path.join(mount, path.lstrip("/"))
    return os.open(full, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), full


def snapshot_device_programs(mount: str, cgroup_id: Optional[int] = None,
                             path: Optional[str] = None) -> Optional[V2DevicePrograms]:
    """The cgroup's effective device programs now, or None when they cannot be read."""
    try:
        fd, where = open_v2_cgroup(mount, cgroup_id, path)
    except OSError:
        return None
    try:
        return read_device_programs(fd, where)
    except OSError:
        return None
    finally:
        os.close(fd)


def _why(exc: OSError) -> str:
    """One line: what failed and, for EPERM, the capability it needs."""
    text = str(exc.strerror or exc)
    if isinstance(exc, bpf.BpfCallFailed) and exc.needs():
        return f"{text} ({exc.needs()}; the BPF sensor reads them at the denial without it)"
    return text


def device_program_facts(mount: str, cgroup_id: Optional[int], path: Optional[str],
                         facts: Facts) -> None:
    """device_cgroup.v2_programs (list of programs, JSON) and device_cgroup.v2_cgroup."""
    try:
        fd, where = open_v2_cgroup(mount, cgroup_id, path)
    except OSError as exc:
        facts.put("device_cgroup.v2_unreadable", f"cannot open the v2 cgroup: {_why(exc)}",
                  LIVE, mount)
        return
    facts.put("device_cgroup.v2_cgroup", where, LIVE,
              f"cgroup id {cgroup_id} (open_by_handle_at)" if cgroup_id else "/proc/PID/cgroup")
    try:
        found = read_device_programs(fd, where)
    except OSError as exc:
        facts.put("device_cgroup.v2_unreadable", f"its device programs could not be read: "
                  f"{_why(exc)}", LIVE, where)
        return
    finally:
        os.close(fd)
    origin = f"bpf(BPF_PROG_QUERY, effective) on {where}"
    # a program too large to carry with every event is named, and left undecided
    kept = [p if len(p.insns) <= MAX_RECORDED_INSN_BYTES else replace(p, insns=b"")
            for p in found.programs]
    facts.put("device_cgroup.v2_programs", [p.to_json() for p in kept], LIVE, origin)
