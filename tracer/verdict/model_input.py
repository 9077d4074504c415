"""Turn enrichment facts into the access model's inputs and ask it.

Missing facts are reported, not guessed: without the node's mode/owner the
model is not asked at all; any other missing fact (an id, the groups, the
capabilities, the user namespace, the device number, the mount) is passed on as
unknown, never as a default (a missing fsuid is not root, 0:0 is not a device).
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
from tracer.verdict.groups import SupplementaryGroups


@dataclass
class ModelRun:
    decision: Optional[AccessDecision]
    mask: int
    missing: list[str] = field(default_factory=list)
    node: Optional[NodeFacts] = None          # the typed inputs the decision used:
    creds: Optional[Credentials] = None       # the catalog reads these, not strings


def _id_map(rows: Any) -> IdMap:
    return IdMap.from_rows(rows)


def _known_int(facts: Facts, name: str, missing: list[str], base: int = 10) -> Optional[int]:
    value = facts.get(name)
    if value is None:
        missing.append(name)
        return None
    return int(str(value), base) if base != 10 else int(value)


def credentials_from_facts(facts: Facts, missing: list[str]) -> Credentials:
    level = facts.get("userns.level")
    uid_map, gid_map = facts.get("userns.uid_map"), facts.get("userns.gid_map")
    if level is None:
        missing.append("the user namespace")
        userns = UserNamespace.unknown()
    elif int(level) == 0:
        userns = UserNamespace()
    elif uid_map is None or gid_map is None:
        missing.append("userns maps")  # whether the node is mapped (for capabilities) is unknown
        userns = UserNamespace.unknown()
    else:
        # maps read from the initial namespace have kernel ids outside: one level suffices
        userns = UserNamespace((UserNamespaceLevel(_id_map(uid_map), _id_map(gid_map)),))
    groups = SupplementaryGroups.from_facts(facts.get("process.groups"),
                                            facts.get("process.ngroups"))
    if groups.gids is None:
        missing.append("process.groups")
    return Credentials(
        fsuid=_known_int(facts, "process.fsuid", missing),
        fsgid=_known_int(facts, "process.fsgid", missing), groups=groups,
        cap_effective=_known_int(facts, "process.cap_effective", missing, 16), userns=userns,
        mapped_groups_only=facts.get("process.groups_mapped_only") is True)


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
        missing.append("node major:minor")  # never 0:0: device layers that need it are unknown
    kind = stat.S_IFBLK if facts.get("node.type") == "block" else stat.S_IFCHR
    nodev = facts.get("node.mount_nodev")
    if nodev is None:
        missing.append("mount flags")
    return NodeFacts(
        mode=kind | int(str(mode_text), 8), uid=int(uid), gid=int(gid),
        major=None if major is None or minor is None else int(major),
        minor=None if major is None or minor is None else int(minor),
        acl=acl_from_facts(facts.get("node.acl")),
        nodev_mount=None if nodev is None else bool(nodev),
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
