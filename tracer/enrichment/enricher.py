"""The enrichment stage: event -> Facts, with per-userns and per-cgroup caches.

Container-wide facts (id maps, the container's /etc/group, engine, name, OCI
config, device-cgroup policy) come from the snapshot the container tracker took
when the container started (`SnapshotStore`, found by the event's cgroup id or
namespace inodes), and from the per-userns/per-cgroup cache `prime()` fills from
the process itself as its first denial arrives.  Facts are never borrowed from
another process, with one exception that is not a borrowing: a mount table is a
property of the mount namespace, read from any live member of it.
"""

from __future__ import annotations

import os
import time
from collections import Counter, OrderedDict
from typing import Generic, Optional, TypeVar

from tracer.enrichment.cgroup_name import add_cgroup_identity
from tracer.enrichment.kernel_starts import StartBook, add_start_facts
from tracer.enrichment.container import (ContainerClues, detect_container, gather_state_dirs,
                                         podman_storage_has, read_containerenv)
from tracer.enrichment import inferred, procfs
from tracer.enrichment.backfill import backfill_process
from tracer.enrichment.access_history import AccessHistory
from tracer.enrichment.container_store import ContainerSnapshot, SnapshotStore
from tracer.enrichment.device_rules import devices_list_texts
from tracer.enrichment.history_facts import history_facts
from tracer.enrichment.session_facts import session_facts
from tracer.facts import CACHED, INFERRED, KERNEL, LIVE, Facts, SkipCounter
from tracer.enrichment.parse_proc import Mount, parse_mountinfo
from tracer.enrichment.device_cgroup_v2 import device_program_facts
from tracer.enrichment.host_facts import (cgroup2_mount_dir, device_cgroup_facts,
                                          device_programs_by_cgroup_id, host_group_table,
                                          V1Reading, v1_list_at_arrival, v1_rules_by_id,
                                          v1_devices_dir,
                                          logind_session_facts, nvidia_params_facts,
                                          owner_user_facts, security_module_facts)
from tracer.enrichment.node_facts import node_facts
from tracer.enrichment.driver_params import device_file_policy_facts
from tracer.enrichment.toolkit_config import toolkit_config_facts
from tracer.enrichment.systemd_unit import cgroup_path_by_id, systemd_unit_facts
from tracer.enrichment.node import NodeStatter, stat_in_root
from tracer.enrichment.process import (ancestors, cgroup_facts, container_env,
                                       container_root_facts, kernel_facts, live_status_facts,
                                       lsm_facts, process_is_live, userns_facts)
from tracer.event import Event, Process
from tracer.host import HostPaths

K = TypeVar("K")
V = TypeVar("V")
DEFAULT_CACHE_SIZE = 256
# v2 device programs the BPF probe read at the denial replace enrichment's bpf() read
V2_PROGRAM_FACTS = frozenset({"device_cgroup.v2_programs", "device_cgroup.v2_unreadable"})
# a v1 devices.list read at an EPERM's arrival serves the next ones of its cgroup this long
V1_ARRIVAL_FRESH_S = 0.1


class BoundedLru(Generic[K, V]):
    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("cache size must be at least 1")
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> Optional[V]:
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)


KEPT_GROUP_NAMES = ("video", "render")


def trim_group_tables(facts: Facts) -> None:
    """Keep only the /etc/group entries a verdict can use, so events stay small."""
    gids = set(facts.get("process.groups", [])) | set(facts.get("host.user_groups") or [])
    gids |= {facts.get("node.gid"), facts.get("process.fsgid")}
    names = set(KEPT_GROUP_NAMES) | {facts.get("node.group_name")}
    for name in ("host.etc_group", "container.etc_group"):
        fact = facts.fact(name)
        if fact is not None and isinstance(fact.value, dict):
            kept = {n: g for n, g in fact.value.items() if n in names or g in gids}
            facts.put(name, kept, fact.source, fact.origin)


