"""A container's init, read the moment its runtime has made it (the snapshot,
container_snapshot.py): namespace keys, user namespace (level, owner, id maps),
LSM label, cgroups, supplementary groups, and its root's /etc/group and
/etc/passwd.

Everything is read through one descriptor of the init's /proc/PID directory:
once that task is reaped, reads through it fail, so a pid reused while we read
gives nothing rather than another process's facts.  A container churns at tens
a second, so the work per start is kept small without taking any fact from
elsewhere: the host's own user namespace (every rootful container's) is the
same namespace for as long as the host runs, so its level, owner and id maps
are read once, from that namespace; an image's /etc files are read each time
and only the parse of a text seen before is skipped (parse_files.TextMemo).
"""

from __future__ import annotations

import os
from typing import Optional

from tracer.enrichment import procfs
from tracer.enrichment.backfill import UsernsChain, userns_chain_of
from tracer.enrichment.container_store import ContainerSnapshot
from tracer.enrichment.id_map import IdMap
from tracer.enrichment.parse_files import TextMemo, parse_group_file, parse_passwd_file
from tracer.enrichment.process import cgroup_paths, status_groups
from tracer.facts import LIVE, Facts, SkipCounter
from tracer.host import HostPaths
from tracer.in_root import read_in_root_fd

MAX_ETC_ENTRIES = 256
DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
STATUS_BYTES = 4096  # up to `Groups:` and far past it
TEXT_BYTES = 64 << 10  # any other /proc/PID file read here (13 cgroup lines of long paths)
NS_KEYS = {"mnt": "mntns", "pid": "pidns", "user": "userns"}


class ProcDir:
    """Reads under one process's /proc/PID, through a descriptor of that directory."""

    def __init__(self, host: HostPaths, pid: "int | str") -> None:
        self.where = os.path.join(host.proc, str(pid))
        try:
            self.fd: Optional[int] = os.open(self.where, DIR_FLAGS)
        except OSError:
            self.fd = None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def path(self, name: str) -> str:
        return os.path.join(self.where, name)

    def open(self, name: str, flags: int) -> Optional[int]:
        if self.fd is None:
            return None
        try:
            return os.open(name, flags | os.O_CLOEXEC, dir_fd=self.fd)
        except OSError:
            return None

    def text(self, name: str, limit: int = TEXT_BYTES) -> Optional[str]:
        fd = self.open(name, os.O_RDONLY | os.O_NOCTTY)
        if fd is None:
            return None
        try:  # /proc files of one process: one read holds them whole (or up to limit)
            data = os.read(fd, limit)
            while data and len(data) < limit:
                more = os.read(fd, limit - len(data))
                if not more:
                    break
                data += more
            return data.decode("utf-8", "replace")
        except OSError:
            return None
        finally:
            os.close(fd)

    def link(self, name: str) -> Optional[str]:
        if self.fd is None:
            return None
        try:
            return os.readlink(name, dir_fd=self.fd)
        except OSError:
            return None


def _etc_pairs(parse: str) -> TextMemo[tuple[tuple[str, int], ...]]:
    def pairs(text: str, skips: SkipCounter) -> tuple[tuple[str, int], ...]:
        if parse == "group":
            return tuple((g.name, g.gid) for g in parse_group_file(text, skips)[:MAX_ETC_ENTRIES])
        return tuple((u.name, u.uid) for u in parse_passwd_file(text, skips)[:MAX_ETC_ENTRIES])
    return TextMemo(pairs)


# an image's /etc/group and /etc/passwd as {name: id}, by their text
ETC_TABLES = {"group": _etc_pairs("group"), "passwd": _etc_pairs("passwd")}


def etc_table(text: Optional[str], name: str, facts: Facts) -> Optional[dict[str, int]]:
    return None if text is None else dict(ETC_TABLES[name](text, facts.skips))


