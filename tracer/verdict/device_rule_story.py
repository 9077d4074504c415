"""The device cgroup over a container's life: was the refused node never
granted, or granted and then taken away by a re-apply of the rules?

Three sources of rules, each asked through the one device-rule model
(`DevicePolicy.may`): the rules when the container started and after every
change since (the access history), and what the container's OCI config grants
(`linux.resources.devices`, which is all a runtime or systemd re-applies).
A grant that is not in the config came from outside the runtime (the NVIDIA
legacy hook, a manual devices.allow write) and is lost at the next re-apply:
`systemctl daemon-reload` or a unit property change with the systemd cgroup
driver, `docker update`/`runc update` with older runc, a restart.  Pure.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Optional

from tracer.enrichment.device_rules import DevicePolicy, OciDeviceRules, policies_from_facts
from tracer.enrichment.history_facts import changes_of
from tracer.facts import Facts

V1, V2 = "device_cgroup_v1", "device_cgroup_v2"


def _policy(layer: str, rules: Any) -> Optional[DevicePolicy]:
    """The device-rule model of one recorded state; None when unknown or malformed."""
    if not isinstance(rules, list):
        return None
    try:
        found = policies_from_facts(rules if layer == V1 else None,
                                    rules if layer == V2 else None, None)
    except (KeyError, ValueError, TypeError):
        return None
    return found[0] if found else None


def allows(layer: str, rules: Any, kind: str, major: int, minor: int, access: str) -> Optional[bool]:
    policy = _policy(layer, rules)
    return None if policy is None else policy.may(kind, major, minor, access).allowed


def config_grants(facts: Facts, kind: str, major: int, minor: int,
                  access: str) -> tuple[Optional[bool], str]:
    """Does the OCI config's linux.resources.devices allow the node?  (answer, its rule)"""
    oci = facts.get("container.oci")
    policy = OciDeviceRules.from_oci(oci.get("device_rules") if isinstance(oci, dict) else None)
    if policy is None:
        return None, ""
    found = policy.may(kind, major, minor, access)
    rule = found.detail.rsplit("'", 2)[-2] if found.allowed and "'" in found.detail else ""
    return found.allowed, rule


def cgroup_manager(facts: Facts) -> str:
    """systemd | cgroupfs | unknown: who owns the container's cgroup (inferred)."""
    oci = facts.get("container.oci")
    path = oci.get("cgroups_path") if isinstance(oci, dict) else None
    paths = facts.get("cgroup.paths")
    values = [str(v) for v in paths.values()] if isinstance(paths, dict) else []
    if isinstance(path, str) and path.count(":") == 2:   # runc's slice:prefix:name form
        return "systemd"
    if any(v.rstrip("/").endswith(".scope") and ".slice/" in v for v in values):
        return "systemd"
    return "cgroupfs" if path or values else "unknown"


def clock(epoch: Any) -> str:
    try:
        return dt.datetime.fromtimestamp(float(epoch), dt.timezone.utc).strftime("%H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return "an unknown time"


def rule_diff(layer: str, before: Any, after: Any) -> list[str]:
    """`- c 195:0 rw` / `+ ...` lines (v1), or programs detached and attached (v2)."""
    if not isinstance(before, list) or not isinstance(after, list):
        return ["(the rules on one side are not known)"]
    if layer == V1:
        gone = [f"- {r}" for r in before if r not in after]
        return gone + [f"+ {r}" for r in after if r not in before]

    def names(programs: list[Any]) -> dict[Any, str]:
        return {p.get("id"): f"program {p.get('id')} '{p.get('name') or '(no name)'}'"
                for p in programs if isinstance(p, dict)}
    old, new = names(before), names(after)
    return [f"- {v}" for k, v in old.items() if k not in new] + \
        [f"+ {v}" for k, v in new.items() if k not in old]


@dataclass
class RuleStory:
    story: str                       # outside_config | config_not_kept | never_granted
    layer: str
    in_config: Optional[bool]
    config_rule: str = ""
    granted: Optional[dict[str, Any]] = None   # the change that granted it; None: at start
    dropped: Optional[dict[str, Any]] = None   # the change that took it away; None: not seen
    diff: list[str] = field(default_factory=list)
    manager: str = "unknown"

    def who(self) -> str:
        """Who took it away: the kernel's record, else the inference, else unknown."""
        by = (self.dropped or {}).get("by")
        if isinstance(by, dict) and by.get("comm"):
            return (f"{by['comm']} (pid {by.get('pid')}, child of {by.get('parent_comm')} "
                    f"pid {by.get('ppid')})")
        if self.manager == "systemd":
            return ("systemd (it manages this container's scope; inferred: the kernel does not "
                    "record who writes v1 device rules)")
        return ("a writer the kernel does not name (it records no author of v1 device "
                "rules)")


def device_rule_story(facts: Facts, layer: str, kind: str, major: int, minor: int,
                      access: str) -> Optional[RuleStory]:
    """The node's history in the refusing layer, or None when there is none to tell."""
    starts = [s for s in facts.get("device_cgroup.at_start") or []
              if isinstance(s, dict) and s.get("layer") == layer]
    changes = [c for c in changes_of(facts) if c.get("layer") == layer]
    if not starts and not changes:
        return None
    in_config, rule = config_grants(facts, kind, major, minor, access)
    story = RuleStory("never_granted", layer, in_config, rule, manager=cgroup_manager(facts))
    state = allows(layer, starts[0].get("rules"), kind, major, minor, access) if starts else None
    granted_seen = bool(state)
    every_state_known = state is not None
    for change in changes:
        after = allows(layer, change.get("after"), kind, major, minor, access)
        every_state_known = every_state_known and after is not None
        if after and not state:
            story.granted, granted_seen = change, True
        if state and after is False:
            story.dropped = change
            story.diff = rule_diff(layer, change.get("before"), change.get("after"))
        elif state is None and after is False and granted_seen:
            story.dropped = change   # the side before was unreadable; it was allowed earlier
            story.diff = rule_diff(layer, change.get("before"), change.get("after"))
        if after is not None:
            state = after
    if not granted_seen:
        # "never granted" only when every state is known: an unread one may have allowed it
        return story if every_state_known else None
    story.story = "config_not_kept" if in_config else "outside_config"
    return story
