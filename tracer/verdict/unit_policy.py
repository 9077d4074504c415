"""Does a systemd unit's device sandboxing refuse this node, and which property?

Evaluates the unit's PrivateDevices=, DevicePolicy= and DeviceAllow= (read by
enrichment/systemd_unit.py) the way systemd builds the unit's device policy:
`char-NAME` entries are globs over the driver names in /proc/devices now, path
entries are the node's device number (resolved on the host); any restriction
(PrivateDevices=yes, DevicePolicy=closed|strict, or a non-empty DeviceAllow=)
makes every other device refused.  The fix names the node's major by its
current /proc/devices name (since driver 550.40 major 195 is `nvidia`, no
longer `nvidia-frontend`: nixpkgs#331069).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from tracer.facts import Facts

SAFE_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,64}")
OLD_NVIDIA_NAME = "nvidia-frontend"


@dataclass
class UnitRefusal:
    unit: str
    prop: str                    # PrivateDevices | DevicePolicy | DeviceAllow
    detail: str                  # what the property says about this node
    allow_name: Optional[str]    # DeviceAllow=char-NAME allows the node (None: by its path)
    notes: list[str] = field(default_factory=list)
    private_devices: bool = False
    no_new_privileges: bool = False


def _covers(entry: dict[str, Any], major: int, minor: int, major_name: Optional[str],
            wanted: str) -> bool:
    spec, access = str(entry.get("spec", "")), str(entry.get("access", ""))
    if not set(wanted) <= set(access):
        return False
    if spec.startswith("char-"):
        return major_name is not None and fnmatch.fnmatchcase(major_name, spec[5:])
    if spec.startswith("/dev/"):
        return entry.get("device") == f"{major}:{minor}"
    return False


def allow_name(major_name: Optional[str]) -> Optional[str]:
    """The driver name a `DeviceAllow=char-NAME` line may carry (else the fix names
    the node by its path)."""
    return major_name if major_name is not None and SAFE_NAME.fullmatch(major_name) else None


def _entry_notes(allow: list[dict[str, Any]], names: set[str]) -> list[str]:
    notes = []
    for entry in allow:
        spec = str(entry.get("spec", ""))
        if spec.startswith("char-") and not any(fnmatch.fnmatchcase(n, spec[5:]) for n in names):
            note = (f"DeviceAllow={spec} matches no driver in /proc/devices, so it allows "
                    "nothing")
            if spec[5:] == OLD_NVIDIA_NAME and "nvidia" in names:
                note += (" (since driver 550.40 /proc/devices names major 195 'nvidia', no "
                         "longer 'nvidia-frontend')")
            notes.append(note + ".")
        elif spec.startswith("/dev/") and "device" in entry and entry["device"] is None:
            notes.append(f"DeviceAllow={spec} names a node that does not exist now; systemd "
                         "skips a path it cannot stat when the unit starts.")
    return notes


def unit_refusal(facts: Facts, path: str, major: Optional[int], minor: Optional[int],
                 major_names: dict[int, str], wanted: str = "rw") -> Optional[UnitRefusal]:
    """The unit property that refuses this node, or None (no unit, no restriction,
    or the node allowed).  `major_names`: /proc/devices char names now."""
    unit, props = facts.get("systemd.unit"), facts.get("systemd.unit_properties")
    if not isinstance(unit, str) or not isinstance(props, dict):
        return None
    allow = [e for e in props.get("DeviceAllow") or [] if isinstance(e, dict)]
    private = props.get("PrivateDevices") is True
    policy = str(props.get("DevicePolicy", "auto"))
    restricted = private or policy in ("closed", "strict") or bool(allow)
    if not restricted:
        return None
    name = major_names.get(major) if major is not None else None
    covered = [e for e in allow if major is not None and minor is not None
               and _covers(e, major, minor, name, wanted)]
    notes = _entry_notes(allow, set(major_names.values()))
    where = f"{major}:{minor}" if major is not None else "?"
    if private:
        prop, detail = "PrivateDevices", ("PrivateDevices=yes gives the service a private /dev "
                                          "with only pseudo devices (null, zero, random...) and a "
                                          "closed device policy")
    elif covered:
        return None
    elif allow:
        listed = ", ".join(f"{e.get('spec')} {e.get('access')}" for e in allow[:8])
        prop, detail = "DeviceAllow", f"DeviceAllow= ({listed}) does not cover {path} ({where})"
    else:
        prop, detail = "DevicePolicy", (f"DevicePolicy={policy} with no DeviceAllow= allows only "
                                        "pseudo devices")
    return UnitRefusal(unit, prop, detail, allow_name(name), notes, private,
                       props.get("NoNewPrivileges") is True)
