"""The records bpf/access_changes.bpf.c sends (struct chg_event), decoded.

Two kinds of call: a `bpf()` call that attached, replaced or detached a cgroup
device program (`DeviceProgramCall`, with the target cgroup's effective programs
before and after it as the kernel held them), and a set*gid call that changed a
process's groups (`GroupCall`).  Each names its caller as the kernel saw it
(`Caller`: pid, comm, parent, cgroup, namespaces).  A third record carries one
device program's instructions (`DevProgRecord`, the denial probe's record), sent
once per program id before the first call naming it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Optional, Union

from tracer.facts import lossy_text
from tracer.sensors.bpf_constants import (BPF_CMD_NAMES, BPF_F_ALLOW_MULTI, BPF_F_REPLACE,
                                          CHG_CALL_NAMES, CHG_F_PROGS_AFTER, CHG_F_PROGS_BEFORE,
                                          CHG_KIND_DEVICE_PROGRAM, CHG_KIND_GROUPS,
                                          CHG_KIND_PROGRAM, CHG_MAX_GROUPS, MAX_DEV_PROGS)
from tracer.sensors.bpf_event import DecodeError, DevProgRecord, decode_dev_prog

# Mirrors struct chg_event; the C side asserts sizeof() == CHG_EVENT_SIZE.
_LAYOUT = struct.Struct("<IIIIQqQIIII16s16s" "IIIIII" "Q" "IIII" f"{MAX_DEV_PROGS}I{MAX_DEV_PROGS}I"
                        "I" "IIIIII" "II" f"{CHG_MAX_GROUPS}I{CHG_MAX_GROUPS}I" "I")
CHG_EVENT_SIZE = _LAYOUT.size


class ChangeDecodeError(ValueError):
    """A record that is not a chg_event; `reason` is a bounded label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Caller:
    """Who made a call, as the kernel recorded it at the call."""

    pid: int
    tid: int
    comm: str
    ppid: int
    parent_comm: str
    uid: int
    cgroup_id: int
    mntns: int
    pidns: int
    pid_level: int   # 0: the host's pid namespace

    def label(self) -> str:
        return f"{self.comm} (pid {self.pid}, parent {self.parent_comm} pid {self.ppid})"

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "comm": self.comm, "ppid": self.ppid,
                "parent_comm": self.parent_comm, "uid": self.uid}


@dataclass(frozen=True)
class DeviceProgramCall:
    """bpf(BPF_PROG_ATTACH|BPF_PROG_DETACH|BPF_LINK_CREATE) for BPF_CGROUP_DEVICE."""

    time: float          # epoch seconds
    caller: Caller
    cmd: str             # BPF_PROG_ATTACH | BPF_PROG_DETACH | BPF_LINK_CREATE
    flags: int
    prog_id: int         # 0: not given (a detach of whatever is attached)
    replace_prog_id: int
    target_cgroup: int   # the target cgroup's id (its directory's inode number)
    ret: int             # the syscall's result: 0 or more is success
    # the target cgroup's effective device programs (ids, in the kernel's order) just
    # before and just after the call, read in the kernel; None: not read (or more
    # than MAX_DEV_PROGS), and `after` only for a call that succeeded
    before_ids: Optional[tuple[int, ...]] = None
    after_ids: Optional[tuple[int, ...]] = None

    def how(self) -> str:
        """The call in words: `bpf(BPF_PROG_ATTACH, program 41 replacing 37, multi)`."""
        what = f"program {self.prog_id}" if self.prog_id else "the attached program"
        if self.replace_prog_id:
            what += f" replacing {self.replace_prog_id}"
        mode = ", multi" if self.flags & BPF_F_ALLOW_MULTI else ""
        return f"bpf({self.cmd}, {what}{mode})"


@dataclass(frozen=True)
class GroupCreds:
    gid: int
    egid: int
    fsgid: int
    groups: tuple[int, ...]   # at most CHG_MAX_GROUPS, the kernel's sorted order
    ngroups: int              # the true count

    def holds(self, gid: int) -> bool:
        return gid in (self.gid, self.egid, self.fsgid) or gid in self.groups

    def to_json(self) -> dict[str, Any]:
        return {"gid": self.gid, "egid": self.egid, "fsgid": self.fsgid,
                "groups": list(self.groups), "ngroups": self.ngroups}


