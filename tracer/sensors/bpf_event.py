"""Decode the raw records bpf/gputrace.bpf.c sends: struct gpu_event (a denial or a
count update) and struct dev_prog_record (a cgroup device program's instructions)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tracer.event import Event, Node, Process, UserNs
from tracer.facts import SENSOR
from tracer.sensors.bpf_constants import (
    CGROUP_NAME_CAP, EV_DENIAL, EV_DEV_PROG, EV_UPDATE, F_CANDIDATE, F_CGROUP_NAMED, F_CGROUP_V1,
    F_DEV_PROGS_KNOWN, F_DEV_VALID, F_DIR_UNRESOLVED, F_NNP_KNOWN, F_NO_NEW_PRIVS, F_REEMITTED,
    F_RELATIVE, F_SECCOMP_KNOWN, F_TRUNCATED, F_UNAGGREGATED, MAX_DEV_PROGS, MAX_GROUPS,
    MAX_PROG_INSNS, PATH_CAP, SYSCALL_NAMES, TARGET_CANDIDATE)

__all__ = ["EV_DENIAL", "EV_DEV_PROG", "EV_UPDATE", "F_CANDIDATE", "F_DEV_PROGS_KNOWN",
           "F_DEV_VALID", "F_DIR_UNRESOLVED", "F_REEMITTED", "F_RELATIVE", "F_SECCOMP_KNOWN",
           "F_TRUNCATED", "F_UNAGGREGATED", "F_CGROUP_NAMED", "F_CGROUP_V1", "MAX_DEV_PROGS",
           "MAX_GROUPS", "MAX_PROG_INSNS"]

# Mirrors struct gpu_event up to its variable tail (groups, min(ngroups, MAX_GROUPS)
# of them); the C side asserts offsetof(groups) == EVENT_GROUPS_OFFSET.
_HEADER = "IIiIIIQQIHHQ"
_BODY = ("QQQQII" "IIIIII" "I" "III" "IIII" "II" "II" "iI" f"I{MAX_DEV_PROGS}I" "16s"
         f"{PATH_CAP}s" f"{PATH_CAP}s" f"{CGROUP_NAME_CAP}s" f"{CGROUP_NAME_CAP}s")
HEADER = struct.Struct("<" + _HEADER)
FULL = struct.Struct("<" + _HEADER + _BODY)  # the fixed part; the groups follow
EVENT_GROUPS_OFFSET = FULL.size
EVENT_MAX_SIZE = FULL.size + 4 * MAX_GROUPS
UPDATE_SIZE = HEADER.size
# Mirrors struct dev_prog_record up to its instructions (`copied` of them follow).
DEV_PROG = struct.Struct("<IIIIII8s16s")


class DecodeError(ValueError):
    """A record that is not a gpu_event; `reason` is a bounded label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class AggKey:
    tgid: int
    sys: int
    err: int
    target: int

    @property
    def candidate(self) -> bool:
        """An open outside the GPU prefixes, kept only if its path is a GPU node."""
        return self.sys != 5 and bool(self.target & TARGET_CANDIDATE)

    def label(self) -> str:
        return f"{self.tgid}:{self.sys}:{self.err}:{self.target:016x}"


@dataclass
class Update:
    key: AggKey
    count: int
    ts_ns: int


@dataclass(frozen=True)
class Denial:
    """A full event and its aggregation key, typed (`event.key` is its label).
    `dev_prog_ids`: the refused task's effective cgroup v2 device programs, read in
    the kernel at the denial (None: not read; more than MAX_DEV_PROGS: `dev_progs_over`)."""

    key: AggKey
    event: Event
    dev_prog_ids: "tuple[int, ...] | None" = None
    dev_progs_over: bool = False


@dataclass(frozen=True)
class DevProgRecord:
    """A device program's instructions as the kernel holds them (xlated)."""

    id: int
    type: int
    name: str
    tag: str
    insns: bytes
    truncated: bool  # longer than MAX_PROG_INSNS: only the first ones were copied


def dev_major(dev: int) -> int:
    return dev >> 20


def dev_minor(dev: int) -> int:
    return dev & 0xFFFFF


def _cstr(raw: bytes) -> bytes:
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def decode_dev_prog(data: bytes) -> DevProgRecord:
    if len(data) < DEV_PROG.size:
        raise DecodeError("short_record")
    _kind, prog_id, prog_type, length, copied, _pad, tag, name = DEV_PROG.unpack_from(data)
    if copied > min(length, MAX_PROG_INSNS) or len(data) < DEV_PROG.size + 8 * copied:
        raise DecodeError("bad_dev_prog")
    insns = data[DEV_PROG.size:DEV_PROG.size + 8 * copied]
    return DevProgRecord(prog_id, prog_type, _cstr(name).decode("ascii", "replace"), tag.hex(),
                         insns, copied < length)


