"""`gputrace check`: predict, without tracing, which GPU nodes a user can open
on the host and under common runtimes, with the same access model and catalog
that explain real denials."""

from __future__ import annotations

import errno as errno_mod
import os
import stat as stat_mod
from dataclasses import dataclass, field
from typing import Any, Optional

from tracer.enrichment import procfs
from tracer.facts import INFERRED, Facts
from tracer.enrichment.host_facts import logind_session_facts, nvidia_params_facts
from tracer.enrichment.node import NodeStatter, classify_node, stat_in_root
from tracer.enrichment.node_facts import host_root
from tracer.enrichment.parse_files import parse_group_file, parse_passwd_file, user_gids
from tracer.enrichment.parse_proc import parse_proc_devices
from tracer.errors import BadInput
from tracer.host import HostPaths
from tracer.verdict.catalog import classify
from tracer.verdict.fixes import ranked_fixes
from tracer.verdict.explain import later_refusals, then_note
from tracer.verdict.model_input import run_model

CHECK_RUNTIMES = ("host", "podman-runc", "podman-crun-keep-groups", "docker-device",
                  "docker-bind-mount")
GPU_NODE_GLOBS = ("nvidia", "nvidia-caps", "dri", "nvgpu", "nvmap", "nvhost-")
ALL_CAPS = (1 << 41) - 1
# docker's default set: CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP
# NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP
DOCKER_DEFAULT_CAPS = sum(1 << bit for bit in (0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31))
# docker/runc's default device allowlist: null, zero, full, random, urandom, tty*, pts, fuse
DOCKER_DEFAULT_DEVICES = ["c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm", "c 1:9 rwm",
                          "c 5:0 rwm", "c 5:1 rwm", "c 5:2 rwm", "c 136:* rwm", "c 10:229 rwm",
                          "c *:* m", "b *:* m"]
SUBID_BASE, SUBID_COUNT = 100000, 65536


@dataclass
class CheckRow:
    node: str
    node_class: str
    runtime: str
    allowed: Optional[bool]  # None: a layer of the scenario is not known
    errno: Optional[str]
    check: Optional[str]
    reason: Optional[str]
    fix: Optional[str]
    ladder: list[str] = field(default_factory=list)  # "layer: allows|refuses|unknown (check)"
    then: list[str] = field(default_factory=list)    # layers that would refuse after the fix

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def gpu_nodes(host: HostPaths) -> list[str]:
    """Paths (as "/dev/...") of the GPU nodes under the host's /dev."""
    found = []
    for name in procfs.list_dir(host.dev):
        if not name.startswith(GPU_NODE_GLOBS):
            continue
        full = os.path.join(host.dev, name)
        if os.path.isdir(full) and not os.path.islink(full):
            found += [f"/dev/{name}/{sub}" for sub in procfs.list_dir(full)
                      if name != "dri" or sub.startswith(("card", "renderD"))]
        else:
            found.append(f"/dev/{name}")
    return found


def _user(host: HostPaths, name: str, facts: Facts) -> tuple[int, int, list[int]]:
    passwd = procfs.read_text(os.path.join(host.etc, "passwd")) or ""
    groups_text = procfs.read_text(os.path.join(host.etc, "group")) or ""
    users = parse_passwd_file(passwd, facts.skips)
    user = next((u for u in users if u.name == name or str(u.uid) == name), None)
    if user is None:
        raise BadInput(f"no user {name!r} in {os.path.join(host.etc, 'passwd')}")
    groups = parse_group_file(groups_text, facts.skips)
    facts.put("host.etc_group", {g.name: g.gid for g in groups}, INFERRED, "host /etc/group")
    return user.uid, user.gid, user_gids(user, groups)


def _scenario_facts(runtime: str, uid: int, gid: int, gids: list[int]) -> dict[str, Any]:
    """The credentials a process of this user gets under each runtime."""
    rootless = {"userns.level": 1, "userns.owner_uid": uid,
                "userns.uid_map": [[0, uid, 1], [1, SUBID_BASE, SUBID_COUNT]],
                "userns.gid_map": [[0, gid, 1], [1, SUBID_BASE, SUBID_COUNT]],
                "process.fsuid": uid, "process.fsgid": gid, "container.engine": "podman",
                "container.rootless": True, "process.cap_effective": f"{ALL_CAPS:016x}"}
    if runtime == "host":
        return {"userns.level": 0, "process.fsuid": uid, "process.fsgid": gid,
                "process.groups": gids, "process.cap_effective": "0" * 16}
    if runtime == "podman-runc":
        return dict(rootless, **{"process.groups": [gid], "container.runtime": "runc"})
    if runtime == "podman-crun-keep-groups":
        return dict(rootless, **{"process.groups": gids, "container.runtime": "crun"})
    docker = {"userns.level": 0, "process.fsuid": 0, "process.fsgid": 0, "process.groups": [0],
              "process.cap_effective": f"{DOCKER_DEFAULT_CAPS:016x}", "container.engine": "docker"}
    if runtime == "docker-bind-mount":
        return dict(docker, **{"device_cgroup.v1_rules": DOCKER_DEFAULT_DEVICES})
    return docker


