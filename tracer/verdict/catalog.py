"""The cause catalog: which field cause (CAUSES.md) explains a denial.

The access model names the check that failed; the facts then tell apart
causes that fail the same check (e.g. `dac_other` is a dropped group in a
rootless userns, a name/gid mismatch in the image, a seat-only ACL, or a user
simply not in the group).  `classify` is pure.
"""

from __future__ import annotations

import errno as errno_mod
from typing import Any, Optional

from tracer.facts import INFERRED, Facts
from tracer.enrichment.id_map import IdMap
from tracer.verdict import reasons as R
from tracer.verdict.absent_node import ENOENT_EVIDENCE, classify_enoent, major_names
from tracer.verdict.unit_policy import unit_refusal
from tracer.verdict.number_mismatch import classify_enxio, tell_mismatch
from tracer.verdict.config_stories import config_stories
from tracer.verdict.access_model import AccessDecision, Credentials, NodeFacts
from tracer.verdict.causes_over_time import (acl_mask, dropped_group, revoked_device,
                                             stale_session)
from tracer.verdict.classification import Classification
from tracer.verdict.model_input import ModelRun
from tracer.verdict.unknown_layers import eperm_layers, unknown_layer_notes

__all__ = ["Classification", "classify", "runtime_key", "seccomp_filtered"]
CAP_DAC_OVERRIDE = 1


def userns_level(facts: Facts) -> Optional[int]:
    """The process's user namespace level; None when not known (never 0 by default)."""
    level = facts.get("userns.level")
    return None if level is None else int(level)


def runtime_key(facts: Facts) -> str:
    """podman-runc | podman-crun | docker | kubernetes | host | any."""
    engine, runtime = facts.get("container.engine"), facts.get("container.runtime")
    if facts.get("container.kubernetes") or engine in ("cri-o", "kubernetes"):
        return "kubernetes"
    if engine == "podman":
        return "podman-crun" if runtime == "crun" else "podman-runc" if runtime == "runc" else "any"
    if engine == "docker":
        return "docker"
    if engine is None and facts.get("container.id") is None and userns_level(facts) == 0:
        return "host"
    return "any"


def _lower(confidence: str) -> str:
    return {"high": "medium", "medium": "low", "low": "low"}[confidence]


def _base_context(facts: Facts, run: ModelRun) -> dict[str, Any]:
    gid = facts.get("node.gid")
    return {
        "path": facts.get("node.path", "the device node"),
        "node_path": facts.get("node.path"),  # for fix lines: None when unknown
        "node_class": facts.get("node.class", "unknown"),
        "mode": facts.get("node.mode"), "uid": facts.get("node.uid"), "gid": gid,
        "group": facts.get("node.group_name") or (str(gid) if gid is not None else "?"),
        "user": facts.get("host.user_name") or str(facts.get("host.user_uid", "?")),
        # a host account, named only for a host process or a rootless userns owner
        "user_name": facts.get("host.user_name"),
        "runtime": runtime_key(facts), "rootless": bool(facts.get("container.rootless")),
        "lsm_label": facts.get("process.lsm_label"), "node_label": facts.get("node.selinux"),
        "major": facts.get("node.major"), "minor": facts.get("node.minor"),
        "in_container": facts.get("container.engine") is not None
        or facts.get("container.id") is not None or (userns_level(facts) or 0) > 0,
        "user_groups": facts.get("host.user_groups") or [],
        "check": run.decision.check if run.decision else None,
    }


def _group_bits_grant(node: NodeFacts, mask: int) -> bool:
    return (mask & ~(node.mode >> 3 & 7)) == 0


def _root_in_namespace(creds: Credentials) -> bool:
    if creds.fsuid is None or not creds.userns.known:
        return False
    if creds.userns.is_initial:
        return creds.fsuid == 0
    fsuid = creds.fsuid
    return all(level.uid_map.to_inside(fsuid) == 0 for level in creds.userns.levels[:1])


def classify(errno: int, facts: Facts, run: ModelRun) -> Classification:
    """The cause, then what the host's configuration (CDI specs, driver parameters, the
    container toolkit) says about it."""
    return config_stories(errno_mod.errorcode.get(errno, str(errno)), facts, run,
                          _classify(errno, facts, run))


