"""Grouped audit records -> `tracer.event.Event`, keeping only GPU nodes.

Audit gives the initial-namespace ids of the task (uid, gid, euid, suid, fsuid,
egid, sgid, fsgid, auid, ses), pid and ppid, comm, exe, the syscall's return
value and raw arguments, and for each path the name as passed, the inode's
mode, owner, group and rdev.  It does not give what `AUDIT_MISSING` lists.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional

from tracer.event import Event, Node, Process
from tracer.facts import SENSOR, Facts
from tracer.host import HostPaths
from tracer.sensors.audit_marshal import (AUDIT_CWD, AUDIT_LANDLOCK_ACCESS, AUDIT_LANDLOCK_DOMAIN,
                                          AUDIT_PATH, AUDIT_PROCTITLE, AUDIT_SYSCALL)
from tracer.sensors.audit_records import (LANDLOCK_RECORD_TYPES, AuditEventRecords, AuditRecord,
                                          RecordError)
from tracer.sensors.audit_rules import ARCHES
from tracer.sensors.gpu_nodes import GpuNodeSet, discover, mkdev

AUDIT_MISSING = ["process.tid", "process.groups", "process.ngroups", "process.cap_effective",
                 "process.userns", "process.mntns", "process.pidns", "process.cgroupns",
                 "process.cgroup_id", "process.ns_pid"]
UNSET_ID = 0xFFFFFFFF  # auid/ses of a task that never logged in
AT_FDCWD = 0xFFFFFF9C  # -100 as the kernel prints a0 (hex, 32 bit)
O_WRONLY, O_CREAT, O_TRUNC = 0o1, 0o100, 0o1000
WATCHED_ERRNOS = frozenset({errno.EACCES, errno.EPERM})

SYSCALL_NAMES: dict[int, dict[int, str]] = {
    arch.audit_arch: {nr: name for name, nr in arch.syscalls.items()} for arch in ARCHES.values()}


@dataclass
class GpuNodeFilter:
    """The BPF sensor's notion of a GPU node (tracer.sensors.gpu_nodes), applied here
    in userspace because audit cannot filter on rdev or path prefixes."""

    nodes: GpuNodeSet

    @classmethod
    def discover(cls, host: HostPaths, extra_prefixes: tuple[str, ...] = ()) -> "GpuNodeFilter":
        return cls(discover(host.proc, host.dev, extra_prefixes=extra_prefixes))

    def matches(self, node: Node) -> bool:
        if node.major is not None:
            if node.major in self.nodes.majors:
                return True
            if node.minor is not None and mkdev(node.major, node.minor) in self.nodes.exact:
                return True
        prefixes = tuple(os.fsencode(p) for p in self.nodes.prefixes)
        return any(p is not None and p.startswith(prefixes)
                   for p in (node.path, node.path_as_given))


@dataclass
class EventMapper:
    """Maps one grouped event; `dropped` counts the bounded reasons it did not.

    The rule key is not a filter: the kernel tags an event with the key of the
    first matching exit rule, and rules of other owners that were added before
    ours win (ours are appended, so their keys stay as their owners expect)."""

    host: HostPaths
    gpu: GpuNodeFilter
    dropped: dict[str, int] = field(default_factory=dict)

    def map(self, group: AuditEventRecords) -> Optional[Event]:
        syscalls = group.of_type(AUDIT_SYSCALL)
        if not syscalls and all(r.type in LANDLOCK_RECORD_TYPES for r in group.records):
            # a Landlock domain freed, or a denial in a syscall no rule of ours audits
            return self._drop("landlock_without_syscall")
        if not syscalls:
            raise RecordError("no_syscall_record", f"serial {group.serial}")
        sc = syscalls[0]
        arch = sc.number("arch", 16)
        nr = sc.number("syscall")
        name = SYSCALL_NAMES.get(arch, {}).get(nr)
        if name is None:
            return self._drop("unwatched_syscall")
        ret = sc.number("exit")
        if -ret not in WATCHED_ERRNOS:
            return self._drop("other_result")
        process = process_from(sc)
        args = [sc.number(f"a{i}", 16) if sc.get(f"a{i}") else 0 for i in range(4)]
        node, facts = self._node(group, sc, name, args)
        if name == "ioctl" and node.path is None:
            return self._drop("ioctl_fd_unresolved")  # the process closed it or exited
        if not self.gpu.matches(node):
            return self._drop("not_gpu_node")
        facts.update(task_facts(sc, group))
        missing = list(AUDIT_MISSING) + (["open_flags"] if name == "openat2" else [])
        return Event(time=group.time, sensor="audit", syscall=name, errno=-ret,
                     process=process, node=node, open_flags=open_flags(name, args),
                     ioctl_cmd=args[1] if name == "ioctl" else None,
                     missing=missing, facts=audit_facts(facts))

    def _drop(self, reason: str) -> Optional[Event]:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        return None

    def _node(self, group: AuditEventRecords, sc: AuditRecord, name: str,
              args: list[int]) -> tuple[Node, dict[str, object]]:
        if name == "ioctl":
            return self._ioctl_node(sc.number("pid"), args[0])
        paths = group.of_type(AUDIT_PATH)
        if len(paths) < sc.number("items"):
            raise RecordError("missing_path_record", f"serial {group.serial}")
        item = chosen_path_item(paths)
        if item is None:
            return Node(), {}
        given = item.get("name")
        node = Node(path=given)
        if given is not None and not given.startswith(b"/"):
            node.path_as_given = given
            node.path = self._resolve_relative(group, sc, name, args[0], given)
        facts: dict[str, object] = {}
        for key in ("inode", "dev", "mode", "ouid", "ogid", "rdev", "nametype"):
            raw = item.get(key)
            if raw is not None:
                facts[key] = raw.decode("ascii", "replace")
        rdev = item.get("rdev")
        if rdev is not None and b":" in rdev:
            major, minor = rdev.split(b":", 1)
            try:
                node.major, node.minor = int(major, 16), int(minor, 16)
            except ValueError:
                raise RecordError("bad_number", f"rdev={rdev!r}") from None
        return node, facts

    def _resolve_relative(self, group: AuditEventRecords, sc: AuditRecord, name: str,
                          dirfd: int, given: bytes) -> Optional[bytes]:
        if name in ("open", "creat") or dirfd == AT_FDCWD:
            cwds = group.of_type(AUDIT_CWD)
            base = cwds[0].get("cwd") if cwds else None
        else:
            base = self._fd_target(sc.number("pid"), dirfd)
        return os.path.normpath(os.path.join(base, given)) if base else None

    def _fd_target(self, pid: int, fd: int) -> Optional[bytes]:
        """Where a live process's fd points; None once the process or fd is gone."""
        try:
            return os.readlink(os.fsencode(self.host.proc_pid(pid, "fd", str(fd))))
        except OSError:
            return None

    def _ioctl_node(self, pid: int, fd: int) -> tuple[Node, dict[str, object]]:
        link = self.host.proc_pid(pid, "fd", str(fd))
        target = self._fd_target(pid, fd)
        node = Node(path=target)
        facts: dict[str, object] = {"fd": fd, "path_from": "proc_fd"}
        try:
            st = os.stat(link)
        except OSError:
            return node, facts
        if st.st_rdev:
            node.major, node.minor = os.major(st.st_rdev), os.minor(st.st_rdev)
            facts.update(mode=st.st_mode, ouid=st.st_uid, ogid=st.st_gid)
        return node, facts


