"""Facts about the host: the owning user's groups, NVIDIA driver params, logind
seat sessions and the device-cgroup policy of the process's cgroup."""

from __future__ import annotations

import errno
import os
import select
import threading
import time
from typing import Optional

from tracer.enrichment import bpf_syscall as bpf
from tracer.enrichment import procfs
from tracer.facts import LIVE, Facts
from tracer.enrichment.parse_files import (parse_group_file, parse_logind_session,
                                           parse_nvidia_params, parse_passwd_file, user_gids)
from tracer.enrichment.device_cgroup_v2 import device_program_facts
from tracer.enrichment.device_rules import devices_list_texts
from tracer.enrichment.parse_proc import Mount, parse_mountinfo
from tracer.host import HostPaths

NVIDIA_PARAMS_KEPT = ("DeviceFileUID", "DeviceFileGID", "DeviceFileMode",
                      "ModifyDeviceFiles", "RmProfilingAdminOnly")


def host_group_table(host: HostPaths, facts: Facts) -> None:
    """Host /etc/group as {name: gid}, for naming node groups."""
    path = os.path.join(host.etc, "group")
    text = procfs.read_text(path)
    if text is not None:
        groups = parse_group_file(text, facts.skips)
        facts.put("host.etc_group", {g.name: g.gid for g in groups}, LIVE, path)


def owner_user_facts(host: HostPaths, uid: int, facts: Facts, why: str) -> None:
    """Name and login groups of the host user `uid` (the userns owner, or the process's)."""
    passwd_path = os.path.join(host.etc, "passwd")
    group_path = os.path.join(host.etc, "group")
    facts.put("host.user_uid", uid, "inferred", why)
    passwd_text = procfs.read_text(passwd_path)
    group_text = procfs.read_text(group_path)
    if passwd_text is None or group_text is None:
        return
    users = parse_passwd_file(passwd_text, facts.skips)
    groups = parse_group_file(group_text, facts.skips)
    user = next((u for u in users if u.uid == uid), None)
    if user is None:
        return
    facts.put("host.user_name", user.name, LIVE, passwd_path)
    facts.put("host.user_groups", user_gids(user, groups), LIVE,
              f"{passwd_path} + {group_path}")


def nvidia_params_facts(host: HostPaths, facts: Facts) -> None:
    path = os.path.join(host.proc, "driver/nvidia/params")
    text = procfs.read_text(path)
    if text is None:
        return
    params = parse_nvidia_params(text, facts.skips)
    kept = {k: params[k] for k in NVIDIA_PARAMS_KEPT if k in params}
    facts.put("nvidia.params", kept, LIVE, path)


def logind_session_facts(host: HostPaths, facts: Facts) -> None:
    """Sessions logind knows: uid, seat, active, remote, type."""
    sessions_dir = os.path.join(host.run, "systemd/sessions")
    sessions = []
    for name in procfs.list_dir(sessions_dir):
        if name.endswith(".ref"):
            continue
        text = procfs.read_text(os.path.join(sessions_dir, name))
        if text is None:
            continue
        fields = parse_logind_session(text, facts.skips)
        if not fields.get("UID", "").isdigit():
            facts.skips.skip("logind_session:no_uid")
            continue
        sessions.append({
            "id": name, "uid": int(fields["UID"]), "user": fields.get("USER"),
            "seat": fields.get("SEAT"), "active": fields.get("ACTIVE") == "1",
            "remote": fields.get("REMOTE") == "1", "type": fields.get("TYPE")})
    if os.path.isdir(sessions_dir):
        facts.put("logind.sessions", sessions, LIVE, sessions_dir)


