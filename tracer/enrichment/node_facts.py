"""Node facts for one event: stat through the process's root while it lives,
else the host's node (by path, or by major:minor through /sys/dev/char)."""

from __future__ import annotations

import datetime as _dt
import errno
import os
import stat
from typing import Optional

from tracer.enrichment import procfs
from tracer.enrichment.cdi_facts import cdi_device_facts
from tracer.enrichment.container_node import container_node_facts
from tracer.facts import CACHED, INFERRED, KERNEL, LIVE, Facts
from tracer.enrichment.node import NodeStat, NodeStatter, host_devname
from tracer.sensors.gpu_nodes import classify_node, is_gpu_driver
from tracer.sensors.node_watch import node_history
from tracer.enrichment.id_map import IdMap
from tracer.enrichment.node_absence import absence_facts
from tracer.enrichment.parse_proc import Mount, mount_holding, parse_mountinfo, parse_proc_devices
from tracer.event import Event
from tracer.host import HostPaths

OVERFLOW_GID = 65534  # what an unmapped id shows as inside a user namespace
NUMBER_ERRNOS = (errno.EPERM, errno.ENXIO)
MAX_CHAR_MAJORS = 512


def host_root(host: HostPaths) -> str:
    """The directory that is "/" for the host tree (the parent of its /dev)."""
    return os.path.dirname(host.dev.rstrip("/")) or "/"


def _stat_node(host: HostPaths, statter: NodeStatter, event: Event, path: str,
               live: bool) -> tuple[Optional[NodeStat], str, str]:
    """(stat, where it was seen: "process-root" | "host", origin)."""
    if live:
        root = host.proc_pid(event.process.pid, "root")
        return statter(root, path), "process-root", root + path
    root = host_root(host)
    found = statter(root, path)
    if found is not None:
        return found, "host", os.path.join(root, path.lstrip("/"))
    major, minor = event.node.major, event.node.minor
    if major is not None and minor is not None:
        name = host_devname(host.sys, major, minor)
        if name:
            dev_path = "/dev/" + name
            return statter(root, dev_path), "host", os.path.join(host.dev, name)
    return None, "host", os.path.join(root, path.lstrip("/"))


def _root_reachable(host: HostPaths, pid: int) -> bool:
    try:
        os.stat(host.proc_pid(pid, "root") + "/")
    except OSError:
        return False
    return True


def _watched_before_removal(host: HostPaths, event: Event,
                            path: str) -> tuple[Optional[NodeStat], str]:
    """The node as the GPU node watcher last read it, when it vouches that this was
    still its state at the refusal (see NodeHistory.held_at)."""
    host_path = os.fsencode(os.path.join(host_root(host), path.lstrip("/")))
    record = node_history(host.dev).held_at(host_path, event.time)
    if record is None:
        return None, ""
    st = record.state
    label = st.label.rstrip(b"\0").decode("utf-8", "replace") if st.label else None
    when = _dt.datetime.fromtimestamp(record.seen_at, _dt.timezone.utc).strftime("%H:%M:%S.%f")
    return (NodeStat(st.mode, st.uid, st.gid, os.major(st.rdev), os.minor(st.rdev),
                     st.acl, label, os.fsdecode(host_path)),
            f"GPU node watcher (inotify), read at {when[:-3]} UTC before the refusal")


def _mount_facts(host: HostPaths, event: Event, path: str, live: bool, facts: Facts,
                 arrival: Optional[tuple[str, list[Mount]]] = None
                 ) -> tuple[Optional[list[Mount]], str]:
    """node.mount*; returns the process's mount table and where it was read (live,
    from a live member of its mount namespace, or as read when the event arrived)."""
    found = _mount_table(host, event, live, facts, arrival)
    if found is None:
        return None, ""
    mountinfo_path, mounts = found
    mount = mount_holding(path, mounts)
    if mount is None:
        return mounts, mountinfo_path
    facts.put("node.mount", {
        "mount_point": mount.mount_point, "fstype": mount.fstype, "source": mount.source,
        "options": list(mount.options)}, LIVE, mountinfo_path)
    facts.put("node.mount_nodev", "nodev" in mount.options, LIVE, mountinfo_path)
    ro = "ro" in mount.options or "ro" in mount.super_options
    facts.put("node.mount_ro", ro, LIVE, mountinfo_path)
    return mounts, mountinfo_path


def _mount_table(host: HostPaths, event: Event, live: bool, facts: Facts,
                 arrival: Optional[tuple[str, list[Mount]]]
                 ) -> Optional[tuple[str, list[Mount]]]:
    pid = event.process.pid
    mountinfo_path = host.proc_pid(pid, "mountinfo") if live else None
    if mountinfo_path is None:
        # the process is gone: any live member of its mount namespace has its mount table
        mntns = event.process.mntns if "process.mntns" not in event.missing else None
        if not mntns and facts.get("process.host_process") is True:
            mntns = procfs.host_mount_namespace(host.proc)
            if mntns:
                facts.put("node.mount_ns_inferred", True, INFERRED,
                          "the host's mount table: the process is inferred to be a host process")
        if not mntns:
            return arrival
        prefer = tuple(p for p in (1, facts.get("container.init_pid")) if isinstance(p, int))
        member = procfs.process_in_mount_namespace(host.proc, mntns, prefer)
        if member is None:
            return arrival
        mountinfo_path = host.proc_pid(member, "mountinfo")
        facts.put("node.mount_read_from_pid", member, INFERRED,
                  f"a live process in the same mount namespace (mnt:[{mntns}])")
    text = procfs.read_text(mountinfo_path)
    if text is None:
        return arrival
    return mountinfo_path, parse_mountinfo(text, facts.skips)


