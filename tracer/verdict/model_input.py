"""Turn enrichment facts into the access model's inputs and ask it.

Missing facts are reported, not guessed: without the node's mode/owner the
model is not asked at all.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from typing import Any, Optional

from tracer.facts import Facts
from tracer.enrichment.device_rules import DevicePolicy, policies_from_facts
from tracer.facts import SkipCounter
from tracer.verdict.access_model import (MAY_READ, MAY_WRITE, AccessDecision, Credentials,
                                         IdMap, NodeFacts,
                                         PosixAcl, UserNamespace, UserNamespaceLevel,
                                         access_mask_from_open_flags, decide_open)


@dataclass
class ModelRun:
    decision: Optional[AccessDecision]
    mask: int
    missing: list[str] = field(default_factory=list)
    node: Optional[NodeFacts] = None          # the typed inputs the decision used:
    creds: Optional[Credentials] = None       # the catalog reads these, not strings


def _id_map(rows: Any) -> IdMap:
    return IdMap.from_rows(rows)


def credentials_from_facts(facts: Facts, missing: list[str]) -> Credentials:
    level = int(facts.get("userns.level", 0) or 0)
    if level == 0:
        userns = UserNamespace()
    else:
        uid_map, gid_map = facts.get("userns.uid_map"), facts.get("userns.gid_map")
        if uid_map is None or gid_map is None:
            missing.append("userns maps")  # an empty map: capabilities cannot apply
        # maps read from the initial namespace have kernel ids outside: one level suffices
        userns = UserNamespace((UserNamespaceLevel(_id_map(uid_map), _id_map(gid_map)),))
    return Credentials(
        fsuid=int(facts.get("process.fsuid", 0)), fsgid=int(facts.get("process.fsgid", 0)),
        groups=tuple(int(g) for g in facts.get("process.groups", [])),
        cap_effective=int(str(facts.get("process.cap_effective", "0")), 16),
        userns=userns)


def acl_from_facts(entries: Any) -> Optional[PosixAcl]:
    return PosixAcl.from_json(entries)


def device_policy_from_facts(facts: Facts) -> Optional[tuple[DevicePolicy, ...]]:
    return policies_from_facts(facts.get("device_cgroup.v1_rules"),
                               facts.get("device_cgroup.v2_programs"),
                               facts.get("device_cgroup.v2_unreadable"), SkipCounter(),
                               facts.get("device_cgroup.v1_unreadable"))


def node_from_facts(facts: Facts, missing: list[str]) -> Optional[NodeFacts]:
    mode_text, uid, gid = facts.get("node.mode"), facts.get("node.uid"), facts.get("node.gid")
    if mode_text is None or uid is None or gid is None:
        missing.append("node stat")
        return None
    major, minor = facts.get("node.major"), facts.get("node.minor")
    if major is None or minor is None:
        missing.append("node major:minor")
        major, minor = 0, 0
    kind = stat.S_IFBLK if facts.get("node.type") == "block" else stat.S_IFCHR
    if facts.get("node.mount_nodev") is None:
        missing.append("mount flags")
    return NodeFacts(
        mode=kind | int(str(mode_text), 8), uid=int(uid), gid=int(gid),
        major=int(major), minor=int(minor), acl=acl_from_facts(facts.get("node.acl")),
        nodev_mount=bool(facts.get("node.mount_nodev", False)),
        device_cgroup=device_policy_from_facts(facts))


def wanted_mask(open_flags: Optional[int]) -> int:
    """What the open asked for; GPU libraries open O_RDWR when the flags are unknown."""
    if open_flags is None:
        return MAY_READ | MAY_WRITE
    return access_mask_from_open_flags(open_flags)


def run_model(facts: Facts, open_flags: Optional[int]) -> ModelRun:
    missing: list[str] = []
    mask = wanted_mask(open_flags)
    node = node_from_facts(facts, missing)
    creds = credentials_from_facts(facts, missing)
    if node is None:
        return ModelRun(None, mask, missing, None, creds)
    label = facts.get("process.lsm_label")
    lsm = (str(label),) if label and label != "unconfined" else ()
    return ModelRun(decide_open(node, creds, mask, lsm), mask, missing, node, creds)
