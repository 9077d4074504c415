"""The systemd unit a process runs in, and its device sandboxing.

A process in `/system.slice/NAME.service` (or a user manager's
`/user.slice/user-UID.slice/user@UID.service/.../NAME.service`) is named by its
unit.  The unit's `PrivateDevices=`, `DevicePolicy=`, `DeviceAllow=` and
`NoNewPrivileges=` are read from systemd over D-Bus when it answers
(systemd_dbus.py), else from the unit file and its drop-ins, in systemd's
order of precedence.  A `DeviceAllow=` path is resolved to the node's device
number on the host now (systemd resolved it when the unit started).
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Optional

from tracer.enrichment import procfs
from tracer.enrichment.bpf_syscall import open_cgroup_by_id
from tracer.enrichment.host_facts import cgroup_mounts
from tracer.enrichment.host_facts import _under_sys as under_sys
from tracer.enrichment.node import NodeStatter, stat_in_root
from tracer.enrichment.parse_files import parse_passwd_file
from tracer.enrichment.systemd_dbus import unit_properties_dbus
from tracer.facts import INFERRED, LIVE, Facts
from tracer.host import HostPaths

UNIT_NAME = re.compile(r"[A-Za-z0-9:_.\\@-]{1,255}\.service")
USER_MANAGER = re.compile(r"user@(\d{1,10})\.service")
TRUE = ("1", "yes", "true", "on")
CACHE_TTL_S = 5.0
MAX_FILE_BYTES = 256 << 10
MAX_DROP_INS = 256  # per drop-in directory; a user's own directory may hold any number
_cache: dict[tuple[str, str, Optional[int]], tuple[float, Optional[dict[str, Any]], str]] = {}


def unit_of_cgroup(path: str) -> Optional[tuple[str, Optional[int]]]:
    """(unit, uid of its user manager or None) for a cgroup path; None outside a service."""
    unit: Optional[str] = None
    user: Optional[int] = None
    for part in path.split("/"):
        manager = USER_MANAGER.fullmatch(part)
        if manager:
            user, unit = int(manager.group(1)), None
        elif UNIT_NAME.fullmatch(part):
            unit = part
    if unit is None:
        return None
    return unit, user


def _search_dirs(host: HostPaths, user: Optional[int], home: Optional[str]) -> list[str]:
    root = os.path.dirname(host.etc.rstrip("/")) or "/"
    lib = [os.path.join(root, d) for d in ("usr/local/lib/systemd", "usr/lib/systemd", "lib/systemd")]
    if user is None:
        return ([os.path.join(host.etc, "systemd/system.control"),
                 os.path.join(host.run, "systemd/system.control"),
                 os.path.join(host.run, "systemd/transient"),
                 os.path.join(host.etc, "systemd/system"), os.path.join(host.run, "systemd/system")]
                + [os.path.join(d, "system") for d in lib])
    own = [os.path.join(root, home.lstrip("/"), ".config/systemd/user")] if home else []
    return ([os.path.join(host.run, f"user/{user}/systemd/transient")] + own
            + [os.path.join(host.etc, "systemd/user"), os.path.join(host.run, "systemd/user")]
            + [os.path.join(d, "user") for d in lib])


def _unit_files(dirs: list[str], unit: str) -> list[str]:
    """The unit file (first in precedence), then its drop-ins in systemd's order:
    sorted by file name, a name in a directory of higher precedence hiding the same
    name below it; template (`a@.service`) and type-wide (`service.d`) drop-ins too."""
    names = [unit]
    if "@" in unit:
        names.append(unit.split("@", 1)[0] + "@.service")
    main = next((os.path.join(d, n) for n in names for d in dirs
                 if os.path.isfile(os.path.join(d, n))), None)
    drop_ins: dict[str, str] = {}
    for directory in reversed(dirs):  # lowest precedence first; higher ones replace
        for sub in ["service.d"] + [n + ".d" for n in reversed(names)]:
            folder = os.path.join(directory, sub)
            for name in procfs.list_dir(folder)[:MAX_DROP_INS]:
                if name.endswith(".conf"):
                    drop_ins[name] = os.path.join(folder, name)
    return ([main] if main else []) + [drop_ins[n] for n in sorted(drop_ins)]


def _service_lines(text: str) -> list[tuple[str, str]]:
    """KEY=VALUE lines of the [Service] section (continuations joined, comments dropped)."""
    out: list[tuple[str, str]] = []
    section, pending = "", ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service" and "=" in line:
            key, _, value = line.partition("=")
            out.append((key.strip(), value.strip()))
    return out


def properties_from_files(paths: list[str], owner: Optional[int] = None) -> dict[str, Any]:
    """The four properties as the files set them, with systemd's defaults.  A user
    unit's files (`owner`) are that user's: read only when theirs or root's, and like
    every unit file never when not a regular file (a FIFO would block for good)."""
    props: dict[str, Any] = {"PrivateDevices": False, "NoNewPrivileges": False,
                             "DevicePolicy": "auto", "DeviceAllow": []}
    for path in paths:
        text = procfs.read_regular_text(path, MAX_FILE_BYTES, owner)
        for key, value in _service_lines(text or ""):
            if key in ("PrivateDevices", "NoNewPrivileges"):
                props[key] = value.lower() in TRUE
            elif key == "DevicePolicy" and value in ("auto", "closed", "strict"):
                props[key] = value
            elif key == "DeviceAllow":
                if not value:
                    props["DeviceAllow"] = []  # an empty assignment resets the list
                else:
                    spec, _, access = value.partition(" ")
                    props["DeviceAllow"].append([spec, access.strip() or "rwm"])
    return props


def _home_of(host: HostPaths, uid: int, facts: Facts) -> Optional[str]:
    text = procfs.read_text(os.path.join(host.etc, "passwd"))
    users = parse_passwd_file(text or "", facts.skips)
    return next((u.home for u in users if u.uid == uid), None)


def unit_properties(host: HostPaths, unit: str, user: Optional[int],
                    facts: Facts) -> tuple[Optional[dict[str, Any]], str]:
    """(properties, where they came from); cached briefly (units change rarely)."""
    key = (host.run, unit, user)
    now = time.monotonic()
    cached = _cache.get(key)
    if cached is not None and now - cached[0] < CACHE_TTL_S:
        return cached[1], cached[2]
    props = unit_properties_dbus(host, unit) if user is None else None
    origin = "systemd over D-Bus (org.freedesktop.systemd1)"
    if props is None:
        home = _home_of(host, user, facts) if user is not None else None
        paths = _unit_files(_search_dirs(host, user, home), unit)
        props = properties_from_files(paths, user) if paths else None
        origin = "unit files: " + ", ".join(paths) if paths else "no unit file found"
    _cache[key] = (now, props, origin)
    if len(_cache) > 256:
        _cache.pop(next(iter(_cache)))
    return props, origin


def _resolve_paths(host: HostPaths, allow: list[list[str]],
                   statter: NodeStatter) -> list[dict[str, Any]]:
    """Each DeviceAllow= entry, with a path entry's device number on the host now."""
    root = os.path.dirname(host.dev.rstrip("/")) or "/"
    out = []
    for spec, access in allow[:64]:
        entry: dict[str, Any] = {"spec": spec, "access": access}
        if spec.startswith("/dev/"):
            found = statter(root, spec)
            entry["device"] = (f"{found.major}:{found.minor}" if found is not None
                               and found.is_char_device else None)
        out.append(entry)
    return out


