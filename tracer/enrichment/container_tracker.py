"""Learn containers when they start: inotify on the OCI runtimes' state
directories, a snapshot the moment runc/crun writes a container's state.

runc writes <root>/<id>/state.json (by rename) and crun <root>/<id>/status when
the container is created, while its init process already sits in the new
namespaces and cgroup; a container living 10 ms is seen.  Roots: /run/runc,
/run/crun, /run/user/UID/{runc,crun} (rootless podman), docker's
/run/docker/runtime-runc/moby, containerd's /run/containerd/runc/<namespace>;
more may be given (a docker with its own --exec-root).
"""

from __future__ import annotations

import os
import select
import threading
import time
from typing import Callable, Optional

from tracer.enrichment import procfs
from tracer.enrichment.container_state import (RuntimeState, docker_identity, host_file,
                                               kubernetes_from_annotations,
                                               kubernetes_from_cgroup, podman_identity,
                                               read_oci_config, read_runtime_state)
from tracer.enrichment.container_store import ContainerSnapshot, SnapshotStore
from tracer.facts import LIVE, Facts
from tracer.enrichment.host_facts import device_cgroup_facts
from tracer.in_root import read_in_root
from tracer.enrichment.parse_files import parse_group_file, parse_passwd_file
from tracer.enrichment.process import cgroup_facts, lsm_facts, userns_facts
from tracer.enrichment.backfill import userns_level_and_owner
from tracer.host import HostPaths
from tracer.inotify import (IN_CLOSE_WRITE, IN_CREATE, IN_DELETE, IN_IGNORED, IN_MASK_ADD,
                            IN_MOVED_TO, IN_Q_OVERFLOW, Inotify)

MAX_WATCHES = 4096
MAX_ETC_ENTRIES = 256

# (path components under the host's /run; "*" matches any directory, "#" a uid) -> runtime
STATE_ROOTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("runc",), "runc"), (("crun",), "crun"),
    (("user", "#", "runc"), "runc"), (("user", "#", "crun"), "crun"),
    (("docker", "runtime-runc", "moby"), "runc"),
    (("containerd", "runc", "*"), "runc"),
)


def _etc_table(root: str, name: str, facts: Facts) -> Optional[dict[str, int]]:
    text = read_in_root(root, "/etc/" + name)
    if text is None:
        return None
    if name == "group":
        return {g.name: g.gid for g in parse_group_file(text, facts.skips)[:MAX_ETC_ENTRIES]}
    return {u.name: u.uid for u in parse_passwd_file(text, facts.skips)[:MAX_ETC_ENTRIES]}


def _cgroup_id(host: HostPaths, paths: dict[str, str], facts: Facts) -> Optional[int]:
    """The v2 cgroup's inode number: what bpf_get_current_cgroup_id() returns."""
    from tracer.enrichment.host_facts import cgroup_mounts
    v2 = paths.get("unified")
    mount = next((m for m in cgroup_mounts(host, facts) if m.fstype == "cgroup2"), None)
    if v2 is None or mount is None or v2 in ("/", ""):
        return None
    root = mount.root.rstrip("/")
    if root and not v2.startswith(root + "/"):
        return None
    try:
        return os.stat(host_file(host, os.path.join(mount.mount_point, v2[len(root):].lstrip("/")))).st_ino
    except OSError:
        return None


def _own_cgroup(state: RuntimeState, config: Optional[dict[str, object]], v2_path: str) -> bool:
    """The v2 cgroup is the container's own (not one it shares with its engine or
    the user's session, as on a hybrid host where the runtime manages v1 only)."""
    if not v2_path or v2_path == "/":
        return False
    wanted = str((config or {}).get("cgroups_path") or state.cgroup_path or "")
    last = v2_path.rstrip("/").rsplit("/", 1)[-1]
    return state.id in last or (bool(wanted) and (v2_path.rstrip("/") == wanted.rstrip("/")
                                                  or v2_path.endswith(wanted.split(":")[-1])))