def _classify(errno: int, facts: Facts, run: ModelRun) -> Classification:
    ctx = _base_context(facts, run)
    if errno == errno_mod.ENOENT:
        reason, confidence, summary, notes = classify_enoent(facts, ctx)
        return Classification(reason, confidence, ["node.exists"] + ENOENT_EVIDENCE, ctx, notes,
                              summary)
    if errno == errno_mod.ENXIO:
        confidence, summary, notes = classify_enxio(facts, ctx)
        return Classification(R.NO_DRIVER_FOR_NODE, confidence, NUMBER_EVIDENCE, ctx, notes,
                              summary)
    blockers = facts.get("audit.landlock_blockers")
    if isinstance(blockers, list) and blockers:
        return _landlock_recorded(facts, ctx, blockers)
    # a node removed since: named from the node watcher's reading only when it shows
    # a DAC refusal; anything else (EPERM, every layer allowing) goes the careful way
    watched = facts.get("node.seen_from") == "node-watcher"
    if facts.get("node.exists") is False and not (
            watched and errno == errno_mod.EACCES and run.decision is not None
            and run.decision.allowed is False):
        return _node_gone_since(errno, facts, run, ctx)
    decision = run.decision
    if errno == errno_mod.EPERM:
        return _number_story(facts, run, _unit_story(facts, run, _eperm(facts, run, ctx)))
    if decision is None:
        return Classification(R.UNKNOWN, "low", [], ctx,
                              [f"Missing facts: {', '.join(run.missing)}."])
    # a gone process's node examined on the host is its own only for a host process
    seen_from_host = facts.get("node.seen_from") == "host" \
        and facts.get("process.host_process") is not True
    if decision.check in ("nodev_mount", "nodev_superblock"):
        ctx["mount"] = _field(facts, "node.mount", "mount_point", "?")
        inferred = facts.fact("node.mount_ns_inferred")
        if inferred is not None:  # whose mount table applied was inferred, not captured
            return Classification(R.NODEV_MOUNT, "medium", ["node.mount_nodev", "node.mount",
                                                            "node.mount_ns_inferred",
                                                            "process.host_process"], ctx,
                                  [f"The mount table is inferred: {inferred.origin}."])
        return Classification(R.NODEV_MOUNT, "high", ["node.mount_nodev", "node.mount"], ctx)
    if decision.allowed is not False and not decision.shown_to_allow(errno_mod.EACCES):
        # a layer that gives EACCES is not known: it may have refused; conclude nothing
        return _not_known(decision, errno_mod.EACCES, run, ctx)
    if decision.allowed is not False:
        found = _lsm_or_seccomp(facts, ctx)
        if seen_from_host:
            found.confidence = _lower(found.confidence)
        return found
    classification = _dac_cause(facts, run, ctx)
    if watched:
        classification.confidence = _lower(classification.confidence)
        classification.notes.append(
            "The node was removed after the refusal; its mode, owner and ACL are those the GPU "
            "node watcher read before the refusal, with no change seen since.")
    if seen_from_host:
        classification.confidence = _lower(classification.confidence)
        classification.notes.append("The process had exited; the node was examined on the host.")
    return classification


def _not_known(decision: AccessDecision, err: int, run: ModelRun, ctx: dict[str, Any],
               also: Optional[list[str]] = None) -> Classification:
    """No layer shown to refuse, and one that could is not known: `unknown`, naming
    the layer and why (which fact or capability was missing)."""
    notes, ctx["unknown_why"] = unknown_layer_notes(decision, err, run.missing, also or [])
    evidence = ["process.groups", "process.ngroups", "process.fsuid", "process.cap_effective",
                "node.mode", "node.gid", "node.mount_nodev"] + DEVICE_EVIDENCE
    return Classification(R.UNKNOWN, "low", evidence, ctx, notes)


DEVICE_EVIDENCE = ["device_cgroup.v2_programs", "device_cgroup.v2_cgroup", "device_cgroup.v1_rules",
                   "device_cgroup.version", "node.major", "node.minor", "cgroup.paths",
                   "container.engine"]
