"""Names and numbers agree?  A device-cgroup refusal, or an ENXIO, told by the
node's number against /proc/devices, the rules in force and what gave the
container its nodes (the OCI config, a CDI spec).

* EPERM, a device layer shown to refuse, and that same policy allows another
  number meant for this node: a major /proc/devices gives to no driver now (a
  stale dynamic major: nvidia-uvm and nvidia-caps get theirs when the driver
  loads), another GPU driver's major (`c 195:*` for /dev/nvidia-uvm), or the
  number the OCI config or a CDI spec wrote for this node before it was
  renumbered: `device_number_mismatch`.
* ENXIO: the node was found and allowed, but no driver answers its number:
  `no_driver_for_node`, with the stale number's origin when one is known.

The fix is given in the form the user used (`fix_form`): the CDI spec, the
runtime's `--device`, a `--device-cgroup-rule`, an LXC config line, a systemd
unit restart, or the host's devices.allow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from tracer.enrichment.device_rules import access_from_mask, allows_other
from tracer.facts import Facts
from tracer.sensors.gpu_nodes import NVIDIA_MAJOR, is_gpu_driver
from tracer.verdict.model_input import ModelRun, device_policy_from_facts

DYNAMIC_NOTE = ("nvidia-uvm and nvidia-caps get their major when the driver loads, so a number "
                "written down before a driver reload or upgrade allows nothing after it")
WHY_ORDER = ("renumbered", "no_driver", "gpu_driver", "other_minor")
# /proc/devices names of the driver each node class belongs to
CLASS_DRIVERS = {"nvidia-uvm": ("nvidia-uvm",), "nvidia-uvm-tools": ("nvidia-uvm",),
                 "nvidia-caps": ("nvidia-caps", "nvidia-caps-imex-channels"),
                 "nvidia-nvswitch": ("nvidia-nvswitch",),
                 "nvidia-gpu": ("nvidia", "nvidia-frontend"),
                 "nvidiactl": ("nvidia", "nvidia-frontend"),
                 "nvidia-modeset": ("nvidia", "nvidia-frontend"),
                 "drm-render": ("drm",), "drm-card": ("drm",)}


@dataclass(frozen=True)
class OtherNumber:
    major: int
    minor: int
    allowed_by: str          # the v1 rule's text, or the v2 programs' labels
    named: Optional[str]     # what /proc/devices calls `major` now
    why: str                 # one of WHY_ORDER
    origin: str = ""         # renumbered: what wrote the old number for this node


def dynamic_major(major: int) -> bool:
    """A major the kernel hands out at load time (fs/char_dev.c: 234-254, then 384-511):
    the only kind that goes stale when a driver reloads."""
    return 234 <= major <= 254 or 384 <= major <= 511


def char_names(facts: Facts) -> Optional[dict[int, str]]:
    """/proc/devices char drivers by major, as read for this event; None unknown."""
    table = facts.get("host.char_majors")
    if not isinstance(table, dict):
        return None
    return {int(k): str(v) for k, v in table.items() if str(k).isdigit()}


def node_number(facts: Facts) -> Optional[tuple[int, int]]:
    major, minor = facts.get("node.major"), facts.get("node.minor")
    ok = all(isinstance(n, int) and not isinstance(n, bool) for n in (major, minor))
    return (major, minor) if ok else None


def _oci_device(facts: Facts) -> Optional[dict[str, Any]]:
    oci, path = facts.get("container.oci"), facts.get("node.path")
    if not isinstance(oci, dict) or not isinstance(oci.get("devices"), list):
        return None
    return next((d for d in oci["devices"] if isinstance(d, dict) and d.get("path") == path), None)


def stale_cdi(facts: Facts) -> Optional[dict[str, Any]]:
    """The CDI device entry for this node whose written number is stale: not the host
    node's number now (a number no driver has is the spec's fault only when the host
    node's differs; with the same number the driver is simply not loaded)."""
    for entry in facts.get("cdi.devices") or []:
        if not isinstance(entry, dict):
            continue
        stale = set(entry.get("stale") or [])
        node, host = entry.get("node"), entry.get("host_node")
        same = isinstance(node, dict) and isinstance(host, dict) and node.get("major") is not None \
            and (node.get("major"), node.get("minor")) == (host.get("major"), host.get("minor"))
        if "renumbered" in stale or "no_driver" in stale and not same:
            return entry
    return None


