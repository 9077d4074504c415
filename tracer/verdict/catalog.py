"""The cause catalog: which field cause (CAUSES.md) explains a denial.

The access model names the check that failed; the facts then tell apart
causes that fail the same check (e.g. `dac_other` is a dropped group in a
rootless userns, a name/gid mismatch in the image, a seat-only ACL, or a user
simply not in the group).  `classify` is pure.
"""

from __future__ import annotations

import errno as errno_mod
from dataclasses import dataclass, field
from typing import Any, Optional

from tracer.enrichment.facts import Facts
from tracer.enrichment.parse_proc import id_to_inside, id_to_kernel
from tracer.verdict import reasons as R
from tracer.verdict.model_input import ModelRun

CAP_DAC_OVERRIDE = 1


@dataclass
class Classification:
    reason: str
    confidence: str
    evidence: list[str]                       # fact names, most telling first
    context: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def runtime_key(facts: Facts) -> str:
    """podman-runc | podman-crun | docker | kubernetes | host | any."""
    engine, runtime = facts.get("container.engine"), facts.get("container.runtime")
    if facts.get("container.kubernetes") or engine in ("cri-o", "kubernetes"):
        return "kubernetes"
    if engine == "podman":
        return "podman-crun" if runtime == "crun" else "podman-runc" if runtime == "runc" else "any"
    if engine == "docker":
        return "docker"
    if engine is None and int(facts.get("userns.level", 0) or 0) == 0:
        return "host"
    return "any"


def _lower(confidence: str) -> str:
    return {"high": "medium", "medium": "low", "low": "low"}[confidence]


def _base_context(facts: Facts, run: ModelRun) -> dict[str, Any]:
    gid = facts.get("node.gid")
    return {
        "path": facts.get("node.path", "the device node"),
        "node_class": facts.get("node.class", "unknown"),
        "mode": facts.get("node.mode"), "uid": facts.get("node.uid"), "gid": gid,
        "group": facts.get("node.group_name") or (str(gid) if gid is not None else "?"),
        "user": facts.get("host.user_name") or str(facts.get("host.user_uid", "?")),
        "runtime": runtime_key(facts), "rootless": bool(facts.get("container.rootless")),
        "lsm_label": facts.get("process.lsm_label"), "node_label": facts.get("node.selinux"),
        "major": facts.get("node.major"), "minor": facts.get("node.minor"),
        "in_container": facts.get("container.engine") is not None
        or int(facts.get("userns.level", 0) or 0) > 0,
        "check": run.decision.check if run.decision else None,
    }


def _group_bits_grant(facts: Facts, mask: int) -> bool:
    mode = int(str(facts.get("node.mode", "0")), 8)
    return (mask & ~(mode >> 3 & 7)) == 0


def _root_in_namespace(facts: Facts) -> bool:
    fsuid = int(facts.get("process.fsuid", -1))
    if int(facts.get("userns.level", 0) or 0) == 0:
        return fsuid == 0
    uid_map = facts.get("userns.uid_map")
    if uid_map is None:
        return False
    return id_to_inside([tuple(r) for r in uid_map], fsuid) == 0


def classify(errno: int, facts: Facts, run: ModelRun) -> Classification:
    ctx = _base_context(facts, run)
    if errno == errno_mod.ENOENT or facts.get("node.exists") is False:
        return Classification(R.NODE_MISSING, "high" if errno == errno_mod.ENOENT else "medium",
                              ["node.exists", "node.path", "node.class", "host.gpu_char_majors"],
                              ctx)
    if errno == errno_mod.EPERM:
        model_agrees = run.decision is not None and run.decision.check == "device_cgroup"
        notes = []
        if not model_agrees and facts.get("device_cgroup.v1_rules") == ["a *:* rwm"]:
            notes.append("devices.list prints 'a *:* rwm' for a default-allow cgroup and hides "
                         "its deny rules, so the rule that refused is not visible here.")
        if facts.get("device_cgroup.version") == 2:
            notes.append("On cgroup v2 the device policy is a BPF program that gputrace "
                         "cannot list without bpf(BPF_PROG_QUERY).")
        return Classification(R.DEVICE_CGROUP, "high" if model_agrees else "medium",
                              ["device_cgroup.v1_rules", "device_cgroup.version", "node.major",
                               "node.minor", "cgroup.paths", "container.engine"], ctx, notes)
    decision = run.decision
    if decision is None:
        return Classification(R.UNKNOWN, "low", [], ctx,
                              [f"Missing facts: {', '.join(run.missing)}."])
    seen_from_host = facts.get("node.seen_from") == "host"
    if decision.check in ("nodev_mount", "nodev_superblock"):
        ctx["mount"] = (facts.get("node.mount") or {}).get("mount_point", "?")
        return Classification(R.NODEV_MOUNT, "high", ["node.mount_nodev", "node.mount"], ctx)
    if decision.allowed:
        label = facts.get("process.lsm_label")
        confined = bool(label) and label != "unconfined"
        confidence = "medium" if confined else "low"
        notes = [] if confined else [
            "Owner, group, ACL and device cgroup all allow this open; the refusal came from a "
            "security module (SELinux, AppArmor or Landlock) that gputrace cannot query."]
        return Classification(R.LSM_DENIED, _lower(confidence) if seen_from_host else confidence,
                              ["process.lsm_label", "node.selinux", "node.mode", "node.gid"],
                              ctx, notes)
    classification = _dac_cause(facts, run, ctx)
    if seen_from_host:
        classification.confidence = _lower(classification.confidence)
        classification.notes.append("The process had exited; the node was examined on the host.")
    return classification