SECCOMP_EVIDENCE = ["process.seccomp", "process.seccomp_filters", "process.no_new_privs"]
FILE_LSMS = {"selinux": "SELinux", "apparmor": "AppArmor", "landlock": "Landlock",
             "smack": "Smack", "tomoyo": "TOMOYO", "bpf": "BPF LSM"}


def _field(facts: Facts, name: str, key: str, default: Any) -> Any:
    """One key of an object-valued fact; recorded facts may be anything."""
    value = facts.get(name)
    return value.get(key, default) if isinstance(value, dict) else default


def seccomp_filtered(facts: Facts) -> Optional[bool]:
    """Seccomp: 2 (filter mode) in /proc/PID/status; None when not known."""
    mode = facts.get("process.seccomp")
    return None if mode is None else str(mode).strip() == "2"


def _landlock_recorded(facts: Facts, ctx: dict[str, Any], blockers: list[Any]) -> Classification:
    """The kernel's LANDLOCK_ACCESS record for this very syscall: Landlock refused,
    shown, not inferred (its hook runs after DAC, so DAC had allowed)."""
    ctx["lsm"] = "Landlock"
    domain = facts.get("audit.landlock_domain")
    mode = facts.get("audit.landlock_mode")
    notes = [f"The kernel's Landlock audit record for this open: domain {domain or '?'}"
             f"{f' ({mode})' if mode else ''} blocked {', '.join(str(b) for b in blockers)}."]
    return Classification(R.LSM_DENIED, "high",
                          ["audit.landlock_blockers", "audit.landlock_domain",
                           "audit.landlock_mode", "audit.landlock_path", "lsm.active"], ctx, notes)


def _node_gone_since(errno: int, facts: Facts, run: ModelRun,
                     ctx: dict[str, Any]) -> Classification:
    """Any errno but ENOENT proves the kernel found the node (it checked its mode, its
    device cgroup or its driver): gone now means removed after the refusal, never
    node_missing.  What only the node could show is listed as missing."""
    gone = (f"The kernel returned {errno_mod.errorcode.get(errno, errno)} for "
            f"{ctx['path']}, so the node existed when it was checked; it was removed "
            "before gputrace examined it.")
    if errno == errno_mod.EPERM:
        # seccomp and the device cgroup do not need the node's inode; its mode/owner/ACL do not matter
        found = _eperm(facts, run, ctx)
        found.notes.insert(0, gone)
        return found
    missing = ["the node's mode, owner, ACL and mount (node.mode, node.uid, node.gid, "
               "node.acl, node.mount_nodev)"]
    missing += [m for m in run.missing if m != "node stat"]
    ctx["unknown_why"] = " (the node was removed after the refusal; its permissions are unknown)"
    return Classification(R.UNKNOWN, "low", ["node.exists", "node.path", "node.major",
                                             "node.minor"], ctx,
                          [gone, f"Missing: {', '.join(missing)}."])