class _WatchedMountTable:
    """The cgroup mounts of /proc/self/mountinfo, parsed again only when the kernel
    says our mount table changed (poll on a mountinfo fd: POLLPRI after any mount
    or unmount in this namespace).  A container start reads them several times."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLPRI | select.POLLERR)
        self.mounts: Optional[list[Mount]] = None
        self.text = ""
        self.lock = threading.Lock()

    def get(self, facts: Facts) -> list[Mount]:
        with self.lock:
            if self.poller.poll(0) or self.mounts is None:
                os.lseek(self.fd, 0, os.SEEK_SET)
                chunks = []
                while True:
                    chunk = os.read(self.fd, 1 << 16)
                    if not chunk:
                        break
                    chunks.append(chunk)
                text = b"".join(chunks).decode("utf-8", "replace")
                if text != self.text:  # runc's own bind mount of itself comes and goes
                    self.text = text
                    self.mounts = [m for m in parse_mountinfo(text, facts.skips)
                                   if m.fstype in ("cgroup", "cgroup2")]
            assert self.mounts is not None
            return self.mounts


_mount_tables: dict[str, _WatchedMountTable] = {}


def cgroup_mounts(host: HostPaths, facts: Facts) -> list[Mount]:
    path = os.path.join(host.proc, "self/mountinfo")
    if procfs.is_live_proc(host.proc):  # procfs tells us when to read it again
        table = _mount_tables.get(path)
        if table is None:
            try:
                table = _mount_tables.setdefault(path, _WatchedMountTable(path))
            except OSError:
                return []
        return table.get(facts)
    text = procfs.read_text(path)  # a fixture tree: read each time
    if text is None:
        return []
    return [m for m in parse_mountinfo(text, facts.skips) if m.fstype in ("cgroup", "cgroup2")]


def _under_sys(host: HostPaths, mount_point: str) -> str:
    """A host mount point, moved under the injected /sys root."""
    if mount_point == "/sys" or mount_point.startswith("/sys/"):
        return os.path.join(host.sys, mount_point[len("/sys"):].lstrip("/"))
    return mount_point


def _cgroup_dir(host: HostPaths, mount: Mount, cgroup_path: str) -> Optional[str]:
    """The host directory of `cgroup_path` in a hierarchy mounted at `mount`."""
    root = mount.root.rstrip("/")
    if root and not (cgroup_path == root or cgroup_path.startswith(root + "/")):
        return None  # the mount shows only a subtree that does not hold this cgroup
    rel = cgroup_path[len(root):].lstrip("/")
    base = _under_sys(host, mount.mount_point)
    return os.path.join(base, rel) if rel else base


def cgroup2_mount_dir(host: HostPaths) -> Optional[str]:
    """Where the cgroup2 hierarchy is mounted (under the injected /sys), if it is."""
    mount = next((m for m in cgroup_mounts(host, Facts()) if m.fstype == "cgroup2"), None)
    return None if mount is None else _under_sys(host, mount.mount_point)


def v1_devices_mount(host: HostPaths, facts: Facts) -> Optional[Mount]:
    """The mount of the v1 `devices` controller; None where it is not mounted."""
    return next((m for m in cgroup_mounts(host, facts)
                 if m.fstype == "cgroup" and "devices" in m.super_options), None)


def v1_devices_dir(host: HostPaths, cgroup_path: str, facts: Facts) -> Optional[str]:
    """The host directory of a v1 `devices` cgroup path (as /proc/PID/cgroup gives it)."""
    mount = v1_devices_mount(host, facts)
    return None if mount is None else _cgroup_dir(host, mount, cgroup_path)


def device_cgroup_facts(host: HostPaths, cgroup_paths: dict[str, str], facts: Facts,
                        cgroup_id: Optional[int] = None) -> None:
    """Both device cgroup layers the kernel asks: v2 programs (BPF_PROG_QUERY on the
    process's v2 cgroup, found by the kernel-captured id or the `0::` path) and the
    v1 `devices.list` allowlist, when the v1 controller is mounted."""
    mounts = cgroup_mounts(host, facts)
    v1_path = next((p for ctrls, p in cgroup_paths.items() if "devices" in ctrls.split(",")),
                   None)
    v1_mount = v1_devices_mount(host, facts)
    v2_mount = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if v2_mount is not None:
        mount_dir = _under_sys(host, v2_mount.mount_point)
        v2_path = cgroup_paths.get("unified")
        if v2_path is not None and v2_mount.root not in ("", "/"):
            v2_path = None  # a mount of a subtree: the id still finds the cgroup
        device_program_facts(mount_dir, cgroup_id, v2_path, facts)
        if v1_path is None:
            facts.put("device_cgroup.version", 2, LIVE, mount_dir)
    if v1_path is not None and v1_mount is not None:
        cg_dir = _cgroup_dir(host, v1_mount, v1_path)
        list_path = os.path.join(cg_dir, "devices.list") if cg_dir else None
        text = procfs.read_text(list_path) if list_path else None
        if text is not None and list_path is not None:
            rules = devices_list_texts(text, facts.skips)
            facts.put("device_cgroup.version", 1, LIVE, list_path)
            facts.put("device_cgroup.v1_rules", list(rules), LIVE, list_path)


# a v1 devices cgroup's devices.list as read by its id: (where it was, its text)
V1Reading = tuple[str, str]


def read_v1_list_by_id(host: HostPaths, mount: Mount, devices_cgroup_id: int) -> V1Reading:
    """devices.list of the v1 devices cgroup with this kernfs id; OSError when the
    cgroup cannot be opened (gone) or read."""
    base = _under_sys(host, mount.mount_point)
    fd = bpf.open_cgroup_by_id(base, devices_cgroup_id)
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
        text = procfs.read_text(f"/proc/self/fd/{fd}/devices.list")
    finally:
        os.close(fd)
    if text is None:
        raise OSError(errno.EIO, "devices.list could not be read")
    return where, text


def v1_list_at_arrival(host: HostPaths, devices_cgroup_id: int) -> Optional[V1Reading]:
    """The reading `read_v1_list_by_id` gives now, for a denial that just arrived: a
    transient unit's or --rm container's cgroup may be removed before enrichment."""
    mount = v1_devices_mount(host, Facts())
    if mount is None:
        return None
    try:
        return read_v1_list_by_id(host, mount, devices_cgroup_id)
    except OSError:
        return None


def _v1_rules_by_id(mount: Mount, host: HostPaths, devices_cgroup_id: int,
                    facts: Facts, arrival: Optional[V1Reading] = None) -> None:
    """devices.list of the v1 devices cgroup whose kernfs id the sensor captured; when
    that cgroup is gone by now, the reading taken as the denial arrived."""
    base = _under_sys(host, mount.mount_point)
    try:
        where, text = read_v1_list_by_id(host, mount, devices_cgroup_id)
        origin = f"{where}/devices.list (cgroup id {devices_cgroup_id}, captured at the denial)"
    except OSError as exc:
        if arrival is None:
            facts.put("device_cgroup.v1_unreadable", f"the process's v1 devices cgroup (id "
                      f"{devices_cgroup_id}) could not be read: {exc.strerror or exc}", LIVE, base)
            return
        where, text = arrival
        origin = (f"{where}/devices.list (cgroup id {devices_cgroup_id}, read as the event "
                  f"arrived; removed before enrichment)")
    facts.put("device_cgroup.version", 1, LIVE, origin)
    facts.put("device_cgroup.v1_rules", list(devices_list_texts(text, facts.skips)), LIVE, origin)
    if "cgroup.paths" not in facts:
        facts.put("cgroup.paths", {"devices": where[len(base):] or "/"}, LIVE, origin)


def v1_rules_by_id(host: HostPaths, devices_cgroup_id: int, facts: Facts,
                   arrival: Optional[V1Reading] = None) -> None:
    """A process whose /proc/PID/cgroup no longer shows its v1 devices cgroup (it exited,
    or is a zombie): devices.list of the cgroup whose id the sensor captured."""
    v1_mount = v1_devices_mount(host, facts)
    if v1_mount is not None and "device_cgroup.v1_rules" not in facts:
        _v1_rules_by_id(v1_mount, host, devices_cgroup_id, facts, arrival)


def device_programs_by_cgroup_id(host: HostPaths, cgroup_id: int, facts: Facts,
                                 devices_cgroup_id: Optional[int] = None,
                                 arrival: Optional[V1Reading] = None) -> None:
    """An exited process: v2 device programs of the cgroup with this id, and the v1
    devices.list of the devices cgroup whose id the sensor captured (both may outlive
    the process)."""
    v1_mount = v1_devices_mount(host, facts)
    if v1_mount is not None and "device_cgroup.v1_rules" not in facts:
        if devices_cgroup_id:
            _v1_rules_by_id(v1_mount, host, devices_cgroup_id, facts, arrival)
        else:
            facts.put("device_cgroup.v1_unreadable", "the process exited before its v1 devices "
                      "cgroup was read", "inferred", "no /proc/PID/cgroup")
    if cgroup_id < 1:
        return  # not captured with the event
    v2_mount = next((m for m in cgroup_mounts(host, facts) if m.fstype == "cgroup2"), None)
    if v2_mount is not None:
        device_program_facts(_under_sys(host, v2_mount.mount_point), cgroup_id, None, facts)


LSM_FACTS_TTL_S = 5.0  # host-wide and slow to change; a storm must not walk every BPF program
_lsm_cache: dict[str, tuple[float, Optional[list[str]], "int | str | None"]] = {}


def security_module_facts(host: HostPaths, facts: Facts) -> None:
    """lsm.active: the LSMs the kernel runs, in order (securityfs `lsm`); with the BPF
    LSM, lsm.bpf_programs: how many BPF_PROG_TYPE_LSM programs are loaded."""
    path = os.path.join(host.sys, "kernel/security/lsm")
    now = time.monotonic()
    cached = _lsm_cache.get(path)
    if cached is None or now - cached[0] > LSM_FACTS_TTL_S:
        text = procfs.read_text(path)
        names = None if text is None else \
            [n for n in text.strip().split(",") if n and n.replace("_", "").isalnum()][:16]
        count: "int | str | None" = None  # str: why it is not known
        if names is not None and "bpf" in names:  # refuses only through loaded LSM programs
            try:
                count = bpf.prog_type_count(bpf.BPF_PROG_TYPE_LSM)
            except OSError as exc:
                needs = exc.needs() if isinstance(exc, bpf.BpfCallFailed) else ""
                count = f"{exc.strerror or exc}" + (f" ({needs})" if needs else "")
        cached = (now, names, count)
        if names is not None:  # not mounted yet is not cached: a mount shows at once
            _lsm_cache[path] = cached
    _, names, count = cached
    if names is None:
        facts.put("lsm.active_unknown", "securityfs is not mounted at "
                  + os.path.join(host.sys, "kernel/security"), LIVE, path)
        return
    facts.put("lsm.active", names, LIVE, path)
    if isinstance(count, int):
        facts.put("lsm.bpf_programs", count, LIVE, "bpf(BPF_PROG_GET_NEXT_ID)")
    elif count is not None:
        facts.put("lsm.bpf_programs_unknown", f"BPF LSM programs could not be counted: {count}",
                  LIVE, "bpf(BPF_PROG_GET_NEXT_ID)")