def check_access(host: HostPaths, user: str, runtime: Optional[str] = None,
                 stat_node: NodeStatter = stat_in_root) -> list[CheckRow]:
    """One row per (GPU node, runtime): may `user` open it read/write there?"""
    if runtime is not None and runtime not in CHECK_RUNTIMES:
        raise BadInput(f"unknown runtime {runtime!r}; one of {', '.join(CHECK_RUNTIMES)}")
    base = Facts()
    uid, gid, gids = _user(host, user, base)
    nvidia_params_facts(host, base)
    logind_session_facts(host, base)
    base.put("host.user_name", user, INFERRED, "--user")
    base.put("host.user_uid", uid, INFERRED, "--user")
    base.put("host.user_groups", gids, INFERRED, "host /etc/passwd + /etc/group")
    majors = parse_proc_devices(procfs.read_text(os.path.join(host.proc, "devices")) or "",
                                base.skips)
    rows = []
    for path in gpu_nodes(host):
        found = stat_node(host_root(host), path)
        if found is None or found.major is None:
            continue
        node_class = classify_node(path, found.major, found.minor, majors)
        for rt in ([runtime] if runtime else list(CHECK_RUNTIMES)):
            rows.append(_row(base, path, found, node_class, rt, uid, gid, gids))
    return rows


def _row(base: Facts, path: str, found: Any, node_class: str, runtime: str, uid: int,
         gid: int, gids: list[int]) -> CheckRow:
    facts = Facts()
    facts.update(base)
    groups = base.get("host.etc_group") or {}
    node = {"node.path": path, "node.mode": f"{stat_mod.S_IMODE(found.mode):04o}",
            "node.uid": found.uid, "node.gid": found.gid, "node.major": found.major,
            "node.minor": found.minor, "node.class": node_class, "node.exists": True,
            "node.type": "char", "node.mount_nodev": False,
            "node.group_name": next((n for n, g in groups.items() if g == found.gid), None)}
    acl = found.acl(facts.skips)
    if acl is not None:
        node["node.acl"] = [e.to_json() for e in acl]
    for name, value in dict(node, **_scenario_facts(runtime, uid, gid, gids)).items():
        facts.put(name, value, INFERRED, f"check scenario {runtime}")
    if runtime == "docker-device":  # --device adds the node to the allowlist
        facts.put("device_cgroup.v1_rules", DOCKER_DEFAULT_DEVICES
                  + [f"c {found.major}:{found.minor} rwm"], INFERRED, f"check scenario {runtime}")
    elif runtime.startswith("podman"):  # rootless: --device passes the node; no device rules
        facts.put("device_cgroup.v1_rules", ["a *:* rwm"], INFERRED,
                  f"check scenario {runtime}: rootless podman run --device NODE")
    elif runtime == "host":
        facts.put("device_cgroup.v1_rules", ["a *:* rwm"], INFERRED,
                  "check scenario host: a login session's cgroup does not restrict devices")
    run = run_model(facts, os.O_RDWR)
    decision = run.decision
    assert decision is not None  # the node's stat is always known here
    ladder = [f"{step.layer}: {_verb(step.refuses)} ({step.check})" for step in decision.ladder]
    if decision.allowed is not False:  # True, or None: no layer refuses, one is not known
        return CheckRow(path, node_class, runtime, decision.allowed, None, decision.check, None,
                        None, ladder)
    err = decision.errno or errno_mod.EACCES
    found_cause = classify(err, facts, run)
    fixes = ranked_fixes(found_cause.reason, found_cause.context)
    then = [then_note(item) for item in later_refusals(found_cause.reason, run, found_cause.context)]
    return CheckRow(path, node_class, runtime, False, errno_mod.errorcode.get(err, str(err)),
                    decision.check, found_cause.reason, fixes[0].command if fixes else None,
                    ladder, then)


def _verb(refuses: Optional[bool]) -> str:
    return "unknown" if refuses is None else "refuses" if refuses else "allows"