def _dac_cause(facts: Facts, run: ModelRun, ctx: dict[str, Any]) -> Classification:
    gid = int(facts.get("node.gid"))
    groups = set(facts.get("process.groups", [])) | {facts.get("process.fsgid")}
    level = int(facts.get("userns.level", 0) or 0)
    host_groups = set(facts.get("host.user_groups") or [])
    if _group_bits_grant(facts, run.mask) and gid not in groups:
        if level > 0 and gid in host_groups:
            gid_map = facts.get("userns.gid_map")
            mapped = facts.get("node.gid_mapped")
            ctx["setgroups"] = facts.get("userns.setgroups")
            confidence = "high" if gid_map is not None and mapped is False else "medium"
            notes = []
            if ctx["runtime"] == "podman-runc":
                notes.append("runc cannot keep supplementary groups in a rootless user "
                              "namespace: it replaces them with the container's own groups, "
                              "and the host group is not mapped into the namespace.")
            return Classification(R.GROUP_DROPPED_IN_USERNS, confidence,
                                  ["host.user_groups", "process.groups", "node.gid",
                                   "node.group_name", "userns.gid_map", "node.gid_in_container",
                                   "userns.setgroups", "container.engine", "container.runtime",
                                   "container.rootless", "nvidia.params"], ctx, notes)
        mismatch = _container_gid_for_name(facts)
        if mismatch is not None:
            ctx["container_gid"] = mismatch
            holds = _holds_container_gid(facts, mismatch, groups)
            return Classification(R.GID_MISMATCH_IN_CONTAINER, "high" if holds else "medium",
                                  ["node.gid", "node.group_name", "container.etc_group",
                                   "process.groups", "userns.gid_map"], ctx)
        acl_users = [e["id"] for e in facts.get("node.acl") or [] if e["tag"] == "user"]
        if acl_users and int(facts.get("process.fsuid", -1)) not in acl_users:
            ctx["acl_users"] = acl_users
            ctx["acl_user_names"] = _seat_users(facts, acl_users)
            return Classification(R.SEAT_ACL_ONLY, "high" if ctx["acl_user_names"] else "medium",
                                  ["node.acl", "logind.sessions", "process.groups", "node.gid",
                                   "node.group_name", "host.user_groups"], ctx)
        return Classification(R.NOT_IN_GROUP, "high",
                              ["process.groups", "node.gid", "node.group_name", "node.mode",
                               "host.user_groups", "container.etc_group"], ctx)
    if _root_in_namespace(facts):
        cap = int(str(facts.get("process.cap_effective", "0")), 16)
        ctx["cap_held"] = bool(cap >> CAP_DAC_OVERRIDE & 1)
        return Classification(R.CAPABILITY_REQUIRED, "medium",
                              ["process.cap_effective", "process.fsuid", "userns.uid_map",
                               "userns.gid_map", "node.uid", "node.gid", "node.mode"], ctx)
    return Classification(R.MODE_RESTRICTIVE, "high",
                          ["node.mode", "node.uid", "node.gid", "node.acl", "process.groups",
                           "nvidia.params"], ctx)


def _container_gid_for_name(facts: Facts) -> Optional[int]:
    """The gid the container's /etc/group gives the node group's host name, if different."""
    name, gid = facts.get("node.group_name"), facts.get("node.gid")
    table = facts.get("container.etc_group") or {}
    if not name or name not in table:
        return None
    inside = int(table[name])
    gid_map = facts.get("userns.gid_map")
    kernel = inside if gid_map is None else id_to_kernel([tuple(r) for r in gid_map], inside)
    return inside if kernel != gid else None


def _holds_container_gid(facts: Facts, inside_gid: int, groups: set[Any]) -> bool:
    gid_map = facts.get("userns.gid_map")
    kernel = inside_gid if gid_map is None else id_to_kernel([tuple(r) for r in gid_map], inside_gid)
    return kernel in groups


def _seat_users(facts: Facts, acl_uids: list[int]) -> list[str]:
    """Names of ACL users who hold a local seat session (logind's uaccess)."""
    names = []
    for session in facts.get("logind.sessions") or []:
        if session.get("uid") in acl_uids and session.get("seat") and not session.get("remote"):
            names.append(session.get("user") or str(session["uid"]))
    return sorted(set(names))
