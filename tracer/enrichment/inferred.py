"""Facts a sensor could not capture, inferred from others, each labelled as inferred.

The audit sensor gives ids, pid and ppid but no groups, capabilities or namespaces,
and the process has usually exited.  What can honestly be said instead, each with
the rule in the fact's origin (source `inferred`), and nothing else:

* the container of a process that was not its init: the parent, or a live ancestor
  of the parent started before the refusal, was the container's init;
* a host process: its live parent (started before the refusal) runs in the host's
  mount and user namespaces, and no container claims the process;
* its groups: inherited from the container's init (OCI additionalGids), or the login
  groups /etc/group gives its user on the host;
* its capabilities: none, when its uid, euid, suid and fsuid are all non-zero in its
  own user namespace (execve clears them, unless file or ambient capabilities);
* rootless podman that does not keep groups holds no gid unmapped in its namespace.

The verdict lowers its confidence where a cause rests on inferred groups.
"""

from __future__ import annotations

import os
from typing import Optional

from tracer.enrichment import procfs
from tracer.enrichment.backfill import userns_level_and_owner
from tracer.enrichment.id_map import IdMap
from tracer.enrichment.parse_proc import parse_status, status_ints
from tracer.event import Event
from tracer.facts import INFERRED, Facts, SkipCounter
from tracer.host import HostPaths

MAX_LINEAGE = 12
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _started_at(host: HostPaths, pid: int) -> Optional[float]:
    """When `pid` started (epoch seconds), from /proc/PID/stat and the boot time."""
    stat = procfs.read_text(host.proc_pid(pid, "stat"))
    boot = procfs.read_text(os.path.join(host.proc, "stat"))
    if stat is None or boot is None or ")" not in stat:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    btime = next((line.split()[1] for line in boot.splitlines() if line.startswith("btime ")), None)
    if len(fields) < 20 or btime is None or not fields[19].isdigit() or not btime.isdigit():
        return None
    return int(btime) + int(fields[19]) / CLOCK_TICKS


def _parent_of(host: HostPaths, pid: int) -> Optional[int]:
    text = procfs.read_text(host.proc_pid(pid, "status"))
    if text is None:
        return None
    skips = SkipCounter()
    ppid = status_ints(parse_status(text, skips), "PPid", skips)
    return ppid[0] if ppid and ppid[0] > 0 else None


def live_lineage(host: HostPaths, ppid: Optional[int], when: float) -> list[int]:
    """The event's parent and its ancestors, while alive and started before the
    refusal (a pid reused since is not the parent)."""
    out: list[int] = []
    current = ppid
    while current and len(out) < MAX_LINEAGE and current not in out:
        started = _started_at(host, current)
        if started is None or started > when + 1.0:  # 1 s: boot time is whole seconds
            break
        out.append(current)
        current = _parent_of(host, current)
    return out


def host_process_by_parent(host: HostPaths, ppid: Optional[int], when: float) -> Optional[str]:
    """Why the process is taken for a host process, when its live parent is one."""
    lineage = live_lineage(host, ppid, when)
    if not lineage:
        return None
    parent = lineage[0]
    host_mnt = procfs.host_mount_namespace(host.proc)
    mnt = procfs.ns_inum(procfs.read_link(host.proc_pid(parent, "ns", "mnt")))
    userns = userns_level_and_owner(host.proc_pid(parent, "ns", "user"))
    if host_mnt is None or mnt != host_mnt or userns is None or userns[0] != 0:
        return None
    return (f"inferred: its parent (pid {parent}, alive, started before the refusal) runs in "
            f"the host's mount and user namespaces, and no container claims the process")


def groups_from_init(facts: Facts, how: str) -> None:
    """The runtime gave the container's init the OCI config's additionalGids (mapped to
    kernel ids through the container's gid_map); a child inherits them."""
    oci = facts.get("container.oci")
    user = oci.get("user") if isinstance(oci, dict) else None
    if not isinstance(user, dict) or not isinstance(user.get("additional_gids"), list):
        return
    rows = facts.get("userns.gid_map")
    id_map = IdMap.from_rows(rows) if rows else None
    groups = []
    for gid in user["additional_gids"]:
        kernel = id_map.to_outside(int(gid)) if id_map is not None else int(gid)
        if kernel is None:
            return  # an unmapped group: the runtime could not have given it as listed
        groups.append(kernel)
    if how.startswith("pid "):
        origin = "OCI process.user.additionalGids of the container's init (this process)"
    else:
        origin = (f"OCI process.user.additionalGids of the container's init, inherited ({how}); "
                  "a process that changed its groups (setgroups, su, gosu) would differ")
    facts.put("process.groups", sorted(set(groups)), INFERRED, origin)


def login_groups(facts: Facts) -> None:
    """A host process whose groups were not captured: the groups a login of its user
    gets from /etc/group (a session older than a group change, or a process that
    changed its groups, would differ)."""
    if "process.groups" in facts or facts.get("process.host_process") is not True:
        return
    groups, name = facts.get("host.user_groups"), facts.get("host.user_name")
    if isinstance(groups, list) and name:
        facts.put("process.groups", sorted(set(groups)), INFERRED,
                  f"the login groups /etc/group gives {name} (audit cannot capture the "
                  "process's own; a session older than a group change, or a process that "
                  "changed its groups, would differ)")


def no_capabilities(event: Event, facts: Facts) -> None:
    """No capabilities when every uid is non-zero in the process's own namespace."""
    if "process.cap_effective" in facts:
        return
    proc = event.process
    ids = [proc.uid, proc.euid, proc.fsuid, event.facts.get("audit.suid")]
    if any(not isinstance(i, int) for i in ids):
        return
    level, rows = facts.get("userns.level"), facts.get("userns.uid_map")
    if level is None or (level > 0 and rows is None):
        return
    inside = ids if level == 0 else [IdMap.from_rows(rows).to_inside(int(i)) for i in ids]
    if any(i is None or i == 0 for i in inside):
        return
    facts.put("process.cap_effective", "0" * 16, INFERRED,
              "its uid, euid, suid and fsuid are all non-zero in its user namespace: execve "
              "left it no capabilities (unless its program has file capabilities or it was "
              "given ambient ones)")


def mapped_groups_only(facts: Facts) -> None:
    """Groups not captured, in a rootless podman container that does not keep them:
    podman sets the groups inside the user namespace, so a gid not mapped there cannot
    be held (runc never keeps them; crun only with the keep-groups annotation).
    Measured: tests/test_verdict_scenarios.py, rootless podman runc."""
    if "process.groups" in facts or facts.get("container.rootless") is not True \
            or facts.get("container.engine") != "podman":
        return
    oci = facts.get("container.oci")
    notes = oci.get("annotations") if isinstance(oci, dict) else None
    runtime = facts.get("container.runtime")
    if runtime == "runc":
        why = "rootless podman with runc, which cannot keep the host's groups"
    elif runtime == "crun" and isinstance(notes, dict) \
            and notes.get("run.oci.keep_original_groups") != "1":
        why = "rootless podman with crun, without run.oci.keep_original_groups=1"
    else:
        return
    facts.put("process.groups_mapped_only", True, INFERRED,
              f"{why}: its supplementary groups are set inside the user namespace, where a "
              "gid that is not mapped cannot be held")