class HostUserns:
    """The host's user namespaces (PID 1's, ours): they live as long as we run, so
    what belongs to the namespace itself (its place in the chain, its id maps and
    setgroups) is read once, from that namespace, and holds for every process in it."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int], tuple[UsernsChain, list[tuple[str, object, str]]]] = {}

    def get(self, host: HostPaths, inum: int) -> Optional[tuple[UsernsChain, list[tuple[str, object, str]]]]:
        if inum not in procfs.host_namespaces(host.proc, "user"):
            return None
        known = self._known.get((host.proc, inum))
        if known is not None:
            return known
        for pid in ("1", "self"):
            member = ProcDir(host, pid)
            try:
                if procfs.ns_inum(member.link("ns/user")) != inum:
                    continue
                chain = _chain(member)
                if chain is None:
                    return None
                whose = "PID 1's" if pid == "1" else "gputrace's own"
                maps = [(n, v, f"{o} ({whose}: the host's user namespace user:[{inum}], the "
                         "container's init is in it too)") for n, v, o in _id_maps(member, Facts())]
                found = (chain, maps)
                if procfs.is_live_proc(host.proc):
                    self._known[(host.proc, inum)] = found
                return found
            finally:
                member.close()
        return None


HOST_USERNS = HostUserns()


def _chain(proc: ProcDir) -> Optional[UsernsChain]:
    fd = proc.open("ns/user", os.O_RDONLY)
    if fd is None:
        return None
    try:
        return userns_chain_of(fd)
    finally:
        os.close(fd)


def _id_maps(proc: ProcDir, facts: Facts) -> list[tuple[str, object, str]]:
    """uid_map, gid_map and setgroups: the user namespace's own (userns_facts' reading)."""
    out: list[tuple[str, object, str]] = []
    for name in ("uid_map", "gid_map"):
        text = proc.text(name)
        if text is not None:
            out.append((f"userns.{name}", IdMap.parse(text, facts.skips, name).rows(),
                        proc.path(name)))
    text = proc.text("setgroups")
    if text is not None and text.strip() in ("allow", "deny"):
        out.append(("userns.setgroups", text.strip(), proc.path("setgroups")))
    elif text is not None:
        facts.skips.skip("setgroups:bad_value")
    return out


def read_init(host: HostPaths, pid: int, snap: ContainerSnapshot, live: Facts) -> bool:
    """The init's facts: namespace keys and user namespace into `snap`, the rest into
    `live`.  True when the init's root could be looked in (its /etc files are then
    its own word, present or not)."""
    proc = ProcDir(host, pid)
    try:
        user_inum = None
        for kind, attr in NS_KEYS.items():
            inum = procfs.ns_inum(proc.link(f"ns/{kind}"))
            if kind == "user":
                user_inum = inum
            if inum in procfs.host_namespaces(host.proc, kind):
                # --pid=host and the like: every host process has it, so it is no key
                # to this container (a host process would be taken for the container)
                snap.put(f"container.host_{kind}ns", True, f"/proc/{pid}/ns/{kind} is the host's")
                inum = None
            setattr(snap, attr, inum)
        shared = HOST_USERNS.get(host, user_inum) if user_inum else None
        chain = shared[0] if shared is not None else _chain(proc)
        if chain is not None:
            where = f"/proc/{pid}/ns/user" + (" (the host's)" if shared is not None else "")
            snap.put("userns.level", chain.level, where)
            snap.put("userns.owner_uid", chain.owner, where)
            snap.put("container.rootless", chain.level > 0 and chain.owner != 0,
                     "userns level and owner")
            if chain.level == 0:
                snap.userns = None  # the initial userns is everyone's: not a container key
        for name, value, origin in (shared[1] if shared is not None else _id_maps(proc, live)):
            live.put(name, [list(row) for row in value] if isinstance(value, list) else value,
                     LIVE, origin)  # a list of our own: facts are never shared
        label = (proc.text("attr/current") or "").rstrip("\0\n").strip()
        if label:
            live.put("process.lsm_label", label, LIVE, proc.path("attr/current"))
        _cgroups_and_groups(proc, live)
        return _etc_tables(proc, pid, live)
    finally:
        proc.close()


def _cgroups_and_groups(proc: ProcDir, live: Facts) -> None:
    text = proc.text("cgroup")
    if text is None:
        return
    # after the cgroups: had it begun to exit (PF_EXITING) when they were read?
    stat, status = proc.text("stat", STATUS_BYTES), proc.text("status", STATUS_BYTES)
    paths, exited = cgroup_paths(text, stat, status, live.skips)
    if paths:
        live.put("cgroup.paths", paths, LIVE, proc.path("cgroup")
                 + (" (task had exited: v1 lines not its own)" if exited else ""))
    groups = status_groups(status, live.skips) if status is not None else None
    if groups is not None:
        live.put("container.init_groups", sorted(groups), LIVE, proc.path("status"))


def _etc_tables(proc: ProcDir, pid: int, live: Facts) -> bool:
    root = proc.open("root", DIR_FLAGS)
    if root is None:
        return False
    try:
        for name in ("group", "passwd"):
            table = etc_table(read_in_root_fd(root, "/etc/" + name), name, live)
            if table is not None:
                live.put(f"container.etc_{name}", table, LIVE, f"/proc/{pid}/root/etc/{name}")
        return True
    finally:
        os.close(root)