@dataclass(frozen=True)
class GroupCall:
    """A successful setgroups/setgid/setregid/setresgid: the groups before and after."""

    time: float
    caller: Caller
    call: str
    before: GroupCreds
    after: GroupCreds

    def dropped(self, gid: int) -> bool:
        """Did this call take `gid` away (held before, not after)?  False when the
        capture was cut at CHG_MAX_GROUPS on either side and cannot show it."""
        cut = self.before.ngroups > len(self.before.groups) or \
            self.after.ngroups > len(self.after.groups)
        return self.before.holds(gid) and not self.after.holds(gid) and not cut

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "call": self.call, "by": self.caller.to_json(),
                "before": self.before.to_json(), "after": self.after.to_json()}


ChangeRecord = Union[DeviceProgramCall, GroupCall, DevProgRecord]


def _ids(read: int, count: int, ids: tuple[int, ...]) -> Optional[tuple[int, ...]]:
    """A program list the kernel read; None when it did not, or it held more."""
    return tuple(ids[:count]) if read and count <= MAX_DEV_PROGS else None


def _text(raw: bytes) -> str:
    return lossy_text(raw.split(b"\0", 1)[0])


def decode_change(raw: bytes, clock_offset: float) -> ChangeRecord:
    """One record; `clock_offset` turns the kernel's monotonic ns into epoch seconds."""
    if len(raw) >= 4 and struct.unpack_from("<I", raw)[0] == CHG_KIND_PROGRAM:
        try:
            return decode_dev_prog(raw)
        except DecodeError as exc:
            raise ChangeDecodeError(exc.reason) from None
    if len(raw) < CHG_EVENT_SIZE:
        raise ChangeDecodeError("short_record")
    f = _LAYOUT.unpack_from(raw)
    (kind, tgid, tid, ppid, ts_ns, ret, cgroup_id, uid, mntns, pidns, level, comm, pcomm,
     cmd, _attach_type, flags, prog_id, replace_id, _prog_type, target,
     known, n_before, n_after, _pad) = f[:24]
    ids_before = f[24:24 + MAX_DEV_PROGS]
    ids_after = f[24 + MAX_DEV_PROGS:24 + 2 * MAX_DEV_PROGS]
    rest = 24 + 2 * MAX_DEV_PROGS
    (call, gid_b, egid_b, fsgid_b, gid_a, egid_a, fsgid_a, ng_b, ng_a) = f[rest:rest + 9]
    groups_b = f[rest + 9:rest + 9 + CHG_MAX_GROUPS]
    groups_a = f[rest + 9 + CHG_MAX_GROUPS:rest + 9 + 2 * CHG_MAX_GROUPS]
    caller = Caller(tgid, tid, _text(comm), ppid, _text(pcomm), uid, cgroup_id, mntns, pidns,
                    level)
    when = ts_ns / 1e9 + clock_offset
    if kind == CHG_KIND_DEVICE_PROGRAM:
        if cmd not in BPF_CMD_NAMES:
            raise ChangeDecodeError("bad_command")
        return DeviceProgramCall(when, caller, BPF_CMD_NAMES[cmd], flags, prog_id,
                                 replace_id if flags & BPF_F_REPLACE else 0, target, ret,
                                 _ids(known & CHG_F_PROGS_BEFORE, n_before, ids_before),
                                 _ids(known & CHG_F_PROGS_AFTER, n_after, ids_after))
    if kind == CHG_KIND_GROUPS:
        if call not in CHG_CALL_NAMES:
            raise ChangeDecodeError("bad_call")
        before = GroupCreds(gid_b, egid_b, fsgid_b, tuple(groups_b[:min(ng_b, CHG_MAX_GROUPS)]), ng_b)
        after = GroupCreds(gid_a, egid_a, fsgid_a, tuple(groups_a[:min(ng_a, CHG_MAX_GROUPS)]), ng_a)
        return GroupCall(when, caller, CHG_CALL_NAMES[call], before, after)
    raise ChangeDecodeError("bad_kind")