def written_numbers(facts: Facts) -> dict[tuple[int, int], str]:
    """Numbers something wrote for this node (a stale CDI spec, the container's OCI
    config), with what wrote each."""
    out = {}
    entry = stale_cdi(facts)
    if entry is not None:
        node = entry.get("node") or {}
        if isinstance(node.get("major"), int) and isinstance(node.get("minor"), int):
            out[(node["major"], node["minor"])] = \
                f"the CDI device {entry.get('device')} in {entry.get('spec')}"
    given = _oci_device(facts)
    if given is not None and isinstance(given.get("major"), int) \
            and isinstance(given.get("minor"), int):
        out.setdefault((given["major"], given["minor"]),
                       "the container's OCI config (linux.devices) written when it was created")
    return out


def others_allowed(facts: Facts, run: ModelRun, layer: str) -> list[OtherNumber]:
    """Numbers other than the node's that the refusing layer allows and that were meant
    for this node, most telling first; [] when the facts cannot show any."""
    number, names = node_number(facts), char_names(facts)
    policies = device_policy_from_facts(facts) or ()
    policy = next((p for p in policies if p.layer == layer), None)
    if number is None or names is None or policy is None:
        return []
    major, minor = number
    kind = "b" if facts.get("node.type") == "block" else "c"
    old = {n: o for n, o in written_numbers(facts).items() if n != number}
    found = []
    for other_major, other_minor, allowed_by in allows_other(policy, kind, major, minor,
                                                             access_from_mask(run.mask) or "rw"):
        named = names.get(other_major)
        if (other_major, other_minor) in old:
            why = "renumbered"
        elif other_major == major:
            if named is None or not is_gpu_driver(named):
                continue
            why = "other_minor"
        elif named is None and dynamic_major(other_major):
            why = "no_driver"
        elif named is not None and is_gpu_driver(named):
            why = "gpu_driver"
        else:
            continue  # a runtime's own rules (mem, tty, pts...)
        found.append(OtherNumber(other_major, other_minor, allowed_by, named, why,
                                 old.get((other_major, other_minor), "")))
    return sorted(found, key=lambda o: WHY_ORDER.index(o.why))


def fix_form(facts: Facts, others: list[OtherNumber]) -> str:
    """How the user gave the container (or unit) its device rules: cdi | device |
    cgroup_rule | lxc | unit | host | unknown."""
    engine = facts.get("container.engine")
    if engine is None and isinstance(facts.get("systemd.unit"), str):
        return "unit"
    if engine == "lxc":
        return "lxc"
    if stale_cdi(facts) is not None:
        return "cdi"
    oci = facts.get("container.oci")
    if isinstance(oci, dict):
        if _oci_device(facts) is not None:
            return "device"
        rules = [r for r in oci.get("device_rules") or [] if isinstance(r, dict) and r.get("allow")]
        devices = [d for d in oci.get("devices") or [] if isinstance(d, dict)]
        if any(r.get("major") == o.major and not any(d.get("major") == o.major for d in devices)
               for o in others for r in rules):
            return "cgroup_rule"
        return "device"
    if engine is None and facts.get("container.id") is None and facts.get("userns.level") == 0:
        return "host"
    return "unknown"


def _named(major: int, names: dict[int, str]) -> str:
    return f" ({names[major]})" if major in names else ""


def mismatch_sentence(path: str, number: tuple[int, int], other: OtherNumber,
                      names: dict[int, str]) -> str:
    major, minor = number
    node = f"{path} is c {major}:{minor}{_named(major, names)}"
    rule = (f"The device cgroup's {other.allowed_by} allows c {other.major}:{other.minor}"
            if other.allowed_by.startswith("program ") else
            f"The device cgroup allows {other.allowed_by}")
    if other.why == "renumbered":
        return (f"{rule}, the number {other.origin} gave {path}, but {node} now, which no "
                f"rule allows: the node was renumbered since ({DYNAMIC_NOTE}).")
    if other.why == "no_driver":
        return (f"{rule}, but /proc/devices gives major {other.major} to no driver now, and "
                f"{node}, which no rule allows: the rule names a stale major ({DYNAMIC_NOTE}).")
    if other.why == "gpu_driver":
        return (f"{rule} (major {other.major} is {other.named}), but {node}, a major of its own, "
                "which no rule allows.")
    return f"{rule} ({other.named} minor {other.minor}), but {node}, which no rule allows."


def context_for(facts: Facts, ctx: dict[str, Any], form: str, stale: Optional[int]) -> None:
    """What the fix templates read: the form, the node's major now, the stale one, CDI."""
    entry = stale_cdi(facts)
    ctx.update(number_form=form, stale_major=stale, engine=facts.get("container.engine"),
               container_name=facts.get("container.name"), unit=facts.get("systemd.unit")
               if form == "unit" else ctx.get("unit"),
               cgroup_version=facts.get("device_cgroup.version"))
    if entry is not None:
        ctx.update(cdi_device=entry.get("device"), cdi_spec=entry.get("spec"))