def node_facts(host: HostPaths, statter: NodeStatter, event: Event, live: bool,
               facts: Facts, arrival_mounts: Optional[tuple[str, list[Mount]]] = None) -> None:
    path = os.fsdecode(event.node.path) if event.node.path else None
    devices_path = os.path.join(host.proc, "devices")
    devices_text = procfs.read_text(devices_path)
    char_majors = parse_proc_devices(devices_text, facts.skips) if devices_text else {}
    gpu_majors = {str(k): v for k, v in char_majors.items() if is_gpu_driver(v)}
    if devices_text is not None:
        facts.put("host.gpu_char_majors", gpu_majors, LIVE, devices_path)
        if event.errno in NUMBER_ERRNOS:  # is the node's number, or a rule's, a driver's?
            facts.put("host.char_majors", {str(k): v for k, v in
                                           sorted(char_majors.items())[:MAX_CHAR_MAJORS]},
                      LIVE, devices_path)
    if event.node.major is not None:
        facts.put("node.major", event.node.major, KERNEL, "event")
        facts.put("node.minor", event.node.minor, KERNEL, "event")
    if path is None:
        return
    facts.put_bytes("node.path", event.node.path, KERNEL, "event")
    if not live and event.errno != errno.ENOENT and container_node_facts(host, statter, path, facts):
        if isinstance(facts.get("node.gid"), int):
            _name_gid(int(facts.get("node.gid")), facts)
        facts.put("node.class", classify_node(path, facts.get("node.major"),
                                              facts.get("node.minor"), char_majors),
                  INFERRED, "major:minor, /proc/devices and path")
        _cdi_facts(host, statter, path, facts, char_majors)
        return
    found, seen_from, origin = _stat_node(host, statter, event, path, live)
    why = "process alive" if live else "process gone"
    if found is None and live and not _root_reachable(host, event.process.pid):
        # it exited (or is a zombie) while being enriched, and its root went with it: not a
        # sign that the node is gone
        live, why = False, "process exited while it was being enriched"
        found, seen_from, origin = _stat_node(host, statter, event, path, live)
    facts.put("node.seen_from", seen_from, INFERRED, why)
    facts.put("node.exists", found is not None, LIVE, origin)
    major, minor = event.node.major, event.node.minor
    source = LIVE
    if found is None and seen_from == "host":
        found, origin = _watched_before_removal(host, event, path)
        if found is not None:
            source = CACHED
            facts.put("node.seen_from", "node-watcher", INFERRED,
                      "process gone, node removed since; the GPU node watcher's last reading")
    if found is not None:
        kind = ("char" if stat.S_ISCHR(found.mode) else "block" if stat.S_ISBLK(found.mode)
                else "other")
        facts.put("node.type", kind, source, origin)
        facts.put("node.mode", f"{stat.S_IMODE(found.mode):04o}", source, origin)
        facts.put("node.uid", found.uid, source, origin)
        facts.put("node.gid", found.gid, source, origin)
        if major is None and found.major is not None:
            major, minor = found.major, found.minor
            facts.put("node.major", major, source, origin)
            facts.put("node.minor", minor, source, origin)
        acl = found.acl(facts.skips)
        if acl is not None:
            facts.put("node.acl", [e.to_json() for e in acl], source,
                      origin + " system.posix_acl_access")
        if found.selinux:
            facts.put("node.selinux", found.selinux, source, origin + " security.selinux")
        _name_ids(found, facts)
    node_class = classify_node(path, major, minor, char_majors)
    facts.put("node.class", node_class, INFERRED, "major:minor, /proc/devices and path")
    mounts, mounts_origin = _mount_facts(host, event, path, live, facts, arrival_mounts)
    if event.errno == errno.ENOENT:
        absence_facts(host, statter, path, node_class, mounts, mounts_origin, facts)
    _cdi_facts(host, statter, path, facts, char_majors)


def _cdi_facts(host: HostPaths, statter: NodeStatter, path: str, facts: Facts,
               char_majors: dict[int, str]) -> None:
    major, minor = facts.get("node.major"), facts.get("node.minor")
    number = (major, minor) if isinstance(major, int) and isinstance(minor, int) else None
    cdi_device_facts(host, statter, path, number, facts, char_majors)


def _name_ids(found: NodeStat, facts: Facts) -> None:
    _name_gid(found.gid, facts)


def _name_gid(gid: int, facts: Facts) -> None:
    """The node's group as the host names it, and as the container sees it."""
    host_groups = facts.get("host.etc_group") or {}
    host_name = next((n for n, g in host_groups.items() if g == gid), None)
    if host_name:
        facts.put("node.group_name", host_name, INFERRED, "host /etc/group")
    gid_map = facts.get("userns.gid_map")
    if gid_map is not None:
        inside = IdMap.from_rows(gid_map).to_inside(gid)
        facts.put("node.gid_in_container", OVERFLOW_GID if inside is None else inside,
                  INFERRED, "node gid through userns gid_map")
        facts.put("node.gid_mapped", inside is not None, INFERRED, "userns gid_map")
