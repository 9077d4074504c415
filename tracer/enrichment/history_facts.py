"""Facts from the access history: the device rules a process's cgroup started
with and every change since, and the calls that changed groups in its
container (or of the process itself, or its parent)."""

from __future__ import annotations

import os
import stat
from typing import Any, Optional

from tracer.enrichment import procfs
from tracer.enrichment.access_history import AccessHistory, v1_key, v2_key
from tracer.event import Event
from tracer.facts import CACHED, LIVE, Facts
from tracer.host import HostPaths
from tracer.sensors.access_change_records import GroupCall

MAX_CHANGES = 16
MAX_GROUP_CALLS = 8
CLOCK_SLACK_S = 0.05


def _v1_path(facts: Facts) -> Optional[str]:
    paths = facts.get("cgroup.paths")
    if not isinstance(paths, dict):
        return None
    found = next((str(p) for c, p in paths.items() if "devices" in str(c).split(",")), None)
    return found if found and found != "/" else None


def device_history_facts(history: AccessHistory, event: Event, facts: Facts) -> None:
    """device_cgroup.at_start (the rules each layer had when the container started)
    and device_cgroup.changes (every change seen since, oldest first)."""
    keys = []
    v1 = _v1_path(facts)
    if v1 is not None:
        keys.append(v1_key(v1))
    cgroup_id = facts.get("cgroup.id") or (event.process.cgroup_id
                                           if "process.cgroup_id" not in event.missing else 0)
    if isinstance(cgroup_id, int) and cgroup_id > 1:
        keys.append(v2_key(cgroup_id))
    starts, changes = [], []
    for key in keys:
        start = history.at_start(key)
        if start is not None:
            starts.append(start.to_json())
        changes += [c.to_json() for c in history.changes(key, event.time + CLOCK_SLACK_S)]
    origin = "gputrace's access history (container start; devices.list re-read on " \
             "inotify; bpf() calls recorded by the access-change probe, each v2 state as " \
             "the kernel held it at the call)"
    if starts:
        facts.put("device_cgroup.at_start", starts, CACHED, origin)
    if starts or changes:
        changes.sort(key=lambda c: c["time"])
        facts.put("device_cgroup.changes", changes[-MAX_CHANGES:], CACHED, origin)


def group_history_facts(history: AccessHistory, host: HostPaths, event: Event,
                        facts: Facts) -> None:
    """process.group_changes: set*gid calls by this process, by its parent, or by any
    process of its container (its own pid or mount namespace, not the host's)."""
    proc = event.process
    host_mnt = procfs.host_mount_namespace(host.proc)
    host_pid = procfs.ns_inum(procfs.read_link(host.proc_pid(1, "ns", "pid")))
    mntns = proc.mntns if "process.mntns" not in event.missing else 0
    pidns = proc.pidns if "process.pidns" not in event.missing else 0

    def ours(call: GroupCall) -> bool:
        if call.time > event.time + CLOCK_SLACK_S:
            return False
        who = call.caller
        if who.pid in (proc.pid, proc.ppid) and (not mntns or who.mntns == mntns):
            return True
        return (bool(pidns) and who.pidns == pidns and pidns != host_pid) or \
            (bool(mntns) and who.mntns == mntns and mntns != host_mnt)
    found = history.group_calls(ours)[-MAX_GROUP_CALLS:]
    if found:
        facts.put("process.group_changes", [call.to_json() for call in found], CACHED,
                  "set*gid calls recorded by the access-change probe")


def dev_char_facts(host: HostPaths, facts: Facts) -> None:
    """host.dev_char_link: does /dev/char/MAJOR:MINOR name the node?  systemd expresses a
    container's device rule through it and drops the rule when it is missing."""
    major, minor = facts.get("node.major"), facts.get("node.minor")
    if not isinstance(major, int) or not isinstance(minor, int) or facts.get("node.type") == "block":
        return
    link = os.path.join(host.dev, "char", f"{major}:{minor}")
    try:
        st = os.stat(link)
        exists = stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == major \
            and os.minor(st.st_rdev) == minor
    except OSError:
        exists = False
    facts.put("host.dev_char_link", {"path": f"/dev/char/{major}:{minor}", "exists": exists},
              LIVE, link)


def history_facts(history: Optional[AccessHistory], host: HostPaths, event: Event,
                  facts: Facts) -> None:
    if history is None:
        return
    device_history_facts(history, event, facts)
    group_history_facts(history, host, event, facts)
    if "device_cgroup.changes" in facts:
        dev_char_facts(host, facts)


def changes_of(facts: Facts) -> list[dict[str, Any]]:
    """The recorded changes, validated: a journal may hold anything."""
    value = facts.get("device_cgroup.changes")
    return [c for c in value if isinstance(c, dict)] if isinstance(value, list) else []