def driver_of_class(node_class: str, names: dict[int, str]) -> Optional[tuple[int, str]]:
    """The major /proc/devices gives the driver of this node class now."""
    wanted = CLASS_DRIVERS.get(node_class, ())
    if node_class in ("nvidia-gpu", "nvidiactl", "nvidia-modeset") and NVIDIA_MAJOR in names:
        return NVIDIA_MAJOR, names[NVIDIA_MAJOR]
    return next(((m, n) for m, n in sorted(names.items()) if n in wanted), None)


def tell_mismatch(facts: Facts, run: ModelRun, ctx: dict[str, Any]
                  ) -> Optional[tuple[str, list[str]]]:
    """(summary, notes) when the refusing device layer allows another number meant for
    this node; None when the facts show no such number.  Sets the fix context."""
    layer = ctx.get("device_layer")
    others = others_allowed(facts, run, str(layer)) if layer else []
    number, names = node_number(facts), char_names(facts)
    if not others or number is None or names is None:
        return None
    path = str(ctx["path"])
    summary = mismatch_sentence(path, number, others[0], names)
    notes = [mismatch_sentence(path, number, o, names) for o in others[1:4]]
    form = fix_form(facts, others)
    context_for(facts, ctx, form, next((o.major for o in others if o.major != number[0]), None))
    entry = stale_cdi(facts)
    if entry is not None:
        notes.append(cdi_note(entry))
    return summary, notes


def cdi_note(entry: dict[str, Any]) -> str:
    node = entry.get("node") or {}
    host = entry.get("host_node") or {}
    written = f"c {node.get('major')}:{node.get('minor')}"
    now = (f"its host node {node.get('host_path')} is c {host.get('major')}:{host.get('minor')}"
           if host else f"its host node {node.get('host_path')} does not exist")
    return (f"The CDI device {entry.get('device')} ({entry.get('spec')}) writes {written} for "
            f"{node.get('path')}; {now}: the spec is stale, and a runtime takes a number the "
            "spec writes as it is.")


def classify_enxio(facts: Facts, ctx: dict[str, Any]) -> tuple[str, str, list[str]]:
    """(confidence, summary, notes) for an ENXIO: the node was found and allowed, and
    no driver, or no device of its driver, answers its number."""
    path, number, names = str(ctx["path"]), node_number(facts), char_names(facts)
    if number is None or names is None:
        return "low", (f"No driver answered {path}'s device number; the number or /proc/devices "
                       "is not known."), []
    major, minor = number
    current = driver_of_class(str(ctx.get("node_class")), names)
    origin = written_numbers(facts).get(number)
    made = f" ({origin} wrote it)" if origin else ""
    entry = stale_cdi(facts)
    notes = [cdi_note(entry)] if entry is not None else []
    form = "cdi" if entry is not None else "device" if origin else \
        "host" if facts.get("container.engine") is None and facts.get("container.id") is None \
        else "unknown"
    context_for(facts, ctx, form, major)
    host_node = (entry.get("host_node") or {}) if entry is not None else {}
    if isinstance(host_node.get("major"), int):
        ctx["major_now"] = host_node["major"]
    elif current is not None:
        ctx["major_now"] = current[0]
    if current is not None:
        ctx["driver_major"] = current[0]
    ctx["stale_node"] = major not in names or (current is not None and current[0] != major)
    if major not in names:
        if entry is not None and host_node and isinstance(host_node.get("major"), int):
            node = entry.get("node") or {}
            return "high", (f"{path} is c {major}:{minor}{made}, but no driver has major {major} "
                            f"now; the spec's host node {node.get('host_path')} is c "
                            f"{host_node['major']}:{host_node.get('minor')}"
                            f"{_named(host_node['major'], names)}: the spec is stale, and a "
                            "runtime makes the node with the number a spec writes."), notes
        if current is not None and current[0] != major:
            return "high", (f"{path} is c {major}:{minor}{made}, but no driver has major {major} "
                            f"now; {current[1]} is major {current[0]}: the node was made with a "
                            f"number from before the driver was reloaded ({DYNAMIC_NOTE})."), notes
        return "high", (f"{path} is c {major}:{minor}{made}, and no driver has major {major}: "
                        "its driver is not loaded."), notes
    if current is not None and current[0] != major:
        return "medium", (f"{path} is c {major}:{minor}{made}, which /proc/devices gives to "
                          f"{names[major]}, not to {current[1]} (major {current[0]}): the node "
                          "has another driver's number."), notes
    return "medium", (f"{path} is c {major}:{minor}, the number of {names[major]}, but that "
                      f"driver has no device at minor {minor} (the GPU is absent, not bound "
                      "to the driver, or has fallen off the bus)."), notes
