"""Facts about the process: credentials from the event, and what /proc says now.

Kernel-captured credentials are always present; /proc facts only while the
same process still lives (same pid *and* same user/mount namespace, so a
reused pid is not mistaken for it).
"""

from __future__ import annotations

from typing import Iterable, Optional

from tracer.enrichment import procfs
from tracer.facts import KERNEL, LIVE, Facts, SkipCounter
from tracer.in_root import read_in_root
from tracer.enrichment.parse_files import parse_group_file
from tracer.enrichment.id_map import IdMap
from tracer.enrichment.parse_proc import (parse_proc_cgroup, parse_status,
                                          status_hex, status_ints)
from tracer.event import Process
from tracer.host import HostPaths

MAX_ANCESTORS = 12


def kernel_facts(proc: Process, facts: Facts, missing: Iterable[str] = (),
                 read_live: Iterable[str] = ()) -> None:
    """Credentials the sensor captured with the event.  Fields the sensor could
    not provide (`missing`) are left out; those completed from /proc afterwards
    (`read_live`) are marked live."""
    absent, live = set(missing), set(read_live)

    def put(name: str, value: object) -> None:
        field = name if name.startswith("process.") else "process." + name.split(".")[0]
        if field in absent:
            return
        if field in live:
            facts.put(name, value, LIVE, "/proc (the sensor could not capture it)")
        else:
            facts.put(name, value, KERNEL, "event")

    put("process.pid", proc.pid)
    put("process.comm", proc.comm.decode("utf-8", "replace"))
    for name in ("uid", "gid", "euid", "egid", "fsuid", "fsgid", "ngroups",
                 "cgroup_id", "mntns", "pidns", "cgroupns", "ns_pid"):
        put(f"process.{name}", getattr(proc, name))
    put("process.groups", None if proc.groups is None else sorted(proc.groups))
    put("process.cap_effective", None if proc.cap_effective is None
        else f"{proc.cap_effective:016x}")
    put("userns.inum", proc.userns.inum)
    put("userns.level", proc.userns.level)
    put("userns.owner_uid", proc.userns.owner_uid)
    # seccomp state at the denial (None: not captured, put() skips it); its field name
    # is the one /proc/PID/status gives, so the verdict reads one fact either way
    put("process.seccomp", proc.seccomp_mode)
    put("process.seccomp_filters", proc.seccomp_filters)
    put("process.no_new_privs", proc.no_new_privs)
    if proc.cgroup_hierarchy is not None:  # named by the kernel at the denial
        facts.put_bytes("process.cgroup_leaf", proc.cgroup_leaf, KERNEL, "event")
        facts.put_bytes("process.cgroup_parent", proc.cgroup_parent, KERNEL, "event")
        facts.put("process.cgroup_hierarchy", proc.cgroup_hierarchy, KERNEL, "event")


def process_is_live(host: HostPaths, proc: Process) -> bool:
    """The pid still names this process: its namespaces match the event's."""
    for ns, want in (("user", proc.userns.inum), ("mnt", proc.mntns)):
        if not want:
            continue
        have = procfs.ns_inum(procfs.read_link(host.proc_pid(proc.pid, "ns", ns)))
        if have != want:
            return False
    return procfs.read_text(host.proc_pid(proc.pid, "status")) is not None


def live_status_facts(host: HostPaths, pid: int, facts: Facts) -> None:
    path = host.proc_pid(pid, "status")
    text = procfs.read_text(path)
    if text is None:
        return
    status = parse_status(text, facts.skips)
    nnp = status_ints(status, "NoNewPrivs", facts.skips)
    if nnp and "process.no_new_privs" not in facts:  # the kernel's capture wins
        facts.put("process.no_new_privs", bool(nnp[0]), LIVE, path)
    cap = status_hex(status, "CapEff", facts.skips)
    if cap is not None:
        facts.put("process.cap_effective_live", f"{cap:016x}", LIVE, path)
    groups = status_ints(status, "Groups", facts.skips)
    if groups is not None:
        facts.put("process.groups_in_ns", groups, LIVE, path)
    if "process.seccomp" in facts:
        return  # the kernel's capture at the denial wins over /proc now
    if "Seccomp" in status:
        facts.put("process.seccomp", status["Seccomp"], LIVE, path)
    filters = status_ints(status, "Seccomp_filters", facts.skips)
    if filters:
        facts.put("process.seccomp_filters", filters[0], LIVE, path)


def groups_facts(host: HostPaths, pid: int, facts: Facts, name: str) -> None:
    """The supplementary groups /proc/PID/status shows (kernel ids, as the initial
    user namespace reads them) as fact `name`."""
    path = host.proc_pid(pid, "status")
    text = procfs.read_text(path)
    if text is None:
        return
    groups = status_ints(parse_status(text, facts.skips), "Groups", facts.skips)
    if groups is not None:
        facts.put(name, sorted(groups), LIVE, path)


def userns_facts(host: HostPaths, pid: int, facts: Facts) -> None:
    """uid_map, gid_map, setgroups and the container's /etc/group: shared by the userns."""
    for name in ("uid_map", "gid_map"):
        path = host.proc_pid(pid, name)
        text = procfs.read_text(path)
        if text is not None:
            facts.put(f"userns.{name}", IdMap.parse(text, facts.skips, name).rows(), LIVE, path)
    path = host.proc_pid(pid, "setgroups")
    text = procfs.read_text(path)
    if text is not None and text.strip() in ("allow", "deny"):
        facts.put("userns.setgroups", text.strip(), LIVE, path)
    elif text is not None:
        facts.skips.skip("setgroups:bad_value")