def cgroup_path_by_id(host: HostPaths, cgroup_id: int, facts: Facts) -> Optional[str]:
    """The v2 cgroup path of the kernel-captured cgroup id (a process gone, or in a
    pid namespace gputrace cannot see): open it by id, read the fd's path back."""
    mount = next((m for m in cgroup_mounts(host, facts) if m.fstype == "cgroup2"), None)
    if mount is None or cgroup_id <= 1:
        return None
    base = under_sys(host, mount.mount_point).rstrip("/")
    try:
        fd = open_cgroup_by_id(base, cgroup_id)
    except OSError:
        return None
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    finally:
        os.close(fd)
    return where[len(base):] or "/" if where.startswith(base + "/") or where == base else None


def systemd_unit_facts(host: HostPaths, cgroup_paths: dict[str, str], facts: Facts,
                       statter: NodeStatter = stat_in_root) -> None:
    """systemd.unit, systemd.user_manager_uid and systemd.unit_properties."""
    path = cgroup_paths.get("unified") or cgroup_paths.get("name=systemd")
    found = unit_of_cgroup(path) if path else None
    if found is None:
        return
    unit, user = found
    facts.put("systemd.unit", unit, INFERRED, f"cgroup {path}")
    if user is not None:
        facts.put("systemd.user_manager_uid", user, INFERRED, f"cgroup {path}")
    props, origin = unit_properties(host, unit, user, facts)
    if props is None:
        return
    props = dict(props, DeviceAllow=_resolve_paths(host, props["DeviceAllow"], statter))
    facts.put("systemd.unit_properties", props, LIVE, origin)
