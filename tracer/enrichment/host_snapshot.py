"""The host snapshot (enrichment of a report): kernel, distro, driver, GPU nodes,
engines, configs.  The report sink only renders what this gathers.

Everything is read through `HostPaths` and a `NodeStatter`, so a snapshot of a
recorded host tree (tests/fixtures) comes out the same way as a live one.
Tool versions come from a `VersionProbe`; the live one runs `<tool> --version`.
Nothing here raises on a missing or malformed file: absent facts are null and
unreadable configs carry an `error`.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import stat
import subprocess
import sys
from typing import Any, Callable, Optional

from tracer.facts import SkipCounter
from tracer.enrichment.cdi_specs import read_specs, summary as cdi_summary
from tracer.enrichment.toolkit_config import read_toolkit_config
from tracer.enrichment.node import NodeStatter, classify_node, stat_in_root
from tracer.enrichment.parse_files import (GroupEntry, PasswdEntry, parse_group_file,
                                           parse_nvidia_params, parse_passwd_file, user_gids)
from tracer.enrichment.posix_acl import perm_text
from tracer.enrichment.parse_proc import mount_holding, parse_mountinfo
from tracer.enrichment.procfs import read_text
from tracer.host import HostPaths

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

VersionProbe = Callable[[str], Optional[str]]
ENGINES = ("podman", "docker", "containerd", "crio", "nerdctl")
OCI_RUNTIMES = ("runc", "crun", "nvidia-container-runtime", "nvidia-ctk", "nvidia-container-cli")
NODE_GLOBS = ("nvidia*", "nvidia-caps/*", "dri/*", "nvhost-*", "nvmap", "nvgpu/*")
GPU_GROUP_NAMES = ("video", "render")


def live_version(tool: str) -> Optional[str]:
    """First line of `tool --version`, or None when the tool is not installed."""
    exe = shutil.which(tool)
    if exe is None:
        return None
    args = [exe, "version"] if tool in ("nvidia-container-cli",) else [exe, "--version"]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0].strip() if text else "unknown"


def _etc_tables(host: HostPaths) -> tuple[list[PasswdEntry], list[GroupEntry]]:
    skips = SkipCounter()
    passwd = parse_passwd_file(read_text(os.path.join(host.etc, "passwd")) or "", skips)
    groups = parse_group_file(read_text(os.path.join(host.etc, "group")) or "", skips)
    return passwd, groups


def os_release(host: HostPaths) -> dict[str, str]:
    text = read_text(os.path.join(host.etc, "os-release")) or ""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("ID", "VERSION_ID", "PRETTY_NAME"):
            out[key.lower()] = value.strip().strip('"')
    return out


def nvidia_driver(host: HostPaths) -> dict[str, Any]:
    base = os.path.join(host.proc, "driver/nvidia")
    version = read_text(os.path.join(base, "version"))
    params = read_text(os.path.join(base, "params"))
    return {"loaded": os.path.isdir(base),
            "version": version.splitlines()[0].strip() if version else None,
            "params": parse_nvidia_params(params, SkipCounter()) if params is not None else None}


def _mode_text(mode: int) -> str:
    return f"{stat.S_IMODE(mode):04o}"


def gpu_nodes(host: HostPaths, statter: NodeStatter) -> list[dict[str, Any]]:
    passwd, groups = _etc_tables(host)
    users = {u.uid: u.name for u in passwd}
    gnames = {g.gid: g.name for g in groups}
    mounts = parse_mountinfo(read_text(os.path.join(host.proc, "self/mountinfo"))
                             or read_text(os.path.join(host.proc, "1/mountinfo")) or "",
                             SkipCounter())
    root = os.path.dirname(host.dev.rstrip("/")) or "/"
    found = []
    for pattern in NODE_GLOBS:
        for real in sorted(glob.glob(os.path.join(host.dev, pattern))):
            if os.path.isdir(real) and not os.path.islink(real):
                continue
            found.append("/dev/" + os.path.relpath(real, host.dev))
    out = []
    for path in found:
        st = statter(root, path)
        if st is None:
            continue
        acl = st.acl(SkipCounter())
        mount = mount_holding(path, mounts)
        out.append({
            "path": path, "class": classify_node(path, st.major, st.minor, {}),
            "type": "char" if st.is_char_device else "other",
            "major": st.major, "minor": st.minor, "mode": _mode_text(st.mode),
            "uid": st.uid, "owner": users.get(st.uid), "gid": st.gid, "group": gnames.get(st.gid),
            "acl": None if acl is None else [
                {"tag": e.tag, "id": e.id, "perm": perm_text(e.perm),
                 "name": (users if e.tag == "user" else gnames).get(e.id) if e.id is not None else None}
                for e in acl],
            "selinux": st.selinux,
            "mount": None if mount is None else {
                "mount_point": mount.mount_point, "fstype": mount.fstype,
                "options": list(mount.options), "nodev": "nodev" in mount.options},
        })
    return out


def _parse_toml(path: str) -> Optional[dict[str, Any]]:
    text = read_text(path)
    if text is None:
        return None
    entry: dict[str, Any] = {"path": path}
    try:
        entry["content"] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        entry["error"] = str(exc).splitlines()[0]
    return entry


def containers_conf(host: HostPaths, homes: list[str]) -> list[dict[str, Any]]:
    """containers.conf files and what matters in them: annotations and the runtime."""
    etc = host.etc
    root = os.path.dirname(etc.rstrip("/")) or "/"
    paths = [os.path.join(root, "usr/share/containers/containers.conf"),
             os.path.join(etc, "containers/containers.conf")]
    paths += sorted(glob.glob(os.path.join(etc, "containers/containers.conf.d/*.conf")))
    paths += [os.path.join(root, home.lstrip("/"), ".config/containers/containers.conf")
              for home in homes]
    out = []
    for path in paths:
        entry = _parse_toml(path)
        if entry is None:
            continue
        content = entry.pop("content", None) or {}
        entry["annotations"] = list((content.get("containers") or {}).get("annotations") or [])
        entry["keep_original_groups"] = any("keep_original_groups=1" in str(a)
                                            for a in entry["annotations"])
        entry["runtime"] = (content.get("engine") or {}).get("runtime")
        out.append(entry)
    return out


def cdi_specs(host: HostPaths) -> list[dict[str, Any]]:
    """Every CDI spec as the one CDI model reads it (enrichment/cdi_specs.py)."""
    return [cdi_summary(spec) for spec in read_specs(host)]


def relevant_users(host: HostPaths, uids: set[int]) -> list[dict[str, Any]]:
    """Users seen in denials and members of the GPU groups, with their groups."""
    passwd, groups = _etc_tables(host)
    gpu_members = {m for g in groups if g.name in GPU_GROUP_NAMES for m in g.members}
    names = {g.gid: g.name for g in groups}
    out = []
    for user in passwd:
        if user.uid in uids or user.name in gpu_members:
            gids = user_gids(user, groups)
            out.append({"name": user.name, "uid": user.uid, "home": user.home,
                        "groups": [{"gid": g, "name": names.get(g)} for g in gids]})
    return out


def host_snapshot(host: HostPaths, statter: NodeStatter = stat_in_root,
                  versions: VersionProbe = live_version, uids: frozenset[int] = frozenset()
                  ) -> dict[str, Any]:
    users = relevant_users(host, set(uids))
    homes = [u["home"] for u in users if u["home"] not in ("/", "")]
    runtime_cfg = read_toolkit_config(host)
    tools = {t: versions(t) for t in ENGINES + OCI_RUNTIMES}
    return {
        "hostname": (read_text(os.path.join(host.proc, "sys/kernel/hostname")) or "").strip() or None,
        "kernel": {"release": (read_text(os.path.join(host.proc, "sys/kernel/osrelease")) or "").strip() or None,
                   "version": (read_text(os.path.join(host.proc, "version")) or "").strip() or None},
        "distro": os_release(host),
        "nvidia": nvidia_driver(host),
        "gpu_nodes": gpu_nodes(host, statter),
        "engines": [{"name": t, "version": tools[t]} for t in ENGINES if tools[t]],
        "oci_runtimes": [{"name": t, "version": tools[t]} for t in OCI_RUNTIMES if tools[t]],
        "containers_conf": containers_conf(host, homes),
        "nvidia_container_runtime_config": runtime_cfg,
        "cdi_specs": cdi_specs(host),
        "users": users,
    }


def recorded_versions(path: str) -> VersionProbe:
    """A probe answering from a JSON file {tool: version} (recorded host trees)."""
    with open(path, encoding="utf-8") as handle:
        table: dict[str, str] = json.load(handle)
    return table.get