def _eperm(facts: Facts, run: ModelRun, ctx: dict[str, Any]) -> Classification:
    """EPERM: a device cgroup layer only when one is shown to refuse; else seccomp
    when a filter is on; else unknown, saying what is missing."""
    decision = eperm_layers(facts, run)
    first = decision.refusals()[0] if decision.refusals() else None
    if first is not None and first.errno == errno_mod.EPERM:
        ctx["device_layer"] = first.layer
        ctx["device_detail"] = first.detail
        revoked = revoked_device(facts, run, first.layer, ctx)
        if revoked is not None:  # allowed once, then taken away by a re-apply
            revoked.notes.append(f"The refusing policy now: {first.detail}.")
            return revoked
        notes = [f"The refusing policy: {first.detail}."]
        if ctx.get("never_granted"):
            notes.append(ctx["never_granted"])
        if first.program:
            ctx["program"] = first.program
            notes.append("Deciding instructions: " + "; ".join(first.deciding) + ".")
        return Classification(R.DEVICE_CGROUP, "high", DEVICE_EVIDENCE, ctx, notes)
    filtered = seccomp_filtered(facts)
    if filtered and not decision.shown_to_allow(errno_mod.EPERM):
        # the device cgroup may have refused: a filter alone proves nothing (docker and
        # podman install one in every container)
        return _not_known(decision, errno_mod.EPERM, run, ctx, [
            "A seccomp filter is on, but the device cgroup, which also refuses with EPERM, "
            "could not be evaluated: either may have refused."])
    if filtered:
        ctx["seccomp_filters"] = facts.get("process.seccomp_filters")
        notes = ["A seccomp filter refuses a system call before it runs: no file permission, "
                 "device cgroup or security module was consulted."]
        return Classification(R.SECCOMP_DENIED, "high", SECCOMP_EVIDENCE, ctx, notes)
    notes = []
    v1 = facts.get("device_cgroup.v1_rules")
    v1_path = _field(facts, "cgroup.paths", "devices", "/")
    if v1 == ["a *:* rwm"] and v1_path != "/":
        notes.append(f"The process's v1 device cgroup ({v1_path}) allows by default, and "
                     "devices.list hides such a cgroup's deny rules: a deny rule there may "
                     "have refused, but nothing shows it.")
    missing = list(run.missing)
    missing += [f"the device cgroup policy ({s.layer}: {s.detail})"
                for s in decision.not_known(errno_mod.EPERM)]
    if filtered is None:
        missing.append("the process's seccomp state (it had exited)")
    ctx["unknown_why"] = (" (EPERM comes from a device cgroup, a seccomp filter or a "
                          "capability check, and none was shown to refuse)")
    notes.append("EPERM, but no layer was shown to refuse: no device cgroup rule or program "
                 "refuses this node and no seccomp filter is known; a capability-gated driver "
                 "or ioctl check is possible." + (f" Missing: {', '.join(missing)}." if missing else ""))
    return Classification(R.UNKNOWN, "low", DEVICE_EVIDENCE + SECCOMP_EVIDENCE, ctx, notes)


def _unit_story(facts: Facts, run: ModelRun, found: Classification) -> Classification:
    """An EPERM in a systemd unit whose device sandboxing does not allow the node: the
    property that refused and the DeviceAllow= line.  Never over a device layer shown
    to allow; medium when the unit's program could not be read (the configuration
    alone shows the refusal)."""
    ctx = found.context
    major, minor = facts.get("node.major"), facts.get("node.minor")
    refusal = unit_refusal(facts, str(ctx["path"]), major, minor, major_names(facts))
    if refusal is None or found.reason not in (R.DEVICE_CGROUP, R.UNKNOWN, R.SECCOMP_DENIED):
        return found
    steps = [s for s in (run.decision.ladder if run.decision else ())
             if s.layer.startswith("device_cgroup")]
    if steps and all(s.refuses is False for s in steps):
        return found
    shown = any(s.refuses for s in steps)
    ctx.update(unit=refusal.unit, unit_prop=refusal.prop, allow_name=refusal.allow_name,
               unit_private=refusal.private_devices)
    notes = list(refusal.notes)
    if not shown:
        notes.append("The unit's device program itself could not be evaluated; its "
                     f"configuration ({refusal.prop}=) shows that it refuses this node.")
    summary = (f"The systemd unit {refusal.unit} does not allow {ctx['path']} "
               f"({major}:{minor}): {refusal.detail}, so the device cgroup systemd built for "
               "it refuses the node.")
    return Classification(R.DEVICE_CGROUP, "high" if shown else "medium",
                          ["systemd.unit", "systemd.unit_properties"] + DEVICE_EVIDENCE, ctx,
                          notes + found.notes, summary)


NUMBER_EVIDENCE = ["node.major", "node.minor", "node.path", "node.class", "host.char_majors",
                   "cdi.devices", "container.oci", "device_cgroup.v1_rules",
                   "device_cgroup.v2_programs", "container.engine", "systemd.unit"]