def runtime_v1_paths(host: HostPaths, state: RuntimeState, facts: Facts) -> dict[str, str]:
    """The v1 cgroups the runtime put the container in (runc's state.json
    `cgroup_paths`: controller -> host directory), as /proc/PID/cgroup spells them."""
    from tracer.enrichment.host_facts import cgroup_mounts
    out: dict[str, str] = {}
    mounts = [m for m in cgroup_mounts(host, facts) if m.fstype == "cgroup"]
    for controller, directory in state.cgroup_paths.items():
        mount = next((m for m in mounts if controller in m.super_options), None)
        if mount is None or controller == "unified":
            continue
        base = mount.mount_point.rstrip("/")
        if directory == base or directory.startswith(base + "/"):
            out[controller] = (mount.root.rstrip("/") + directory[len(base):]) or "/"
    return out


def _container_cgroup_paths(host: HostPaths, state: RuntimeState, pid: int, live: Facts) -> None:
    """cgroup.paths of the container's init; the v1 ones /proc could not give (the
    init had already exited) come from the runtime's own record of them."""
    seen = Facts()
    cgroup_facts(host, pid, seen)
    live.skips.merge(seen.skips)
    fact = seen.fact("cgroup.paths")
    paths = dict(fact.value) if fact is not None else {}
    from_state = {k: v for k, v in runtime_v1_paths(host, state, live).items()
                  if not any(k in key.split(",") for key in paths)}
    paths.update(from_state)
    if not paths:
        return
    origin = fact.origin if fact is not None else host.proc_pid(pid, "cgroup")
    if from_state:
        origin += f"; v1 {', '.join(sorted(from_state))} from the runtime state in {state.state_dir}"
    live.put("cgroup.paths", paths, LIVE, origin)


def snapshot_container(host: HostPaths, state: RuntimeState, owner_uid: int = 0) -> ContainerSnapshot:
    """Everything a verdict may need later, read now while the container lives."""
    now = time.time()
    created = state.created if state.created is not None and state.created <= now + 1 else now
    snap = ContainerSnapshot(id=state.id, runtime=state.runtime, created=created,
                             pid=state.pid)
    where = f"{state.runtime} state {state.state_dir}"
    snap.put("container.id", state.id, where)
    snap.put("container.runtime", state.runtime, where)
    config = read_oci_config(host, state.bundle) if state.bundle else None
    live = Facts()
    if state.pid:
        pid = state.pid
        for kind in ("mnt", "pid", "user"):
            inum = procfs.ns_inum(procfs.read_link(host.proc_pid(pid, "ns", kind)))
            setattr(snap, {"mnt": "mntns", "pid": "pidns", "user": "userns"}[kind], inum)
        found = userns_level_and_owner(host.proc_pid(pid, "ns", "user"))
        if found is not None:
            level, owner_uid = found
            snap.put("userns.level", level, f"/proc/{pid}/ns/user")
            snap.put("userns.owner_uid", owner_uid, f"/proc/{pid}/ns/user")
            snap.put("container.rootless", level > 0 and owner_uid != 0, "userns level and owner")
            if level == 0:
                snap.userns = None  # the initial userns is everyone's: not a container key
        userns_facts(host, pid, live)
        lsm_facts(host, pid, live)
        _container_cgroup_paths(host, state, pid, live)
        root = host.proc_pid(pid, "root")
        for name in ("group", "passwd"):
            table = _etc_table(root, name, live)
            if table is not None:
                live.put(f"container.etc_{name}", table, "live", f"/proc/{pid}/root/etc/{name}")
        paths = live.get("cgroup.paths") or {}
        if _own_cgroup(state, config, str(paths.get("unified", ""))):
            snap.cgroup_id = _cgroup_id(host, paths, live)
        device_cgroup_facts(host, paths, live, snap.cgroup_id or 0)
        snap.add_facts(live, f"container init pid {pid} at start")
    if "container.etc_group" not in snap.facts and state.rootfs:
        for name in ("group", "passwd"):
            table = _etc_table(host_file(host, state.rootfs), name, live)
            snap.put(f"container.etc_{name}", table, f"{state.rootfs}/etc/{name}")
    if config is not None:
        _config_facts(host, snap, config, state, owner_uid)
        _requested_device_rules(host, snap, config, live)
    if snap.cgroup_id is not None:
        snap.put("cgroup.id", snap.cgroup_id, "stat of the container's v2 cgroup")
    return snap