def chosen_path_item(items: Iterable[AuditRecord]) -> Optional[AuditRecord]:
    """The opened object: the last item that is not the parent directory."""
    chosen = None
    for item in items:
        if item.get("nametype") != b"PARENT":
            chosen = item
    return chosen


def process_from(sc: AuditRecord) -> Process:
    pid = sc.number("pid")
    auid, ses = sc.number("auid"), sc.number("ses")
    return Process(  # what audit cannot know stays None (JSON null): see AUDIT_MISSING
        pid=pid, ppid=sc.number("ppid"), comm=sc.get("comm") or b"",
        uid=sc.number("uid"), gid=sc.number("gid"), euid=sc.number("euid"),
        egid=sc.number("egid"), fsuid=sc.number("fsuid"), fsgid=sc.number("fsgid"),
        loginuid=None if auid == UNSET_ID else auid,
        sessionid=None if ses == UNSET_ID else ses)


def open_flags(name: str, args: list[int]) -> Optional[int]:
    if name == "open":
        return args[1]
    if name == "openat":
        return args[2]
    if name == "creat":
        return O_CREAT | O_WRONLY | O_TRUNC
    return None


# audit record field -> the record it came from (facts "audit.<field>")
AUDIT_FACT_ORIGINS = {
    **{key: "audit PATH record" for key in ("inode", "dev", "mode", "ouid", "ogid", "rdev",
                                            "nametype")},
    "cwd": "audit CWD record", "proctitle": "audit PROCTITLE record",
    **{key: "audit LANDLOCK_ACCESS record" for key in ("landlock_domain", "landlock_blockers",
                                                       "landlock_path")},
    "landlock_mode": "audit LANDLOCK_DOMAIN record",
    "fd": "/proc/PID/fd of the live process", "path_from": "/proc/PID/fd of the live process",
}
OCTAL_FIELDS = ("mode",)
DECIMAL_FIELDS = ("inode", "ouid", "ogid", "suid", "sgid", "auid", "ses")