def _number_story(facts: Facts, run: ModelRun, found: Classification) -> Classification:
    """A device layer shown to refuse that allows another number meant for this node
    (a stale major, another GPU driver's, the number before a renumbering)."""
    if found.reason != R.DEVICE_CGROUP or not found.context.get("device_layer"):
        return found
    told = tell_mismatch(facts, run, found.context)
    if told is None:
        return found
    summary, notes = told
    if found.context.get("unit_prop"):  # the unit's configuration refused: its story stands
        found.notes += [summary] + notes
        return found
    return Classification(R.DEVICE_NUMBER_MISMATCH, "high", NUMBER_EVIDENCE + DEVICE_EVIDENCE,
                          found.context, notes + found.notes, summary)


def _lsm_or_seccomp(facts: Facts, ctx: dict[str, Any]) -> Classification:
    """EACCES that nodev, DAC and the device cgroup all allow: a security module."""
    label = facts.get("process.lsm_label")
    confined = bool(label) and label != "unconfined"
    active = facts.get("lsm.active")
    file_lsms = [FILE_LSMS[n] for n in active or [] if n in FILE_LSMS
                 and not (n == "bpf" and facts.get("lsm.bpf_programs") == 0)]
    evidence = ["lsm.active", "lsm.bpf_programs", "lsm.bpf_programs_unknown", "process.lsm_label", "node.selinux", "node.mode", "node.gid",
                "process.no_new_privs"]
    if confined:
        module = "SELinux" if ":" in str(label) else "AppArmor"
        ctx["lsm"] = f"{module} ({label})"
        return Classification(R.LSM_DENIED, "medium", evidence, ctx)
    if active is not None and not file_lsms:
        filtered = seccomp_filtered(facts)
        if filtered:
            return Classification(R.SECCOMP_DENIED, "medium", SECCOMP_EVIDENCE, ctx,
                                  ["No active security module mediates file opens; the "
                                   "process's seccomp filter can return EACCES."])
        return Classification(R.UNKNOWN, "low", evidence + SECCOMP_EVIDENCE, ctx,
                              [f"Every modelled layer allows this open and no active security "
                               f"module ({', '.join(active)}) mediates file opens."])
    if file_lsms:
        ctx["lsm"] = " or ".join(file_lsms)
        notes = [f"Owner, group, ACL and device cgroup all allow this open; of the active "
                 f"security modules only {ctx['lsm']} mediates file opens."]
        if file_lsms == ["Landlock"]:
            notes.append("Landlock domains are not visible in /proc: that this process was "
                         "sandboxed is inferred from the refusal.")
        if "BPF LSM" in file_lsms and facts.get("lsm.bpf_programs_unknown"):
            notes.append(f"{facts.get('lsm.bpf_programs_unknown')}.")
        return Classification(R.LSM_DENIED, "medium" if len(file_lsms) == 1 else "low",
                              evidence, ctx, notes)
    return Classification(R.LSM_DENIED, "low", evidence, ctx, [
        "Owner, group, ACL and device cgroup all allow this open; the refusal came from a "
        "security module (SELinux, AppArmor or Landlock) that gputrace cannot query "
        "(mount securityfs to see which are active)."])


def _dac_cause(facts: Facts, run: ModelRun, ctx: dict[str, Any]) -> Classification:
    found = _dac_membership_cause(facts, run, ctx)
    inferred = facts.fact("process.groups")
    if inferred is None or inferred.source != INFERRED:
        inferred = None if inferred is not None else facts.fact("process.groups_mapped_only")
    if found.reason in MEMBERSHIP_REASONS and inferred is not None:
        # the groups were not captured: the verdict rests on what the facts imply
        found.confidence = "medium" if found.confidence == "high" else found.confidence
        found.notes.append(f"The process's supplementary groups are inferred, not captured: "
                           f"{inferred.origin}.")
        found.evidence.insert(0, "process.groups" if inferred is facts.fact("process.groups")
                              else "process.groups_mapped_only")
    return found


MEMBERSHIP_REASONS = (R.GROUP_DROPPED_IN_USERNS, R.GID_MISMATCH_IN_CONTAINER, R.SEAT_ACL_ONLY,
                      R.NOT_IN_GROUP)


