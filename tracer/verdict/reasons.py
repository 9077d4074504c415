"""Stable reason codes and the Verdict a denial gets.

Reason codes are part of the JSON contract (`verdict.reason`); add new ones,
never rename.  Runtimes a fix applies to are a closed set too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

GROUP_DROPPED_IN_USERNS = "group_dropped_in_userns"
NOT_IN_GROUP = "not_in_group"
SEAT_ACL_ONLY = "seat_acl_only"
GID_MISMATCH_IN_CONTAINER = "gid_mismatch_in_container"
DEVICE_CGROUP = "device_cgroup"
NODEV_MOUNT = "nodev_mount"
LSM_DENIED = "lsm_denied"
MODE_RESTRICTIVE = "mode_restrictive"
CAPABILITY_REQUIRED = "capability_required"
NODE_MISSING = "node_missing"
SECCOMP_DENIED = "seccomp_denied"
UNKNOWN = "unknown"
# ENOENT although the host has the node: the process's own /dev lacks it (a unit's
# PrivateDevices=, a runtime that did not pass it, a sandbox's private /dev)
NODE_NOT_IN_PRIVATE_DEV = "node_not_in_private_dev"
# told over time (issue 17): granted, then taken away
DEVICE_CGROUP_REVOKED = "device_cgroup_revoked"
SESSION_PREDATES_GROUP = "session_predates_group"
GROUP_DROPPED_BY_PROCESS = "group_dropped_by_process"
ACL_MASK_WITHHOLDS = "acl_mask_withholds"
# EPERM: the device cgroup allows another number meant for this node (a stale dynamic
# major, another GPU driver's major, a number from before the node was renumbered)
DEVICE_NUMBER_MISMATCH = "device_number_mismatch"
# ENXIO: no driver (or no device of its driver) answers the node's number
NO_DRIVER_FOR_NODE = "no_driver_for_node"

REASONS = (GROUP_DROPPED_IN_USERNS, NOT_IN_GROUP, SEAT_ACL_ONLY, GID_MISMATCH_IN_CONTAINER,
           DEVICE_CGROUP, NODEV_MOUNT, LSM_DENIED, MODE_RESTRICTIVE, CAPABILITY_REQUIRED,
           NODE_MISSING, SECCOMP_DENIED, UNKNOWN, NODE_NOT_IN_PRIVATE_DEV,
           DEVICE_CGROUP_REVOKED, SESSION_PREDATES_GROUP, GROUP_DROPPED_BY_PROCESS,
           ACL_MASK_WITHHOLDS, DEVICE_NUMBER_MISMATCH, NO_DRIVER_FOR_NODE)

RUNTIMES = ("podman-runc", "podman-crun", "docker", "kubernetes", "host", "any")
CONFIDENCES = ("high", "medium", "low")


@dataclass(frozen=True)
class Evidence:
    fact: str
    value: Any
    source: str   # live | kernel | inferred | cached
    origin: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"fact": self.fact, "value": self.value, "source": self.source,
                "origin": self.origin}


@dataclass(frozen=True)
class Fix:
    summary: str               # what the fix does, in plain words
    command: str               # the exact command or config line
    applies_to: str            # one of RUNTIMES
    where: str = ""            # the file the line goes into, when it is config
    security_note: str = ""    # set when the fix weakens isolation

    def __post_init__(self) -> None:
        if self.applies_to not in RUNTIMES:
            raise ValueError(f"unknown runtime {self.applies_to!r}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"summary": self.summary, "command": self.command,
                               "applies_to": self.applies_to}
        if self.where:
            out["where"] = self.where
        if self.security_note:
            out["security_note"] = self.security_note
        return out


@dataclass
class Verdict:
    reason: str
    summary: str                  # one plain sentence for a non-expert
    confidence: str               # high | medium | low
    evidence: list[Evidence] = field(default_factory=list)
    fixes: list[Fix] = field(default_factory=list)   # best first
    notes: list[str] = field(default_factory=list)   # limitations worth knowing
    check: Optional[str] = None   # the access-model check that failed
    model_detail: str = ""
    # layers that would still refuse after the fix, in the kernel's order:
    # {"layer", "errno", "reason", "detail", "fix"}
    then: list[dict[str, Any]] = field(default_factory=list)
    ladder: list[dict[str, Any]] = field(default_factory=list)  # every layer evaluated

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown reason {self.reason!r}")
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"unknown confidence {self.confidence!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "reason": self.reason, "summary": self.summary, "confidence": self.confidence,
            "check": self.check, "model_detail": self.model_detail,
            "evidence": [e.to_json() for e in self.evidence],
            "fixes": [dict(f.to_json(), rank=i + 1) for i, f in enumerate(self.fixes)],
            "notes": list(self.notes),
            "then": list(self.then),
            "ladder": list(self.ladder),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Verdict":
        """A verdict as `to_json` wrote it (a recorded event's); raises on a bad one."""
        return cls(
            reason=str(d["reason"]), summary=str(d.get("summary", "")),
            confidence=str(d.get("confidence", "low")),
            evidence=[Evidence(str(e["fact"]), e.get("value"), str(e.get("source", "")),
                               str(e.get("origin", ""))) for e in d.get("evidence") or []],
            fixes=[Fix(str(f["summary"]), str(f["command"]), str(f["applies_to"]),
                       str(f.get("where", "")), str(f.get("security_note", "")))
                   for f in d.get("fixes") or []],
            notes=[str(n) for n in d.get("notes") or []], check=d.get("check"),
            model_detail=str(d.get("model_detail", "")), then=list(d.get("then") or []),
            ladder=list(d.get("ladder") or []))
