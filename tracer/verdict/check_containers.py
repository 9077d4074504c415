"""`gputrace check --containers`: GPU nodes a running container can open now
that the next re-apply of its device rules will take away.

A runtime or systemd re-applies what the container's OCI config grants
(`linux.resources.devices`).  A GPU allowed now but not in the config was
granted from outside (the NVIDIA legacy hook, a devices.allow write, a v2
program replaced by a hook) and goes at the next `systemctl daemon-reload`,
resource update or restart.  With the systemd cgroup driver a configured rule
also goes when `/dev/char/MAJOR:MINOR` is missing: systemd expresses the rule
through that path.  Same device-rule model as a real denial; nothing is traced.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from tracer.enrichment import procfs
from tracer.enrichment.container_snapshot import snapshot_container
from tracer.enrichment.container_state import read_runtime_state
from tracer.enrichment.container_tracker import STATE_ROOTS
from tracer.enrichment.state_files import StateFiles
from tracer.enrichment.device_rules import policies_from_facts
from tracer.in_root import open_in_root
from tracer.enrichment.parse_proc import parse_proc_devices
from tracer.facts import Facts
from tracer.host import HostPaths
from tracer.sensors.gpu_nodes import classify_node, is_gpu_driver
from tracer.verdict.catalog import runtime_key
from tracer.verdict.device_rule_story import cgroup_manager, config_grants
from tracer.verdict.fixes import ranked_fixes
from tracer.verdict import reasons as R

DEV_DIRS = ("/dev", "/dev/dri", "/dev/nvidia-caps", "/dev/nvgpu")
MAX_NODES = 256
GPU_MAJORS_ALWAYS = {195: "nvidia", 226: "drm"}


@dataclass
class ContainerNodeRow:
    container: str
    engine: Optional[str]
    node: str                        # the path inside the container
    device: str                      # "c 195:0"
    node_class: str
    allowed_now: Optional[bool]
    in_config: Optional[bool]
    dev_char_link: bool
    manager: str                     # systemd | cgroupfs | unknown
    at_risk: bool
    why: str
    fixes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _expand(host: HostPaths, parts: tuple[str, ...]) -> list[str]:
    """The directories a STATE_ROOTS pattern names ("*": any, "#": a uid)."""
    found = [host.run]
    for part in parts:
        nxt = []
        for base in found:
            names = procfs.list_dir(base) if part in ("*", "#") else [part]
            nxt += [os.path.join(base, n) for n in names
                    if (part != "#" or n.isdigit()) and os.path.isdir(os.path.join(base, n))]
        found = nxt
    return found


def running_containers(host: HostPaths,
                       extra_roots: Iterable[tuple[str, str]] = ()) -> list[tuple[Any, StateFiles]]:
    """(runtime state, its state files) of every container whose init still runs, read
    as the tracker reads them: untrusted, a rootless init checked against its owner."""
    roots = [(d, rt) for parts, rt in STATE_ROOTS for d in _expand(host, parts)]
    roots += list(extra_roots)
    out = []
    for root, runtime in roots:
        files = StateFiles.of(root)
        if files is None:
            continue
        for cid in procfs.list_dir(root):
            state = read_runtime_state(host, runtime, root, cid, files)
            if state is None:
                continue
            state.pid, _ = files.init_pid(host.proc, state.pid)
            if state.pid:
                out.append((state, files))
    return out


def _gpu_majors(host: HostPaths, facts: Facts) -> dict[int, str]:
    found = parse_proc_devices(procfs.read_text(os.path.join(host.proc, "devices")) or "",
                               facts.skips)
    majors = dict(GPU_MAJORS_ALWAYS)
    majors.update({m: n for m, n in found.items() if is_gpu_driver(n)})
    return majors


def container_gpu_nodes(root: str, majors: dict[int, str]) -> list[tuple[str, int, int]]:
    """(path, major, minor) of the GPU character nodes in the container's /dev, read
    inside its root (no symlink followed, no way out)."""
    out: list[tuple[str, int, int]] = []
    for directory in DEV_DIRS:
        fd = open_in_root(root, directory, os.O_RDONLY | os.O_DIRECTORY)
        if fd is None:
            continue
        try:
            for name in sorted(os.listdir(fd))[:4096]:
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) in majors:
                    out.append((f"{directory}/{name}", os.major(st.st_rdev), os.minor(st.st_rdev)))
        finally:
            os.close(fd)
    return out[:MAX_NODES]


def _dev_char(host: HostPaths, major: int, minor: int) -> bool:
    try:
        st = os.stat(os.path.join(host.dev, "char", f"{major}:{minor}"))
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (major, minor)


def _allowed_now(facts: Facts, major: int, minor: int) -> Optional[bool]:
    policies = policies_from_facts(facts.get("device_cgroup.v1_rules"),
                                   facts.get("device_cgroup.v2_programs"),
                                   facts.get("device_cgroup.v2_unreadable"), facts.skips)
    if not policies:
        return None
    answers = [p.may("c", major, minor, "rw").allowed for p in policies]
    return False if False in answers else None if None in answers else True


def check_containers(host: HostPaths, extra_roots: Iterable[tuple[str, str]] = ()) -> list[ContainerNodeRow]:
    """One row per GPU node in each running container's /dev."""
    rows = []
    base = Facts()
    majors = _gpu_majors(host, base)
    for state, files in running_containers(host, extra_roots):
        snap = snapshot_container(host, state, files.owner, files)
        facts = snap.to_facts("read now by gputrace check")
        name = str(facts.get("container.name") or state.id[:12])
        manager = cgroup_manager(facts)
        for path, major, minor in container_gpu_nodes(host.proc_pid(state.pid, "root"), majors):
            rows.append(_row(host, facts, name, path, major, minor, manager, majors))
    return rows


def _row(host: HostPaths, facts: Facts, name: str, path: str, major: int, minor: int,
         manager: str, majors: dict[int, str]) -> ContainerNodeRow:
    now = _allowed_now(facts, major, minor)
    in_config, _ = config_grants(facts, "c", major, minor, "rw")
    link = _dev_char(host, major, minor)
    node_class = classify_node(path, major, minor, majors)
    at_risk, why = False, ""
    if now and in_config is False:
        at_risk, why = True, ("allowed now, but not by the container's OCI config: granted "
                              "from outside (a hook or a devices.allow write)")
    elif now and in_config and manager == "systemd" and not link:
        at_risk, why = True, (f"in the OCI config, but /dev/char/{major}:{minor} is missing, "
                              "so systemd cannot keep its rule")
    elif now and in_config is None:
        why = "allowed now; the container's OCI config could not be read"
    elif now is False:
        why = "not allowed now"
    elif now is None:
        why = "the device rules could not be read"
    fixes: list[str] = []
    if at_risk:
        ctx = {"node_path": path, "path": path, "node_class": node_class, "major": major,
               "minor": minor, "manager": manager, "dev_char_missing": not link,
               "story": "outside_config" if in_config is False else "config_not_kept",
               "runtime": runtime_key(facts), "device_layer": None}
        fixes = [f.command for f in ranked_fixes(R.DEVICE_CGROUP_REVOKED, ctx)][:3]
    return ContainerNodeRow(name, facts.get("container.engine"), path, f"c {major}:{minor}",
                            node_class, now, in_config, link, manager, at_risk, why, fixes)