def _dac_membership_cause(facts: Facts, run: ModelRun, ctx: dict[str, Any]) -> Classification:
    node, creds = run.node, run.creds
    assert node is not None and creds is not None  # a DAC refusal was decided from them
    gid = node.gid
    level = userns_level(facts) or 0
    host_groups = set(facts.get("host.user_groups") or [])
    # the DAC layer refused, so membership of `gid` is known wherever it mattered
    if _group_bits_grant(node, run.mask) and creds.in_group(gid) is False:
        dropped = dropped_group(facts, gid, ctx, recorded_only=True)
        if dropped is not None:  # a recorded set*gid call in its container took it away
            return dropped
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
        dropped = dropped_group(facts, gid, ctx, recorded_only=False)
        if dropped is not None:
            return dropped
        if gid in host_groups and facts.get("process.host_process") is True:
            stale = stale_session(facts, gid, ctx)
            if stale is not None:
                return stale
            ctx["member_listed"] = True  # listed in /etc/group, yet its session lacks it
        mismatch = _container_gid_for_name(facts)
        if mismatch is not None:
            ctx["container_gid"] = mismatch
            holds = _holds_container_gid(facts, mismatch, creds)
            return Classification(R.GID_MISMATCH_IN_CONTAINER, "high" if holds else "medium",
                                  ["node.gid", "node.group_name", "container.etc_group",
                                   "process.groups", "userns.gid_map"], ctx)
        acl_users = [uid for uid, _ in node.acl.users] if node.acl is not None else []
        if acl_users and creds.fsuid not in acl_users:
            ctx["acl_users"] = acl_users
            ctx["acl_user_names"] = _seat_users(facts, acl_users)
            return Classification(R.SEAT_ACL_ONLY, "high" if ctx["acl_user_names"] else "medium",
                                  ["node.acl", "logind.sessions", "process.groups", "node.gid",
                                   "node.group_name", "host.user_groups"], ctx)
        summary: Optional[str] = None
        if ctx.get("member_listed"):
            why = (f"its parent {ctx['groups_set_by']} runs as another user, so its groups were "
                   "set when it was switched to this user, without this group"
                   if ctx.get("groups_set_by") else
                   "its session holds the group, so this process, or a program between them, "
                   "set its groups without it" if ctx.get("session_holds") else
                   "/etc/group has not changed since its session started, so a program set "
                   "the session's groups without it")
            summary = (f"{ctx['user']} is listed in group {ctx['group']} (gid {gid}) in "
                       f"/etc/group, but this process does not carry it: {why} (setpriv "
                       "--clear-groups or --groups, su -g, a setgroups() call).")
        return Classification(R.NOT_IN_GROUP, "high",
                              ["process.groups", "node.gid", "node.group_name", "node.mode",
                               "host.user_groups", "host.etc_group_changed",
                               "process.session_leader", "process.parent",
                               "container.etc_group"], ctx, summary=summary)
    if _root_in_namespace(creds):
        ctx["cap_held"] = creds.has_cap(CAP_DAC_OVERRIDE)
        return Classification(R.CAPABILITY_REQUIRED, "medium",
                              ["process.cap_effective", "process.fsuid", "userns.uid_map",
                               "userns.gid_map", "node.uid", "node.gid", "node.mode"], ctx)
    masked = acl_mask(run, ctx)
    if masked is not None:
        return masked
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
    kernel = inside if gid_map is None else IdMap.from_rows(gid_map).to_outside(inside)
    return inside if kernel != gid else None


def _holds_container_gid(facts: Facts, inside_gid: int, creds: Credentials) -> bool:
    gid_map = facts.get("userns.gid_map")
    kernel = inside_gid if gid_map is None else IdMap.from_rows(gid_map).to_outside(inside_gid)
    return kernel is not None and creds.in_group(kernel) is True


def _seat_users(facts: Facts, acl_uids: list[int]) -> list[str]:
    """Names of ACL users who hold a local seat session (logind's uaccess)."""
    names = []
    for session in facts.get("logind.sessions") or []:
        if session.get("uid") in acl_uids and session.get("seat") and not session.get("remote"):
            names.append(session.get("user") or str(session["uid"]))
    return sorted(set(names))
