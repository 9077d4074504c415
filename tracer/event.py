"""The denial event every stage of the pipeline passes along.

Sensors build `Event`s and may add facts, enrichment adds its facts beside them, the verdict stage attaches a
verdict, sinks render them.  `Event.to_json()` is the stable wire format (see
README "Event JSON"); `Event.from_json()` reads it back for `explain`/`report`.

Untrusted bytes (`comm`, paths) are kept as `bytes` here.  In JSON they become
a string when they are valid UTF-8; otherwise the string carries U+FFFD for the
bad bytes and a sibling `<key>_b64` field holds the exact bytes (base64).
"""

from __future__ import annotations

import base64
import re
import datetime as _dt
import errno as _errno
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from tracer.facts import Facts

SCHEMA_VERSION = 1


def errno_name(num: int) -> str:
    return _errno.errorcode.get(num, f"E{num}")


def errno_number(name: str | int) -> int:
    if isinstance(name, int):
        return name
    if name.isdigit():
        return int(name)
    value = getattr(_errno, name.upper(), None)
    if not isinstance(value, int):
        raise ValueError(f"unknown errno name {name!r}")
    return value


def put_bytes(out: dict[str, Any], key: str, raw: Optional[bytes]) -> None:
    """Store untrusted bytes losslessly (documented convention above)."""
    if raw is None:
        out[key] = None
        return
    try:
        out[key] = raw.decode("utf-8")
    except UnicodeDecodeError:
        out[key] = raw.decode("utf-8", "replace")
        out[key + "_b64"] = base64.b64encode(raw).decode("ascii")


def get_bytes(src: dict[str, Any], key: str) -> Optional[bytes]:
    if src.get(key + "_b64") is not None:
        if not isinstance(src[key + "_b64"], str):
            raise ValueError(f"{key}_b64 must be a string")
        return base64.b64decode(src[key + "_b64"], validate=True)
    value = src.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    return value.encode("utf-8")


# Reading JSON back (`from_json`): recorded files travel, so every field is
# checked here and a bad one raises ValueError/TypeError/KeyError, the errors
# explain_records and the journal reader count; nothing else may escape.
MAX_EVENT_TIME = 253402214400.0  # 9999-12-30: every sink can still print the date
SYSCALL_NAME = re.compile(r"[A-Za-z0-9_?]{0,32}")
EVENT_KINDS = ("denial", "update", "node")