class Enricher:
    """Adds facts to events.  `stat_node` may be replaced (fixture node stats)."""

    def __init__(self, host: HostPaths, stat_node: NodeStatter = stat_in_root,
                 cache_size: int = DEFAULT_CACHE_SIZE,
                 snapshots: Optional[SnapshotStore] = None,
                 starts: Optional[StartBook] = None,
                 history: Optional[AccessHistory] = None) -> None:
        self.host = host
        self.snapshots = snapshots if snapshots is not None else SnapshotStore()
        self.starts = starts  # the kernel's container starts (kernel_starts.py)
        self.history = history  # device rules and groups over time (the tracker's)
        self.stat_node = stat_node
        self.by_userns: BoundedLru[int, Facts] = BoundedLru(cache_size)
        self.by_cgroup: BoundedLru[int, Facts] = BoundedLru(cache_size)
        self.counters: Counter[str] = Counter()  # cache hits/misses, parse skips
        # mount tables read as an event arrived, by mount namespace: the table is the
        # namespace's own, and the process (a --rm container, nvidia-smi) may be gone
        # before enrichment; a later event of a namespace still read at its own arrival
        self.mount_tables: BoundedLru[int, tuple[str, list[Mount]]] = BoundedLru(cache_size)
        # v1 devices.list read as an EPERM arrived, by the devices cgroup id the probe
        # captured: a transient unit's or --rm container's cgroup is removed when its
        # last process exits, often before enrichment reads it (monotonic time, reading)
        self.v1_lists: BoundedLru[int, tuple[float, V1Reading]] = BoundedLru(cache_size)

    def enrich(self, event: Event) -> Facts:
        """Adds enrichment's facts to `event.facts` beside the sensor's (which are
        kept, never overwritten) and returns the merged facts.  Enriching the same
        event again gives enrichment's view now, in place of its earlier one."""
        read_live = backfill_process(self.host, event)
        live = process_is_live(self.host, event.process)
        merged = self._enrich(event, live, read_live)
        if live and not process_is_live(self.host, event.process):
            # it exited while it was being read (a refused `cat` lives microseconds): what
            # was read of it may stop half way (its root, cgroup, /dev), and a half-read
            # live process makes wrong causes (a node "removed", seccomp for a device
            # cgroup it could not read); read it again as the gone process it is
            self.counters["exited_while_enriched"] += 1
            merged = self._enrich(event, False, read_live)
        return merged

    def _enrich(self, event: Event, live: bool, read_live: list[str]) -> Facts:
        proc = event.process
        facts = Facts()
        kernel_facts(proc, facts, event.missing, read_live)
        facts.put("process.live", live, LIVE if live else INFERRED,
                  self.host.proc_pid(proc.pid))
        if live:
            live_status_facts(self.host, proc.pid, facts)
            facts.update(self._snapshot(proc))
            self._add_container_snapshot(event, facts)
        else:
            self._add_container_snapshot(event, facts)
            self._add_cached(proc, facts)
            if "device_cgroup.v2_programs" not in facts and proc.cgroup_id is not None:
                # the process is gone, but the kernel-captured cgroup id still finds its
                # own v2 cgroup (and its device programs) while the cgroup lives
                devices_id = event.facts.get("sensor.devices_cgroup_id")
                device_programs_by_cgroup_id(self.host, proc.cgroup_id, facts,
                                             devices_id if isinstance(devices_id, int) else None,
                                             self._v1_at_arrival(devices_id))
        devices_id = event.facts.get("sensor.devices_cgroup_id")
        if live and "device_cgroup.v1_rules" not in facts and isinstance(devices_id, int):
            # a zombie: /proc shows no v1 cgroup
            v1_rules_by_id(self.host, devices_id, facts, self._v1_at_arrival(devices_id))
        add_cgroup_identity(proc, facts)
        if self.starts is not None:
            add_start_facts(self.starts, proc, event.time, facts)
        cgroup = self._cgroup_key(proc)
        if "systemd.unit" not in facts and cgroup is not None:
            # the unit from the kernel-captured cgroup id: the process may be gone, or in
            # a pid namespace of its own where /proc/PID is not it
            path = cgroup_path_by_id(self.host, cgroup, facts)
            if path is not None:
                systemd_unit_facts(self.host, {"unified": path}, facts)
        self._add_rootless_inference(proc, facts)
        self._add_host(event, live, facts)
        inferred.login_groups(facts)
        inferred.mapped_groups_only(facts)
        inferred.no_capabilities(event, facts)
        arrival = self.mount_tables.get(proc.mntns) if proc.mntns else None
        node_facts(self.host, self.stat_node, event, live, facts, arrival)
        history_facts(self.history, self.host, event, facts)
        session_facts(self.host, event, live, facts)
        trim_group_tables(facts)
        self.counters.update({f"skip:{k}": v for k, v in facts.skips.counts.items()})
        merged = event.facts.from_sensor()
        if V2_PROGRAM_FACTS & set(merged.names()):
            facts = facts.without(V2_PROGRAM_FACTS)  # the probe's reading at the denial wins
        merged.update(facts)
        event.facts = merged
        return merged

    def capture_v1_rules(self, event: Event) -> bool:
        """Read the refused task's v1 devices.list now, on an EPERM's arrival, by the
        devices cgroup id the probe captured (kept by that id; a storm from one cgroup
        reads it once per V1_ARRIVAL_FRESH_S)."""
        devices_id = event.facts.get("sensor.devices_cgroup_id")
        if not isinstance(devices_id, int) or devices_id < 1:
            return False
        now = time.monotonic()
        known = self.v1_lists.get(devices_id)
        if known is not None and now - known[0] < V1_ARRIVAL_FRESH_S:
            return False
        reading = v1_list_at_arrival(self.host, devices_id)
        if reading is None:
            return False
        self.v1_lists.put(devices_id, (now, reading))
        self.counters["v1_lists_at_arrival"] += 1
        return True

    def _v1_at_arrival(self, devices_id: object) -> Optional[V1Reading]:
        known = self.v1_lists.get(devices_id) if isinstance(devices_id, int) else None
        return known[1] if known is not None else None

    def capture_mount_table(self, proc: Process) -> bool:
        """Read the process's mount table now, on the event's arrival (an ENOENT is
        explained by the /dev the process saw); kept by its mount namespace."""
        if not proc.mntns or not process_is_live(self.host, proc):
            return False
        path = self.host.proc_pid(proc.pid, "mountinfo")
        text = procfs.read_text(path)
        if text is None:
            return False
        mounts = parse_mountinfo(text, SkipCounter())
        self.mount_tables.put(proc.mntns, (f"{path} (read as the event arrived)", mounts))
        self.counters["mount_tables_at_arrival"] += 1
        return True

    def prime(self, proc: Process) -> bool:
        """Snapshot container-wide facts of a live process whose userns or cgroup
        is not cached yet; call when the pipeline first meets one."""
        new_userns = self._userns_key(proc) is not None and self._userns_key(proc) not in self.by_userns
        cgroup = self._cgroup_key(proc)
        new_cgroup = cgroup is not None and cgroup not in self.by_cgroup
        if not (new_userns or new_cgroup) or not process_is_live(self.host, proc):
            return False
        self._snapshot(proc)
        self.counters["primed"] += 1
        return True

    @staticmethod
    def _userns_key(proc: Process) -> Optional[int]:
        # the initial userns is shared by every host process: not a container key
        level = proc.userns.level
        return proc.userns.inum if level is not None and level > 0 and proc.userns.inum else None

    @staticmethod
    def _cgroup_key(proc: Process) -> Optional[int]:
        # id 1 is the v2 root cgroup, shared by every process outside any container
        return proc.cgroup_id if proc.cgroup_id is not None and proc.cgroup_id > 1 else None

    def needs_prime(self, proc: Process) -> bool:
        """Cheap check (no I/O) whether `prime` would snapshot anything."""
        userns, cgroup = self._userns_key(proc), self._cgroup_key(proc)
        return (userns is not None and userns not in self.by_userns) or \
            (cgroup is not None and cgroup not in self.by_cgroup)

    def _snapshot(self, proc: Process) -> Facts:
        shared = self._read_shared(proc)
        if not process_is_live(self.host, proc):
            # it exited while read: half a reading is not its container's facts, and a
            # cached one would stand for every later event of that userns or cgroup
            self.counters["snapshot_not_kept_exited"] += 1
            return shared
        key, cgroup = self._userns_key(proc), self._cgroup_key(proc)
        if key is not None:
            self.by_userns.put(key, shared)
        if cgroup is not None:
            self.by_cgroup.put(cgroup, shared)
        return shared

    def _read_shared(self, proc: Process) -> Facts:
        shared = Facts()
        pid = proc.pid
        userns_facts(self.host, pid, shared)
        container_root_facts(self.host, pid, shared)
        lsm_facts(self.host, pid, shared)
        cgroup_facts(self.host, pid, shared)
        paths = shared.get("cgroup.paths") or {}
        device_cgroup_facts(self.host, paths, shared, proc.cgroup_id)
        systemd_unit_facts(self.host, paths, shared)
        self._container_facts(proc, paths, shared)
        return shared

    def _container_facts(self, proc: Process, cgroup_paths: dict[str, str],
                         shared: Facts) -> None:
        clues = ContainerClues(
            cgroup_paths=sorted(set(cgroup_paths.values())),
            ancestors=ancestors(self.host, proc.pid, shared.skips),
            env_container=container_env(self.host, proc.pid),
            containerenv=read_containerenv(self.host.proc_pid(proc.pid, "root")),
            userns_level=proc.userns.level, userns_owner_uid=proc.userns.owner_uid)
        first = detect_container(clues)
        cid = first.get("id", (None, ""))[0]
        if isinstance(cid, str) and proc.userns.owner_uid is not None:
            clues.state_dirs = gather_state_dirs(self.host, cid, proc.userns.owner_uid)
            runroot = podman_storage_has(self.host, cid, proc.userns.owner_uid)
            if runroot and "engine" not in first:
                clues.env_container = clues.env_container or "podman"
        for key, (value, clue) in detect_container(clues).items():
            shared.put(f"container.{key}", value, INFERRED if key == "rootless" else LIVE, clue)

    def _add_container_snapshot(self, event: Event, facts: Facts) -> None:
        """The container's facts as the tracker saw them when it started.  Without
        kernel keys (audit), a descendant of the container's init is found through its
        parent's live lineage (labelled as inferred)."""
        found = self.snapshots.find(event.process, event.time, event.missing)
        if found is None and "process.mntns" in event.missing:
            for ancestor in inferred.live_lineage(self.host, event.process.ppid, event.time)[1:]:
                hit = self.snapshots.find(Process(pid=ancestor), event.time, event.missing)
                if hit is not None and hit[1].startswith("pid "):
                    found = hit[0], (f"inferred: ancestor pid {ancestor} of its parent (alive) "
                                     "was the container's init then")
                    break
        if found is None:
            return
        snap, key = found
        self._current_device_rules(snap, event, facts)
        facts.update(snap.to_facts(f"container snapshot found by {key}"))
        if snap.pid:
            facts.put("container.init_pid", snap.pid, CACHED, snap.runtime + " state")
        facts.put("container.snapshot_key", key, INFERRED, "container snapshot store")
        if "process.groups" in event.missing:
            inferred.groups_from_init(facts, key)

    def _current_device_rules(self, snap: ContainerSnapshot, event: Event, facts: Facts) -> None:
        """An exited process of a running container: its device rules as they are now,
        read before the snapshot's (a hook or a re-apply may have changed them since the
        container started): v2 by the cgroup id the kernel captured, v1 by the
        container's devices cgroup."""
        cgroup_id = event.process.cgroup_id or 0  # None: not captured (audit)
        mount = cgroup2_mount_dir(self.host)
        if "device_cgroup.v2_programs" not in facts and cgroup_id > 1 and mount is not None:
            found = Facts()
            device_program_facts(mount, cgroup_id, None, found)
            if "device_cgroup.v2_programs" in found:  # unreadable: the snapshot's stand
                facts.update(found)
        if "device_cgroup.v1_rules" in facts:
            return
        paths = snap.facts.get("cgroup.paths")
        cgroups = paths.value if paths is not None and isinstance(paths.value, dict) else {}
        v1 = next((str(p) for c, p in cgroups.items() if "devices" in str(c).split(",")), None)
        directory = v1_devices_dir(self.host, v1, facts) if v1 and v1 != "/" else None
        text = procfs.read_text(os.path.join(directory, "devices.list")) if directory else None
        if text is None or directory is None:
            return
        where = os.path.join(directory, "devices.list")
        facts.put("device_cgroup.version", 1, LIVE, where)
        facts.put("device_cgroup.v1_rules", list(devices_list_texts(text, facts.skips)), LIVE,
                  f"{where} (the container's cgroup, read after the process exited)")

    def _add_cached(self, proc: Process, facts: Facts) -> None:
        """What `prime` read from this very process while it lived."""
        key = self._userns_key(proc)
        by_userns = self.by_userns.get(key) if key is not None else None
        if key is not None and by_userns is None and "userns.uid_map" not in facts:
            by_userns = self._userns_maps_from_member(key)
        cgroup = self._cgroup_key(proc)
        by_cgroup = self.by_cgroup.get(cgroup) if cgroup is not None else None
        for shared in (by_userns, by_cgroup):
            if shared is not None:
                facts.update(shared, CACHED)
        self.counters["cache_hit" if (by_userns or by_cgroup) else "cache_miss"] += 1

    def _userns_maps_from_member(self, userns: int) -> Optional[Facts]:
        """A user namespace's own facts (uid_map, gid_map, setgroups) are the same for
        every member: read them from a live one.  Nothing of that process itself
        (groups, cgroup, root, label) is taken."""
        member = procfs.process_in_namespace(self.host.proc, "user", userns)
        if member is None:
            return None
        shared = Facts()
        userns_facts(self.host, member, shared)
        if "userns.uid_map" not in shared:
            return None
        self.by_userns.put(userns, shared)
        self.counters["userns_maps_from_member"] += 1
        return shared

    @staticmethod
    def _add_rootless_inference(proc: Process, facts: Facts) -> None:
        level, owner = facts.get("userns.level"), facts.get("userns.owner_uid")
        if level is not None and level > 0 and owner is not None and owner != 0 \
                and "container.rootless" not in facts:
            where = facts.fact("userns.level")
            facts.put("container.rootless", True, INFERRED,
                      f"userns level > 0 and owner uid != 0 ({where.source if where else '?'})")

    def _host_process(self, event: Event, live: bool, facts: Facts) -> tuple[Optional[bool], str]:
        """Whether the process ran on the host, in no container: only then is its
        uid a host user's.  None when the facts cannot tell."""
        proc, missing = event.process, set(event.missing)
        if facts.get("container.engine") is not None or facts.get("container.id") is not None:
            return False, "container facts"
        level = facts.get("userns.level")
        if level is None:
            by_parent = None if live else inferred.host_process_by_parent(
                self.host, proc.ppid, event.time)
            if by_parent is not None:
                facts.put("userns.level", 0, INFERRED, by_parent)
                return True, by_parent
            return None, "the sensor could not capture the user namespace"
        if int(level) > 0:
            return False, "user namespace level > 0"
        if live:
            return True, "live process with no container clue"
        host_mnt = procfs.host_mount_namespace(self.host.proc)
        if "process.mntns" in missing or not proc.mntns or host_mnt is None:
            return None, "the process's mount namespace is unknown and it is gone"
        if proc.mntns == host_mnt:
            return True, f"in the host's mount namespace (mnt:[{host_mnt}]) and no container"
        return None, "gone, in a mount namespace of its own, and no container snapshot"

    def _add_host(self, event: Event, live: bool, facts: Facts) -> None:
        proc = event.process
        host_group_table(self.host, facts)
        host_process, why = self._host_process(event, live, facts)
        facts.put("process.host_process", host_process, INFERRED, why)
        level, owner = facts.get("userns.level"), facts.get("userns.owner_uid")
        if level is None:
            pass  # whose namespace it was is unknown: no user is named
        elif int(level) > 0 and owner is not None:
            owner_user_facts(self.host, int(owner), facts,
                             "owner of the process's user namespace")
        elif host_process and proc.uid is not None:
            owner_user_facts(self.host, proc.uid, facts, "process uid on the host, no container")
        nvidia_params_facts(self.host, facts)
        device_file_policy_facts(self.host, facts)
        toolkit_config_facts(self.host, facts)
        logind_session_facts(self.host, facts)
        security_module_facts(self.host, facts)
        if proc.userns.level is not None:
            facts.put("process.in_initial_userns", proc.userns.level == 0, KERNEL, "event")
        if os.path.isdir(os.path.join(self.host.proc, "driver/nvidia")):
            facts.put("nvidia.driver_loaded", True, LIVE,
                      os.path.join(self.host.proc, "driver/nvidia"))