def decode(data: bytes, clock_offset: float) -> "Denial | Update | DevProgRecord":
    """`clock_offset` turns the kernel's CLOCK_MONOTONIC ns into epoch seconds."""
    if len(data) >= 4 and struct.unpack_from("<I", data)[0] == EV_DEV_PROG:
        return decode_dev_prog(data)
    if len(data) < UPDATE_SIZE:
        raise DecodeError("short_record")
    head = HEADER.unpack_from(data)
    kind, sys_id, err, tgid, tid, _ppid, ts_ns, count, k_tgid, k_sys, k_err, k_target = head
    key = AggKey(k_tgid, k_sys, k_err, k_target)
    if sys_id not in SYSCALL_NAMES:
        raise DecodeError("bad_syscall")
    if kind == EV_UPDATE:
        return Update(key=key, count=count, ts_ns=ts_ns)
    if kind != EV_DENIAL:
        raise DecodeError("bad_kind")
    if len(data) < FULL.size:
        raise DecodeError("short_record")
    f = FULL.unpack_from(data)
    (cgroup_id, devices_cgroup_id, flags_or_cmd, cap_eff, dev, path_flags, uid, gid, euid, egid,
     fsuid, fsgid, ngroups, uns_inum, uns_level, uns_owner, mntns, pidns, cgroupns, ns_pid,
     loginuid, sessionid, seccomp_mode, seccomp_filters, _dirfd, path_len, prog_count) = f[12:39]
    prog_ids = f[39:39 + MAX_DEV_PROGS]
    comm, path_field, given, leaf, parent = (
        _cstr(v) for v in f[39 + MAX_DEV_PROGS:44 + MAX_DEV_PROGS])
    copied = min(ngroups, MAX_GROUPS)
    if len(data) < FULL.size + 4 * copied:  # (a perf buffer may pad the record: >= )
        raise DecodeError("short_record")
    groups = list(struct.unpack_from(f"<{copied}I", data, FULL.size))
    raw_path = path_field[:path_len] if path_len else path_field
    flags = path_flags
    named = bool(flags & F_CGROUP_NAMED)
    cgroup_leaf = leaf if named else None
    cgroup_parent = parent if named else None
    syscall = SYSCALL_NAMES[sys_id]

    node = Node(path=raw_path or None, path_truncated=bool(flags & F_TRUNCATED))
    if given and given != raw_path:  # relative, or spelt with //, . or ..
        node.path_as_given = given
    if flags & F_DEV_VALID:
        node.major, node.minor = dev_major(dev), dev_minor(dev)
    process = Process(
        pid=tgid, tid=tid, ppid=_ppid, comm=comm, uid=uid, gid=gid, euid=euid, egid=egid,
        fsuid=fsuid, fsgid=fsgid, groups=groups, ngroups=ngroups, cap_effective=cap_eff,
        userns=UserNs(inum=uns_inum, level=uns_level, owner_uid=uns_owner),
        mntns=mntns, pidns=pidns, cgroupns=cgroupns, cgroup_id=cgroup_id, ns_pid=ns_pid,
        loginuid=None if loginuid == 0xFFFFFFFF else loginuid,
        sessionid=None if sessionid == 0xFFFFFFFF else sessionid,
        seccomp_mode=seccomp_mode if flags & F_SECCOMP_KNOWN else None,
        seccomp_filters=seccomp_filters if flags & F_SECCOMP_KNOWN else None,
        no_new_privs=bool(flags & F_NO_NEW_PRIVS) if flags & F_NNP_KNOWN else None,
        cgroup_leaf=cgroup_leaf or None, cgroup_parent=cgroup_parent if named else None,
        cgroup_hierarchy=("v1 devices" if flags & F_CGROUP_V1 else "v2") if named else None,
    )
    event = Event(
        time=clock_offset + ts_ns / 1e9, sensor="bpf", syscall=syscall, errno=err,
        process=process, node=node, count=count, key=key.label(),
        open_flags=None if syscall == "ioctl" else flags_or_cmd,
        ioctl_cmd=flags_or_cmd if syscall == "ioctl" else None,
    )
    if devices_cgroup_id:
        event.facts.put("sensor.devices_cgroup_id", devices_cgroup_id, SENSOR,
                        "the task's cgroup in the v1 devices hierarchy, read at the denial")
    if flags & F_UNAGGREGATED:
        event.facts.put("sensor.unaggregated", True, SENSOR, "BPF event flag: table full")
    if flags & F_DIR_UNRESOLVED:
        event.facts.put("sensor.path_unresolved", True, SENSOR,
                        "BPF event flag: directory fd not resolved")
    if flags & F_DEV_PROGS_KNOWN:
        return Denial(key, event, tuple(prog_ids[:min(prog_count, MAX_DEV_PROGS)]),
                      prog_count > MAX_DEV_PROGS)
    return Denial(key, event)