def _config_facts(host: HostPaths, snap: ContainerSnapshot, config: dict[str, object],
                  state: RuntimeState, owner_uid: int) -> None:
    origin = os.path.join(state.bundle or "?", "config.json")
    snap.put("container.oci", config, origin)
    annotations = config.get("annotations") or {}
    assert isinstance(annotations, dict)
    identity = docker_identity(host, config) or podman_identity(host, config, state.id, owner_uid)
    kube = kubernetes_from_annotations(annotations)
    paths = snap.facts.get("cgroup.paths")
    for path in (paths.value.values() if paths else []):
        for key, value in kubernetes_from_cgroup(str(path)).items():
            kube.setdefault(key, value)
    if identity:
        snap.put("container.engine", identity["engine"], identity.get("origin", origin))
        snap.put("container.name", identity.get("name"), identity.get("origin", origin))
        snap.put("container.image", identity.get("image"), identity.get("origin", origin))
    if kube:
        snap.put("container.kubernetes", True, origin)
        snap.put("container.pod", kube, origin)
        if not identity:
            snap.put("container.engine", "kubernetes", origin)
            snap.put("container.name", kube.get("container"), origin)
    maps = [("userns.uid_map", "uid_mappings"), ("userns.gid_map", "gid_mappings")]
    for name, key in maps:
        if name not in snap.facts and config.get(key):
            snap.put(name, config[key], origin)
    keep = annotations.get("run.oci.keep_original_groups")
    if keep is not None:
        snap.put("container.keep_original_groups", keep == "1", origin)


def oci_rules_as_devices_list(rules: list[dict[str, object]]) -> Optional[list[str]]:
    """linux.resources.devices as the v1 allowlist the runtime writes from it:
    only the usual shape (deny all, then allows); anything else stays unknown."""
    if not rules or rules[0].get("allow") or rules[0].get("type") not in (None, "a"):
        return None
    out = []
    for rule in rules[1:]:
        if not rule.get("allow"):
            return None
        major, minor = rule.get("major"), rule.get("minor")
        out.append(f"{rule.get('type') or 'a'} {'*' if major is None else major}:"
                   f"{'*' if minor is None else minor} {rule.get('access') or 'rwm'}")
    return out


def _requested_device_rules(host: HostPaths, snap: ContainerSnapshot,
                            config: dict[str, object], live: Facts) -> None:
    """When the container's devices.list could not be read (its init had
    already exited), the rules the runtime was asked to apply on this v1 host."""
    from tracer.enrichment.host_facts import cgroup_mounts
    if "device_cgroup.v1_rules" in snap.facts or "device_cgroup.version" in snap.facts:
        return
    if not any(m.fstype == "cgroup" and "devices" in m.super_options
               for m in cgroup_mounts(host, live)):
        return
    raw = config.get("device_rules")
    rules = oci_rules_as_devices_list(raw if isinstance(raw, list) else [])
    if rules is not None:
        origin = "OCI config.json linux.resources.devices (as the runtime applies it)"
        snap.put("device_cgroup.version", 1, origin)
        snap.put("device_cgroup.v1_rules", rules, origin)


