"""A container's snapshot: everything a verdict may need later about it, read
the moment its runtime writes its state (container_tracker.py watches for
that), while its init process still sits in the container's namespaces and
cgroup: namespace keys, user namespace, LSM, cgroups and device rules, the
image's /etc/group and /etc/passwd, and from the OCI config the engine's name,
Kubernetes names, id maps and the devices it asked for.
"""

from __future__ import annotations

import os
import time
from typing import Optional

from tracer.enrichment.container_state import (ROOT_STATE, RuntimeState, docker_identity, host_file,
                                               kubernetes_from_annotations,
                                               kubernetes_from_cgroup, podman_identity,
                                               read_oci_config)
from tracer.enrichment.container_store import ContainerSnapshot
from tracer.enrichment.state_files import StateFiles
from tracer.facts import LIVE, Facts
from tracer.enrichment.host_facts import device_cgroup_facts
from tracer.in_root import read_in_root
from tracer.enrichment.container_init import etc_table, read_init
from tracer.host import HostPaths


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


def _runtime_cgroup_paths(host: HostPaths, state: RuntimeState, pid: int, live: Facts) -> None:
    """The v1 cgroup.paths /proc could not give (the init had already exited) come
    from the runtime's own record of them."""
    fact = live.fact("cgroup.paths")
    paths = dict(fact.value) if fact is not None else {}
    if len(paths) > 1 or not state.cgroup_paths:  # more than the v2 line: the init's own
        return
    from_state = {k: v for k, v in runtime_v1_paths(host, state, live).items()
                  if not any(k in key.split(",") for key in paths)}
    if not from_state:
        return
    paths.update(from_state)
    origin = fact.origin if fact is not None else host.proc_pid(pid, "cgroup")
    origin += f"; v1 {', '.join(sorted(from_state))} from the runtime state in {state.state_dir}"
    live.put("cgroup.paths", paths, LIVE, origin)


def snapshot_container(host: HostPaths, state: RuntimeState, owner_uid: int = 0,
                       files: StateFiles = ROOT_STATE) -> ContainerSnapshot:
    """Everything a verdict may need later, read now while the container lives."""
    now = time.time()
    created = state.created if state.created is not None and state.created <= now + 1 else now
    snap = ContainerSnapshot(id=state.id, runtime=state.runtime, created=created,
                             pid=state.pid)
    where = f"{state.runtime} state {state.state_dir}"
    snap.put("container.id", state.id, where)
    snap.put("container.runtime", state.runtime, where)
    config = read_oci_config(host, state.bundle, files) if state.bundle else None
    live = Facts()
    root_seen = False  # the init's own root was looked in: its /etc files are its word
    if state.pid:
        pid = state.pid
        root_seen = read_init(host, pid, snap, live)
        _runtime_cgroup_paths(host, state, pid, live)
        paths = live.get("cgroup.paths") or {}
        if _own_cgroup(state, config, str(paths.get("unified", ""))):
            snap.cgroup_id = _cgroup_id(host, paths, live)
        device_cgroup_facts(host, paths, live, snap.cgroup_id or 0)
        snap.add_facts(live, f"container init pid {pid} at start")
    if not root_seen and "container.etc_group" not in snap.facts and state.rootfs:
        for name in ("group", "passwd"):
            # a rootfs a user's state names: only that user's own files are read
            text = read_in_root(host_file(host, state.rootfs), "/etc/" + name,
                                owner=files.owner if files.rootless else None)
            snap.put(f"container.etc_{name}", etc_table(text, name, live),
                     f"{state.rootfs}/etc/{name}")
    if config is not None:
        _config_facts(host, snap, config, state, owner_uid, files)
        _requested_device_rules(host, snap, config, live)
    if snap.cgroup_id is not None:
        snap.put("cgroup.id", snap.cgroup_id, "stat of the container's v2 cgroup")
    return snap


def _config_facts(host: HostPaths, snap: ContainerSnapshot, config: dict[str, object],
                  state: RuntimeState, owner_uid: int, files: StateFiles) -> None:
    origin = os.path.join(state.bundle or "?", "config.json")
    snap.put("container.oci", config, origin)
    annotations = config.get("annotations") or {}
    assert isinstance(annotations, dict)
    identity = docker_identity(host, config, files) or \
        podman_identity(host, config, state.id, owner_uid, files)
    kube = kubernetes_from_annotations(annotations)
    paths = snap.facts.get("cgroup.paths")
    for path in dict.fromkeys(paths.value.values() if paths else ()):  # each once, in order
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
    from tracer.enrichment.host_facts import v1_devices_mount
    if "device_cgroup.v1_rules" in snap.facts or "device_cgroup.version" in snap.facts:
        return
    if v1_devices_mount(host, live) is None:
        return
    raw = config.get("device_rules")
    rules = oci_rules_as_devices_list(raw if isinstance(raw, list) else [])
    if rules is not None:
        origin = "OCI config.json linux.resources.devices (as the runtime applies it)"
        snap.put("device_cgroup.version", 1, origin)
        snap.put("device_cgroup.v1_rules", rules, origin)