def container_root_facts(host: HostPaths, pid: int, facts: Facts) -> None:
    """The container's own /etc/group, read inside its root."""
    root = host.proc_pid(pid, "root")
    text = read_in_root(root, "/etc/group")
    if text is None:
        return
    groups = parse_group_file(text, facts.skips)
    facts.put("container.etc_group", {g.name: g.gid for g in groups}, LIVE,
              host.proc_pid(pid, "root/etc/group"))


def lsm_facts(host: HostPaths, pid: int, facts: Facts) -> None:
    path = host.proc_pid(pid, "attr/current")
    text = procfs.read_text(path)
    if text:
        label = text.rstrip("\0\n").strip()
        if label:
            facts.put("process.lsm_label", label, LIVE, path)


PF_EXITING = 0x4  # include/linux/sched.h: set at the start of do_exit()


def task_exited(host: HostPaths, pid: int) -> bool:
    """The task has exited or is exiting (PF_EXITING set, a zombie not yet reaped, or
    gone), from /proc/PID/stat."""
    return stat_says_exiting(procfs.read_text(host.proc_pid(pid, "stat"), 4096))


def stat_says_exiting(stat: Optional[str]) -> bool:
    """/proc/PID/stat text (None: unreadable) of a task that has begun to exit.

    The kernel shows an exiting task in the root of every v1 hierarchy as soon as
    PF_EXITING is set, at the start of do_exit(), well before `State:` says Z: a
    SIGKILLed process freeing 3 GiB read 1,553 times as `devices:/` with State R,
    once with Z (measured on this kernel).  So the flags word decides, not the state."""
    if stat is None:
        return True
    fields = stat.rpartition(")")[2].split()  # comm may hold ')' and spaces
    if len(fields) < 7 or not fields[6].isdigit():
        return True
    return fields[0] in ("Z", "X", "x") or bool(int(fields[6]) & PF_EXITING)


def status_says_exited(status: Optional[str]) -> bool:
    """/proc/PID/status text (None: unreadable) of a task that has exited: its State
    only (a zombie), which an exiting task reaches last."""
    if status is None:
        return True
    state = status.partition("\nState:")[2].split(None, 1)[:1]
    return not state or state[0] in ("Z", "X", "x")


def status_groups(status: str, skips: SkipCounter) -> Optional[list[int]]:
    """The `Groups:` line of /proc/PID/status text (kernel ids)."""
    line = status.partition("\nGroups:")[2].partition("\n")[0]
    if not line and "\nGroups:" not in status:
        return None
    return status_ints({"Groups": line.strip()}, "Groups", skips)


def cgroup_paths(text: str, stat: Optional[str], status: Optional[str],
                 skips: SkipCounter) -> tuple[dict[str, str], bool]:
    """(cgroup.paths, exited) from /proc/PID/cgroup text and the /proc/PID/stat and
    status texts read after it.  A task that has begun to exit (PF_EXITING, then a
    zombie) shows `/` for every v1 hierarchy (its v2 line stays right), so the v1
    lines of a task that was exiting when they were read are left out: the root's
    devices.list is not the container's (measured on this kernel).  Without a stat
    file (a /proc that lacks it, as a fixture tree may) only `State:` can say so."""
    # read after: once set, PF_EXITING stays
    exited = stat_says_exiting(stat) if stat is not None else status_says_exited(status)
    return {",".join(ln.controllers) or "unified": ln.path
            for ln in parse_proc_cgroup(text, skips) if not (exited and ln.controllers)}, exited


def cgroup_facts(host: HostPaths, pid: int, facts: Facts) -> None:
    """cgroup.paths from /proc/PID/cgroup (`cgroup_paths`)."""
    path = host.proc_pid(pid, "cgroup")
    text = procfs.read_text(path)
    if text is None:
        return
    paths, exited = cgroup_paths(text, procfs.read_text(host.proc_pid(pid, "stat"), 4096),
                                 procfs.read_text(host.proc_pid(pid, "status"), 4096),
                                 facts.skips)
    if paths:
        facts.put("cgroup.paths", paths, LIVE,
                  path + (" (task had exited: v1 lines not its own)" if exited else ""))


def container_env(host: HostPaths, pid: int) -> Optional[str]:
    """The `container=` variable engines put in the container's environment."""
    raw = procfs.read_bytes(host.proc_pid(pid, "environ"))
    for item in (raw or b"").split(b"\0"):
        if item.startswith(b"container="):
            return item[len(b"container="):].decode("utf-8", "replace")
    return None


def ancestors(host: HostPaths, pid: int, skips: SkipCounter) -> list[dict[str, object]]:
    """The process's parents up to init: pid, comm and argv of each."""
    out: list[dict[str, object]] = []
    seen = {pid}
    current = pid
    for _ in range(MAX_ANCESTORS):
        text = procfs.read_text(host.proc_pid(current, "status"))
        if text is None:
            break
        ppid = status_ints(parse_status(text, skips), "PPid", skips)
        if not ppid or ppid[0] in seen or ppid[0] <= 0:
            break
        current = ppid[0]
        seen.add(current)
        comm = (procfs.read_text(host.proc_pid(current, "comm")) or "").strip()
        argv_raw = procfs.read_bytes(host.proc_pid(current, "cmdline"), 64 << 10) or b""
        argv = [a.decode("utf-8", "replace") for a in argv_raw.split(b"\0") if a]
        out.append({"pid": current, "comm": comm, "argv": argv})
    return out