class ContainerTracker:
    """A thread that snapshots every container as its runtime creates it."""

    def __init__(self, host: HostPaths, store: SnapshotStore,
                 extra_roots: tuple[tuple[str, str], ...] = (),
                 on_snapshot: Optional[Callable[[ContainerSnapshot], None]] = None) -> None:
        self.host = host
        self.store = store
        self.extra_roots = extra_roots  # (absolute host dir, runtime)
        self.on_snapshot = on_snapshot
        self._inotify: Optional[Inotify] = None
        # wd -> what that directory is watched for: [(dir, rest of the pattern, runtime)]
        self._watches: dict[int, list[tuple[str, tuple[str, ...], str]]] = {}
        self._pending: set[str] = set()  # container dirs seen whose state was not read yet
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()

    # --- watches ----------------------------------------------------------------------
    def _watch(self, directory: str, rest: tuple[str, ...], runtime: str, mask: int) -> None:
        if len(self._watches) >= MAX_WATCHES:
            self.store.counters["tracker_watch_limit"] += 1
            return
        assert self._inotify is not None
        wd = self._inotify.add_watch(os.fsencode(directory), mask | IN_MASK_ADD)
        if wd < 0:
            return
        uses = self._watches.setdefault(wd, [])
        if (directory, rest, runtime) not in uses:
            uses.append((directory, rest, runtime))
        self._scan(directory, rest, runtime)

    def _scan(self, directory: str, rest: tuple[str, ...], runtime: str) -> None:
        if rest == ("@",):  # a container's own dir: its state may already be written
            self._take(os.path.dirname(directory), os.path.basename(directory), runtime)
            return
        for name in procfs.list_dir(directory):
            self._entry(directory, rest, runtime, name)

    def _entry(self, directory: str, rest: tuple[str, ...], runtime: str, name: str) -> None:
        path = os.path.join(directory, name)
        if not rest:  # a state root: `name` is a container id
            if self.store.get(name) is None:
                self._pending.add(path)
            if not os.path.isdir(path):
                self._missed(path)  # gone before we could look
                return
            self._watch(path, ("@",), runtime, IN_MOVED_TO | IN_CLOSE_WRITE)
            return
        if not os.path.isdir(path):
            return
        head = rest[0]
        if head == name or head == "*" or (head == "#" and name.isdigit()):
            mask = IN_CREATE | IN_MOVED_TO | (IN_DELETE if len(rest) == 1 else 0)
            self._watch(path, rest[1:], runtime, mask)

    def start(self) -> "ContainerTracker":
        self._inotify = Inotify()
        for parts, runtime in STATE_ROOTS:
            self._watch(self.host.run, parts, runtime, IN_CREATE | IN_MOVED_TO)
        for directory, runtime in self.extra_roots:
            parts = tuple(p for p in directory.split("/") if p)
            self._watch("/", parts, runtime, IN_CREATE | IN_MOVED_TO)
        self._thread = threading.Thread(target=self._run, name="container-tracker", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._inotify is not None:
            self._inotify.close()

    # --- events -----------------------------------------------------------------------
    def _run(self) -> None:
        assert self._inotify is not None
        poller = select.poll()
        poller.register(self._inotify.fd, select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(200):
                self.store.expire()
                continue
            try:
                events = self._inotify.events()
            except OSError:
                break
            self._dispatch(events)

    def _dispatch(self, events: list[tuple[int, int, bytes]]) -> None:
        for wd, mask, raw in events:
            name = raw.decode("utf-8", "replace")
            if mask & IN_Q_OVERFLOW:
                self.store.counters["tracker_queue_overflow"] += 1
                continue
            if mask & IN_IGNORED:
                self._watches.pop(wd, None)
                continue
            for directory, rest, runtime in list(self._watches.get(wd, ())):
                if rest == ("@",):
                    if name in ("state.json", "status"):
                        self._take(os.path.dirname(directory), os.path.basename(directory),
                                   runtime)
                elif not rest and mask & IN_DELETE:
                    self._missed(os.path.join(directory, name))
                    self.store.mark_died(name)
                elif mask & (IN_CREATE | IN_MOVED_TO):
                    self._entry(directory, rest, runtime, name)

    def _missed(self, path: str) -> None:
        """A container whose state went away before it could be read: counted."""
        if path in self._pending:
            self._pending.discard(path)
            self.store.counters["containers_missed"] += 1

    def _take(self, state_root: str, cid: str, runtime: str) -> None:
        state = read_runtime_state(self.host, runtime, state_root, cid)
        if state is None:
            return
        known = self.store.get(cid)
        if known is not None and known.pid == state.pid:
            return  # a later rewrite of the same state (runc updates it on start)
        owner = _owner_of(state_root)
        snap = snapshot_container(self.host, state, owner)
        self._pending.discard(os.path.join(state_root, cid))
        self.store.add(snap)
        if self.on_snapshot is not None:
            self.on_snapshot(snap)


def _owner_of(path: str) -> int:
    try:
        return os.stat(path).st_uid
    except OSError:
        return 0


_SHARED: dict[HostPaths, ContainerTracker] = {}
_SHARED_LOCK = threading.Lock()


def shared_tracker(host: HostPaths) -> ContainerTracker:
    """The process's one tracker for a host tree, started on first use.  Where
    inotify is unavailable it stays unstarted (counted), and events only get
    what /proc still shows."""
    with _SHARED_LOCK:
        tracker = _SHARED.get(host)
        if tracker is None:
            tracker = ContainerTracker(host, SnapshotStore())
            try:
                tracker.start()
            except OSError:
                tracker.store.counters["tracker_unavailable"] += 1
            _SHARED[host] = tracker
        return tracker
