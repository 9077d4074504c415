"""The denial event every stage of the pipeline passes along.

Sensors build `Event`s, enrichment attaches facts, the verdict stage attaches a
verdict, sinks render them.  `Event.to_json()` is the stable wire format (see
README "Event JSON"); `Event.from_json()` reads it back for `explain`/`report`.

Untrusted bytes (`comm`, paths) are kept as `bytes` here.  In JSON they become
a string when they are valid UTF-8; otherwise the string carries U+FFFD for the
bad bytes and a sibling `<key>_b64` field holds the exact bytes (base64).
"""

from __future__ import annotations

import base64
import datetime as _dt
import errno as _errno
from dataclasses import dataclass, field
from typing import Any, Optional

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
        return base64.b64decode(src[key + "_b64"], validate=True)
    value = src.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    return value.encode("utf-8")


@dataclass
class UserNs:
    inum: int = 0
    level: int = 0
    owner_uid: int = 0


@dataclass
class Process:
    pid: int
    tid: int
    ppid: int = 0
    comm: bytes = b""
    uid: int = 0
    gid: int = 0
    euid: int = 0
    egid: int = 0
    fsuid: int = 0
    fsgid: int = 0
    groups: list[int] = field(default_factory=list)
    ngroups: int = 0  # true count; `groups` holds at most 32
    cap_effective: int = 0
    userns: UserNs = field(default_factory=UserNs)
    mntns: int = 0
    pidns: int = 0
    cgroupns: int = 0
    cgroup_id: int = 0
    ns_pid: int = 0  # pid as seen inside its own pid namespace
    loginuid: Optional[int] = None
    sessionid: Optional[int] = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pid": self.pid, "tid": self.tid, "ppid": self.ppid,
        }
        put_bytes(out, "comm", self.comm)
        out.update({
            "uid": self.uid, "gid": self.gid, "euid": self.euid, "egid": self.egid,
            "fsuid": self.fsuid, "fsgid": self.fsgid,
            "groups": list(self.groups), "ngroups": self.ngroups,
            "cap_effective": f"{self.cap_effective:016x}",
            "userns": {"inum": self.userns.inum, "level": self.userns.level,
                       "owner_uid": self.userns.owner_uid},
            "mntns": self.mntns, "pidns": self.pidns, "cgroupns": self.cgroupns,
            "cgroup_id": self.cgroup_id, "ns_pid": self.ns_pid,
            "loginuid": self.loginuid, "sessionid": self.sessionid,
        })
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Process":
        uns = d.get("userns") or {}
        cap = d.get("cap_effective", 0)
        return cls(
            pid=int(d["pid"]), tid=int(d.get("tid", d["pid"])), ppid=int(d.get("ppid", 0)),
            comm=get_bytes(d, "comm") or b"",
            uid=int(d.get("uid", 0)), gid=int(d.get("gid", 0)),
            euid=int(d.get("euid", d.get("uid", 0))), egid=int(d.get("egid", d.get("gid", 0))),
            fsuid=int(d.get("fsuid", d.get("uid", 0))), fsgid=int(d.get("fsgid", d.get("gid", 0))),
            groups=[int(g) for g in d.get("groups", [])],
            ngroups=int(d.get("ngroups", len(d.get("groups", [])))),
            cap_effective=int(cap, 16) if isinstance(cap, str) else int(cap),
            userns=UserNs(int(uns.get("inum", 0)), int(uns.get("level", 0)),
                          int(uns.get("owner_uid", 0))),
            mntns=int(d.get("mntns", 0)), pidns=int(d.get("pidns", 0)),
            cgroupns=int(d.get("cgroupns", 0)), cgroup_id=int(d.get("cgroup_id", 0)),
            ns_pid=int(d.get("ns_pid", 0)),
            loginuid=d.get("loginuid"), sessionid=d.get("sessionid"),
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
        return cls(path=get_bytes(d, "path"), major=d.get("major"), minor=d.get("minor"),
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
    facts: dict[str, Any] = field(default_factory=dict)  # filled by enrichment
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
            out["facts"] = self.facts
        if self.verdict is not None:
            out["verdict"] = self.verdict
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Event":
        if not isinstance(d, dict):
            raise ValueError("event must be a JSON object")
        stamp = d["time"]
        if isinstance(stamp, (int, float)):
            when = float(stamp)
        else:
            when = _dt.datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
        err = d.get("errno_num", d.get("errno"))
        cmd = d.get("ioctl_cmd")
        return cls(
            time=when, sensor=str(d.get("sensor", "replay")), syscall=str(d["syscall"]),
            errno=errno_number(err) if err is not None else 0,
            process=Process.from_json(d["process"]), node=Node.from_json(d.get("node") or {}),
            kind=str(d.get("kind", "denial")), count=int(d.get("count", 1)),
            open_flags=d.get("open_flags"),
            ioctl_cmd=int(cmd, 16) if isinstance(cmd, str) else cmd,
            key=str(d.get("key", "")), missing=list(d.get("missing", [])),
            facts=dict(d.get("facts") or {}), verdict=d.get("verdict"),
        )