def audit_facts(raw: dict[str, object]) -> Facts:
    """The audit fields as typed sensor facts `audit.<field>` (numbers as ints;
    a field the kernel wrote in an unexpected form stays text)."""
    facts = Facts()
    for key, value in raw.items():
        if isinstance(value, str) and key in OCTAL_FIELDS + DECIMAL_FIELDS:
            try:
                value = int(value, 8 if key in OCTAL_FIELDS else 10)
            except ValueError:
                pass
        origin = AUDIT_FACT_ORIGINS.get(key, "audit SYSCALL record")
        if isinstance(value, bytes):  # a path: text when UTF-8, else U+FFFD + audit.<key>_b64
            facts.put_bytes(f"audit.{key}", value, SENSOR, origin)
        else:
            facts.put(f"audit.{key}", value, SENSOR, origin)
    return facts


def task_facts(sc: AuditRecord, group: AuditEventRecords) -> dict[str, object]:
    """What audit adds beyond the Event fields: sensor facts "audit.<field>"."""
    facts: dict[str, object] = {"serial": group.serial, "complete": group.ended}
    keys = sc.get("key")
    if keys is not None:
        facts["keys"] = [k.decode("utf-8", "replace") for k in keys.split(b"\x01")]
    for key in ("suid", "sgid", "auid", "ses", "tty", "subj"):
        raw = sc.get(key)
        if raw is not None:
            facts[key] = raw.decode("ascii", "replace")
    exe = sc.get("exe")
    if exe is not None:
        facts["exe"] = exe  # bytes: audit_facts keeps them losslessly
    cwds = group.of_type(AUDIT_CWD)
    if cwds and cwds[0].get("cwd") is not None:
        facts["cwd"] = cwds[0].get("cwd") or b""
    titles = group.of_type(AUDIT_PROCTITLE)
    if titles and titles[0].get("proctitle") is not None:
        argv = (titles[0].get("proctitle") or b"").split(b"\0")
        facts["proctitle"] = [arg.decode("utf-8", "replace") for arg in argv]
    facts.update(landlock_facts(group))
    return facts


def landlock_facts(group: AuditEventRecords) -> dict[str, object]:
    """Landlock's own word on this syscall (Linux 6.15+, audit on): the domain that
    refused and the access rights it blocked (`fs.read_file`, `fs.write_file`, ...)."""
    denials = group.of_type(AUDIT_LANDLOCK_ACCESS)
    if not denials:
        return {}
    denial = denials[0]
    out: dict[str, object] = {}
    domain, blockers = denial.get("domain"), denial.get("blockers")
    if domain is not None:
        out["landlock_domain"] = domain.decode("ascii", "replace")
    out["landlock_blockers"] = [b.decode("ascii", "replace")
                                for b in (blockers or b"").split(b",") if b]
    if denial.get("path") is not None:
        out["landlock_path"] = denial.get("path")  # bytes: kept losslessly
    for record in group.of_type(AUDIT_LANDLOCK_DOMAIN):
        if record.get("domain") == domain and record.get("mode") is not None:
            out["landlock_mode"] = (record.get("mode") or b"").decode("ascii", "replace")
    return out