def _int(value: Any, name: str) -> int:
    """An integer field: JSON int, integral float or decimal string (never bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{name} must be an integer")
    if isinstance(value, float) and not value.is_integer():  # also NaN and infinities
        raise ValueError(f"{name} must be an integer")
    return int(value)


def _opt_int(value: Any, name: str) -> Optional[int]:
    return None if value is None else _int(value, name)


def _opt_bool(value: Any, name: str) -> Optional[bool]:
    if value is None or isinstance(value, bool):
        return value
    raise TypeError(f"{name} must be true, false or null")


def _hex(value: Any, name: str) -> int:
    """A hex string field ("0x1f" or "1f") or an integer."""
    number = int(value, 16) if isinstance(value, str) else _int(value, name)
    if number < 0:
        raise ValueError(f"{name} must not be negative")
    return number


def _obj(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a JSON object")
    return value


def _epoch(stamp: Any) -> float:
    if isinstance(stamp, (int, float)) and not isinstance(stamp, bool):
        when = float(stamp)
    elif isinstance(stamp, str):
        try:
            when = _dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        except (OverflowError, OSError) as exc:
            raise ValueError(f"time {stamp[:40]!r} is out of range") from exc
    else:
        raise TypeError("time must be a number or an ISO 8601 string")
    if not 0.0 <= when < MAX_EVENT_TIME:  # also rejects NaN
        raise ValueError("time is out of range")
    return when


CGROUP_HIERARCHIES = ("v2", "v1 devices")


def _cgroup_hierarchy(value: Any) -> Optional[str]:
    if value is None or value in CGROUP_HIERARCHIES:
        return value
    raise ValueError(f"process.cgroup_hierarchy must be one of {CGROUP_HIERARCHIES} or null")


@dataclass
class UserNs:
    inum: Optional[int] = None  # None: the sensor could not know (audit)
    level: Optional[int] = None
    owner_uid: Optional[int] = None


# Fields a sensor cannot know are None (JSON null), never a default: a missing fsuid
# is not root, missing groups are not "no groups".  `Event.missing` names them too.
ID_FIELDS = ("uid", "gid", "euid", "egid", "fsuid", "fsgid")
NS_FIELDS = ("mntns", "pidns", "cgroupns", "cgroup_id", "ns_pid")
# `missing` entries of journals written before unknown fields were null -> the fields
MISSING_FIELDS = {"process.tid": ("tid",), "process.groups": ("groups",),
                  "process.ngroups": ("ngroups",), "process.cap_effective": ("cap_effective",),
                  "process.credentials": ID_FIELDS + ("groups", "ngroups", "cap_effective"),
                  **{f"process.{name}": (name,) for name in NS_FIELDS}}


@dataclass
class Process:
    pid: int
    tid: Optional[int] = None
    ppid: Optional[int] = None
    comm: bytes = b""
    uid: Optional[int] = None
    gid: Optional[int] = None
    euid: Optional[int] = None
    egid: Optional[int] = None
    fsuid: Optional[int] = None
    fsgid: Optional[int] = None
    # ascending, as the kernel keeps them; the lowest MAX_GROUPS when `ngroups` is larger
    groups: Optional[list[int]] = None
    ngroups: Optional[int] = None  # the true count
    cap_effective: Optional[int] = None
    userns: UserNs = field(default_factory=UserNs)
    mntns: Optional[int] = None
    pidns: Optional[int] = None
    cgroupns: Optional[int] = None
    cgroup_id: Optional[int] = None
    ns_pid: Optional[int] = None  # pid as seen inside its own pid namespace
    loginuid: Optional[int] = None
    sessionid: Optional[int] = None
    # task->seccomp at the denial (BPF sensor): 0 off, 1 strict, 2 filter; None: not captured
    seccomp_mode: Optional[int] = None
    seccomp_filters: Optional[int] = None
    # task no_new_privs at the denial (BPF sensor); None: not captured
    no_new_privs: Optional[bool] = None
    # the task's own cgroup directory and its parent's, by name, at the denial (BPF
    # sensor): `cgroup_hierarchy` "v2", or "v1 devices" where the v2 cgroup was the
    # root; None: not captured (or the task sat at the root)
    cgroup_leaf: Optional[bytes] = None
    cgroup_parent: Optional[bytes] = None
    cgroup_hierarchy: Optional[str] = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pid": self.pid, "tid": self.tid, "ppid": self.ppid,
        }
        put_bytes(out, "comm", self.comm)
        out.update({
            "uid": self.uid, "gid": self.gid, "euid": self.euid, "egid": self.egid,
            "fsuid": self.fsuid, "fsgid": self.fsgid,
            "groups": None if self.groups is None else list(self.groups), "ngroups": self.ngroups,
            "cap_effective": None if self.cap_effective is None else f"{self.cap_effective:016x}",
            "userns": {"inum": self.userns.inum, "level": self.userns.level,
                       "owner_uid": self.userns.owner_uid},
            "mntns": self.mntns, "pidns": self.pidns, "cgroupns": self.cgroupns,
            "cgroup_id": self.cgroup_id, "ns_pid": self.ns_pid,
            "loginuid": self.loginuid, "sessionid": self.sessionid,
        })
        if self.seccomp_mode is not None:  # additive: absent when the sensor did not capture it
            out["seccomp_mode"] = self.seccomp_mode
            out["seccomp_filters"] = self.seccomp_filters
        if self.no_new_privs is not None:  # additive, like seccomp
            out["no_new_privs"] = self.no_new_privs
        if self.cgroup_hierarchy is not None:  # additive, like seccomp
            put_bytes(out, "cgroup_leaf", self.cgroup_leaf)
            put_bytes(out, "cgroup_parent", self.cgroup_parent)
            out["cgroup_hierarchy"] = self.cgroup_hierarchy
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any], missing: Iterable[str] = ()) -> "Process":
        """A key that is absent or null is unknown (None), never a default.  `missing`:
        the event's list of fields its sensor could not provide (journals written
        before those fields were null held 0 or [] there)."""
        d = _obj(d, "process")
        uns = _obj(d.get("userns") or {}, "process.userns")
        groups = d.get("groups")
        if groups is not None and not isinstance(groups, list):
            raise TypeError("process.groups must be a list")
        unknown = {f for m in missing for f in MISSING_FIELDS.get(m, ())}

        def num(key: str) -> Optional[int]:
            return None if key in unknown else _opt_int(d.get(key), f"process.{key}")

        def ns(key: str) -> Optional[int]:
            if "process.userns" in missing:
                return None
            return _opt_int(uns.get(key), f"process.userns.{key}")
        cap = d.get("cap_effective")
        return cls(
            pid=_int(d["pid"], "process.pid"), tid=num("tid"), ppid=num("ppid"),
            comm=get_bytes(d, "comm") or b"",
            **{name: num(name) for name in ID_FIELDS},
            groups=None if groups is None or "groups" in unknown
            else [_int(g, "process.groups") for g in groups],
            ngroups=num("ngroups"),
            cap_effective=None if cap is None or "cap_effective" in unknown
            else _hex(cap, "process.cap_effective"),
            userns=UserNs(ns("inum"), ns("level"), ns("owner_uid")),
            **{name: num(name) for name in NS_FIELDS},
            loginuid=_opt_int(d.get("loginuid"), "process.loginuid"),
            sessionid=_opt_int(d.get("sessionid"), "process.sessionid"),
            seccomp_mode=_opt_int(d.get("seccomp_mode"), "process.seccomp_mode"),
            seccomp_filters=_opt_int(d.get("seccomp_filters"), "process.seccomp_filters"),
            no_new_privs=_opt_bool(d.get("no_new_privs"), "process.no_new_privs"),
            cgroup_leaf=get_bytes(d, "cgroup_leaf"), cgroup_parent=get_bytes(d, "cgroup_parent"),
            cgroup_hierarchy=_cgroup_hierarchy(d.get("cgroup_hierarchy")),
        )


@dataclass
class Node:
    path: Optional[bytes] = None  # absolute when the sensor could resolve it
    major: Optional[int] = None
    minor: Optional[int] = None
    path_as_given: Optional[bytes] = None  # what the process passed, when relative
    path_truncated: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        put_bytes(out, "path", self.path)
        out["major"] = self.major
        out["minor"] = self.minor
        if self.path_as_given is not None:
            put_bytes(out, "path_as_given", self.path_as_given)
        out["path_truncated"] = self.path_truncated
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Node":
        d = _obj(d, "node")
        return cls(path=get_bytes(d, "path"), major=_opt_int(d.get("major"), "node.major"),
                   minor=_opt_int(d.get("minor"), "node.minor"),
                   path_as_given=get_bytes(d, "path_as_given"),
                   path_truncated=bool(d.get("path_truncated", False)))


@dataclass
class Event:
    """One denial (kind "denial") or a later count update for it (kind "update")."""

    time: float  # seconds since the epoch
    sensor: str
    syscall: str
    errno: int
    process: Process
    node: Node
    kind: str = "denial"
    count: int = 1  # denials folded into this event so far (exact)
    open_flags: Optional[int] = None
    ioctl_cmd: Optional[int] = None
    key: str = ""  # aggregation key: same key, same (process, node, errno)
    missing: list[str] = field(default_factory=list)  # fields this sensor cannot provide
    facts: Facts = field(default_factory=Facts)  # sensor's, then enrichment's; one shape
    verdict: Optional[dict[str, Any]] = None  # filled by the verdict stage

    @property
    def errno_name(self) -> str:
        return errno_name(self.errno)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "time": _dt.datetime.fromtimestamp(self.time, _dt.timezone.utc)
            .isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "kind": self.kind,
            "sensor": self.sensor,
            "syscall": self.syscall,
            "errno": self.errno_name if self.errno else None,
            "errno_num": self.errno,
            "count": self.count,
            "key": self.key,
            "process": self.process.to_json(),
            "node": self.node.to_json(),
        }
        if self.open_flags is not None:
            out["open_flags"] = self.open_flags
        if self.ioctl_cmd is not None:
            out["ioctl_cmd"] = f"0x{self.ioctl_cmd:08x}"
        if self.missing:
            out["missing"] = list(self.missing)
        if self.facts:
            out["facts"] = self.facts.to_json()
        if self.verdict is not None:
            out["verdict"] = self.verdict
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Event":
        if not isinstance(d, dict):
            raise ValueError("event must be a JSON object")
        err = d.get("errno_num", d.get("errno"))
        if isinstance(err, (float, bool)):
            err = _int(err, "errno")
        if err is not None and not isinstance(err, (int, str)):
            raise TypeError("errno must be a name or a number")
        syscall, kind = d["syscall"], d.get("kind", "denial")
        if not isinstance(syscall, str) or not SYSCALL_NAME.fullmatch(syscall):
            raise ValueError("syscall must be a syscall name")
        if kind not in EVENT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(EVENT_KINDS)}")
        cmd, missing = d.get("ioctl_cmd"), d.get("missing", [])
        if not isinstance(missing, list) or not all(isinstance(m, str) for m in missing):
            raise TypeError("missing must be a list of strings")
        verdict = d.get("verdict")
        if verdict is not None:
            verdict = _obj(verdict, "verdict")
        return cls(
            time=_epoch(d["time"]), sensor=str(d.get("sensor", "replay")), syscall=syscall,
            errno=errno_number(err) if err is not None else 0,
            process=Process.from_json(d["process"], missing),
            node=Node.from_json(d.get("node") or {}),
            kind=kind, count=_int(d.get("count", 1), "count"),
            open_flags=_opt_int(d.get("open_flags"), "open_flags"),
            ioctl_cmd=None if cmd is None else _hex(cmd, "ioctl_cmd"),
            key=str(d.get("key", "")), missing=list(missing),
            facts=Facts.from_json(d.get("facts") or {}), verdict=verdict,
        )
