"""When the refused process's groups were fixed: it, its parent and its session
leader, and when the group file last changed.

Supplementary groups are set at login (initgroups) and inherited by every
process of the session; a user added to a group later gets it only in a new
session.  So "the user is in the group in /etc/group but the process is not"
is told by comparing /etc/group's modification time with the start of the
session the process belongs to.  Only processes still alive can be read;
their start time guards against a reused pid.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

from tracer.enrichment import procfs
from tracer.enrichment.parse_proc import (parse_boot_time, parse_proc_stat, parse_status,
                                          status_ints)
from tracer.event import Event
from tracer.facts import LIVE, Facts
from tracer.host import HostPaths

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def boot_time(host: HostPaths, facts: Facts) -> Optional[float]:
    """Epoch seconds at boot: from /proc/uptime on the live host (10 ms), else btime (1 s)."""
    if os.path.realpath(host.proc) == "/proc":
        text = procfs.read_text("/proc/uptime")
        try:
            return time.time() - float((text or "").split()[0])
        except (ValueError, IndexError):
            pass
    return parse_boot_time(procfs.read_text(os.path.join(host.proc, "stat")) or "", facts.skips)


def _process(host: HostPaths, pid: int, boot: float, facts: Facts) -> Optional[dict[str, Any]]:
    """pid, comm, start (epoch), session id, real uid and groups of a live process."""
    stat = parse_proc_stat(procfs.read_text(host.proc_pid(pid, "stat")) or "", facts.skips)
    status = procfs.read_text(host.proc_pid(pid, "status"))
    if stat is None or status is None:
        return None
    fields = parse_status(status, facts.skips)
    groups = status_ints(fields, "Groups", facts.skips)
    uids = status_ints(fields, "Uid", facts.skips)
    return {"pid": pid, "comm": stat.comm, "started": round(boot + stat.start_ticks / TICKS, 3),
            "session": stat.session, "ppid": stat.ppid, "uid": uids[0] if uids else None,
            "groups": sorted(groups) if groups is not None else None}


def session_facts(host: HostPaths, event: Event, live: bool, facts: Facts) -> None:
    """process.started, process.parent, process.session_leader (each while alive and
    started before the refusal) and host.etc_group_changed."""
    group_file = os.path.join(host.etc, "group")
    try:
        facts.put("host.etc_group_changed", os.stat(group_file).st_mtime, LIVE,
                  f"stat {group_file} (mtime)")
    except OSError:
        pass
    boot = boot_time(host, facts)
    if boot is None:
        return
    proc = event.process
    me = _process(host, proc.pid, boot, facts) if live else None
    if me is not None:
        facts.put("process.started", me["started"], LIVE, host.proc_pid(proc.pid, "stat"))
    ppid = proc.ppid or 0  # None: the sensor did not give it
    parent = _process(host, ppid, boot, facts) if ppid > 0 else None
    if parent is not None and parent["started"] <= event.time:
        facts.put("process.parent", parent, LIVE, host.proc_pid(ppid, "stat"))
    else:
        parent = None
    session = (me or parent or {}).get("session")
    if session and session > 0:
        leader = _process(host, int(session), boot, facts)
        if leader is not None and leader["started"] <= event.time:
            facts.put("process.session_leader", leader, LIVE, host.proc_pid(int(session), "stat"))
