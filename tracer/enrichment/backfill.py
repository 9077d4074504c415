"""Fill credentials a sensor could not capture (audit has no groups, caps or
namespaces) from /proc while the process still lives.

Only fields the event lists in `missing` are touched; what was filled is
reported so the facts can say it was read live rather than captured.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from typing import Optional

from tracer.enrichment import procfs
from tracer.facts import SkipCounter
from tracer.enrichment.parse_proc import parse_status, status_hex, status_ints
from tracer.event import Event
from tracer.host import HostPaths

NS_GET_PARENT = 0xB702      # _IO(0xb7, 0x2)
NS_GET_OWNER_UID = 0xB704   # _IO(0xb7, 0x4)
_MAX_USERNS_DEPTH = 33      # the kernel allows 32 nested user namespaces


@dataclass(frozen=True)
class UsernsChain:
    inum: int        # the user namespace's inode
    level: int       # 0: the initial user namespace
    owner: int       # the uid that created it
    top_owner: int   # the uid that created its ancestor just below the initial one


def _owner_uid(ns_fd: int) -> int:
    return int.from_bytes(fcntl.ioctl(ns_fd, NS_GET_OWNER_UID, b"\0" * 4), "little")


def userns_chain(ns_path: str) -> Optional[UsernsChain]:
    """The user namespace at `ns_path` and its ancestors up to the initial one."""
    try:
        fd = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return userns_chain_of(fd)
    finally:
        os.close(fd)


def userns_chain_of(fd: int) -> Optional[UsernsChain]:
    """`userns_chain` of an open user namespace fd (not closed here)."""
    try:
        owners = [_owner_uid(fd)]  # from this namespace up to the initial one
        current = os.dup(fd)
        try:
            while len(owners) <= _MAX_USERNS_DEPTH:
                try:
                    parent = fcntl.ioctl(current, NS_GET_PARENT)
                except OSError:  # EPERM: no parent visible, this is the initial namespace
                    break
                os.close(current)
                current = parent
                owners.append(_owner_uid(current))
        finally:
            os.close(current)
        level = len(owners) - 1
        return UsernsChain(os.fstat(fd).st_ino, level, owners[0],
                           owners[-2] if level else owners[0])
    except OSError:
        return None


def userns_level_and_owner(ns_path: str) -> Optional[tuple[int, int]]:
    """Nesting level and creator uid of the user namespace at `ns_path`."""
    found = userns_chain(ns_path)
    return None if found is None else (found.level, found.owner)


def backfill_process(host: HostPaths, event: Event) -> list[str]:
    """Complete `event.process` from /proc for fields in `event.missing`."""
    missing = set(event.missing)
    proc = event.process
    text = procfs.read_text(host.proc_pid(proc.pid, "status")) if missing else None
    if text is None:  # nothing missing, or the process is gone
        return []
    filled: list[str] = []
    skips = SkipCounter()  # malformed lines are skipped; nothing here is worth reporting
    status = parse_status(text, skips)
    groups = status_ints(status, "Groups", skips)
    if "process.groups" in missing and groups is not None:
        proc.groups, proc.ngroups = groups, len(groups)
        filled += ["process.groups", "process.ngroups"]
    cap = status_hex(status, "CapEff", skips)
    if "process.cap_effective" in missing and cap is not None:
        proc.cap_effective = cap
        filled.append("process.cap_effective")
    nspid = status_ints(status, "NSpid", skips)
    if "process.ns_pid" in missing and nspid:
        proc.ns_pid = nspid[-1]
        filled.append("process.ns_pid")
    for name, attr in (("mnt", "mntns"), ("pid", "pidns"), ("cgroup", "cgroupns")):
        if f"process.{attr}" in missing:
            inum = procfs.ns_inum(procfs.read_link(host.proc_pid(proc.pid, "ns", name)))
            if inum:
                setattr(proc, attr, inum)
                filled.append(f"process.{attr}")
    if "process.userns" in missing:
        ns_path = host.proc_pid(proc.pid, "ns", "user")
        inum = procfs.ns_inum(procfs.read_link(ns_path))
        found = userns_level_and_owner(ns_path)
        if inum and found:
            proc.userns.inum = inum
            proc.userns.level, proc.userns.owner_uid = found
            filled.append("process.userns")
    event.missing = [m for m in event.missing if m not in filled]
    return filled
