"""What the configuration on the host says about a refusal the catalog already
named: a CDI spec that gave the node, the NVIDIA driver's device-file
parameters, the container toolkit's `no-cgroups`.  Each story is told only
where its facts show the configuration made the refused node what it is; it
then tells the summary and puts its fix first (fixes_driver_config.py), and
otherwise adds a note or nothing.  The reason (the layer that refused) stays.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from tracer.facts import Facts
from tracer.verdict import reasons as R
from tracer.verdict.model_input import ModelRun

if TYPE_CHECKING:
    from tracer.verdict.catalog import Classification

DAC_REASONS = (R.NOT_IN_GROUP, R.MODE_RESTRICTIVE, R.GID_MISMATCH_IN_CONTAINER,
               R.SEAT_ACL_ONLY, R.CAPABILITY_REQUIRED, R.GROUP_DROPPED_IN_USERNS)
DRIVER_CLASSES = ("nvidia-gpu", "nvidiactl", "nvidia-modeset", "nvidia-uvm", "nvidia-uvm-tools")
STALE_TEXT = {
    "gone": "its host node {host_path} does not exist now",
    "renumbered": "it writes c {major}:{minor}, but the host node is c {host_major}:{host_minor} now",
    "no_driver": "it writes major {major}, which no driver has now",
    "no_gid": "it gives no gid, while the host node's group is {host_gid}",
    "other_driver_version": "it mounts the libraries of driver {versions}, but driver {loaded} "
                            "is loaded",
}


def _entry(facts: Facts) -> Optional[dict[str, Any]]:
    """The CDI device entry for the node: the one the container was given, else the first."""
    entries = [e for e in facts.get("cdi.devices") or [] if isinstance(e, dict)]
    given = [e for e in entries if e.get("container_node") is not None]
    found = given or entries
    return found[0] if found else None


def _stale_words(entry: dict[str, Any]) -> list[str]:
    node, host = entry.get("node") or {}, entry.get("host_node") or {}
    values = {"host_path": node.get("host_path"), "major": node.get("major"),
              "minor": node.get("minor"), "host_major": host.get("major"),
              "host_minor": host.get("minor"), "host_gid": host.get("gid"),
              "versions": ", ".join(entry.get("driver_versions") or []),
              "loaded": entry.get("driver_loaded")}
    return [STALE_TEXT[s].format(**values) for s in entry.get("stale") or [] if s in STALE_TEXT]


def _readable(entry: dict[str, Any], uid: Any, groups: list[Any]) -> Optional[bool]:
    owner = entry.get("spec_file")
    if not isinstance(owner, dict) or not isinstance(uid, int):
        return None
    mode = int(str(owner.get("mode", "0")), 8)
    if uid == 0:
        return True
    if owner.get("uid") == uid:
        return bool(mode & 0o400)
    if owner.get("gid") in groups:
        return bool(mode & 0o040)
    return bool(mode & 0o004)


def cdi_story(facts: Facts, errno_name: str, found: "Classification") -> None:
    entry = _entry(facts)
    if entry is None or not found.context.get("in_container"):
        return  # a spec names what a runtime gives a container, not a host process's node
    ctx = found.context
    ctx.setdefault("cdi_device", entry.get("device"))
    ctx.setdefault("cdi_spec", entry.get("spec"))
    node = entry.get("node") or {}
    stale = _stale_words(entry)
    # "the node ... gives", not "comes from": a runtime records no CDI request in the
    # OCI config (podman 4 writes the node as it writes --device), so a spec naming
    # the same node is a match, not proof
    note = (f"{node.get('path')} is the node the CDI device {entry.get('device')} "
            f"({entry.get('spec')}) gives" + (": the spec is stale: " + "; ".join(stale)
                                               if stale else "") + ".")
    if not any(str(entry.get("spec")) in n for n in found.notes):
        found.notes.append(note)
    if facts.get("container.rootless") and _readable(entry, facts.get("host.user_uid"),
                                                     facts.get("host.user_groups") or []) is False:
        found.notes.append(f"{entry.get('spec')} (mode {(entry.get('spec_file') or {}).get('mode')})"
                           " cannot be read by the rootless container's user, so its runtime "
                           f"cannot resolve {entry.get('device')} (\"unresolvable CDI devices\").")
    if errno_name == "EACCES" and found.reason in DAC_REASONS and "no_gid" in (entry.get("stale") or []):
        _missing_gid(facts, entry, found)


def _missing_gid(facts: Facts, entry: dict[str, Any], found: "Classification") -> None:
    """The container's node lacks the host node's group because the spec gives no gid
    (NVIDIA/nvidia-container-toolkit#1631)."""
    host, node = entry.get("host_node") or {}, entry.get("node") or {}
    inside, host_gid = facts.get("node.gid"), host.get("gid")
    groups = facts.get("process.groups")
    if not isinstance(inside, int) or inside == host_gid or not isinstance(host_gid, int):
        return
    mode = int(str(host.get("mode", "0")), 8)
    holds = (isinstance(groups, list) and host_gid in groups) \
        or facts.get("process.fsgid") == host_gid
    found.context.update(stories=found.context.get("stories", []) + ["cdi_gid"],
                         cdi_host_gid=host_gid, cdi_node_path=node.get("path"))
    grants = "rw" if mode & 0o060 == 0o060 else "r" if mode & 0o040 else "no access"
    found.summary = (
        f"{found.context['path']} in the container belongs to group {inside}, not to the host "
        f"node's gid {host_gid}: the CDI device {entry.get('device')} ({entry.get('spec')}) lists "
        f"it without a gid, so the runtime made it with group {inside}"
        + (f", and the process's gid {host_gid}, which the host node's group bits grant "
           f"({grants}), no longer counts." if holds else "."))
    found.confidence = "high" if holds else "medium"
    found.evidence[:0] = ["cdi.devices", "node.gid", "process.groups"]


def driver_story(facts: Facts, found: "Classification") -> None:
    """The node's mode or group is the NVIDIA driver's device-file policy."""
    policy = facts.get("nvidia.device_file_policy")
    if not isinstance(policy, dict) or facts.get("node.class") not in DRIVER_CLASSES \
            or found.reason not in DAC_REASONS:
        return
    mode_text, gid = facts.get("node.mode"), facts.get("node.gid")
    mode = policy.get("mode") if isinstance(policy.get("mode"), dict) else None
    group = policy.get("gid") if isinstance(policy.get("gid"), dict) else None
    ctx, path = found.context, found.context["path"]
    if mode is not None and isinstance(mode_text, str) and mode_text.isdigit() \
            and int(mode_text, 8) == int(mode["value"]) & 0o7777:
        configured = mode.get("configured") or {}
        where = configured.get("source") or mode.get("source")
        if mode.get("decimal_trap"):
            raw = configured.get("raw") or str(mode["value"])
            ctx.update(stories=ctx.get("stories", []) + ["driver_mode"],
                       driver_mode_intended=mode.get("intended"), driver_mode_source=where)
            found.summary = (
                f"{path} has mode {mode_text} because NVreg_DeviceFileMode={raw} ({where}) has no "
                f"leading 0: the kernel reads it as decimal {mode['value']}, which is octal "
                f"{mode['octal']}, not {mode.get('intended')}, and the driver gives its nodes "
                "that mode.")
            found.confidence = "high"
            found.evidence[:0] = ["nvidia.device_file_policy", "node.mode"]
        else:
            found.notes.append(f"The NVIDIA driver gives its nodes mode {mode['octal']} "
                               f"(NVreg_DeviceFileMode, {where}).")
    if group is not None and gid == group.get("value") and gid != 0:
        configured = group.get("configured") or {}
        found.notes.append(f"The NVIDIA driver gives its nodes group {gid} "
                           f"(NVreg_DeviceFileGID, {configured.get('source') or group.get('source')}).")
    modify = policy.get("modify") if isinstance(policy.get("modify"), dict) else None
    if modify is not None and modify.get("value") == 0 and mode is not None \
            and isinstance(mode_text, str) and mode_text != mode.get("octal"):
        found.notes.append("NVreg_ModifyDeviceFiles=0: the driver leaves existing nodes alone, "
                           f"so {path}'s mode {mode_text} was set by something else (udev, an "
                           "administrator, a container runtime).")


def toolkit_story(facts: Facts, found: "Classification") -> None:
    """no-cgroups = true with a rootful container: the hook never wrote the GPU rules."""
    config = facts.get("nvidia.toolkit_config")
    if not isinstance(config, dict) or found.reason != R.DEVICE_CGROUP \
            or facts.get("node.class") not in DRIVER_CLASSES + ("nvidia-caps",) \
            or facts.get("container.engine") is None:
        return
    rootless = facts.get("container.rootless") is True or (facts.get("userns.level") or 0) > 0
    if config.get("no_cgroups") is True and not rootless and config.get("mode") != "cdi":
        ctx = found.context
        ctx.update(stories=ctx.get("stories", []) + ["toolkit_cgroups"],
                   toolkit_config=config.get("path"))
        found.summary = (
            f"The device cgroup of this rootful container does not allow {ctx['path']} "
            f"({ctx.get('major')}:{ctx.get('minor')}), and {config.get('path')} sets no-cgroups "
            "= true: the NVIDIA hook that gives a container its GPU then never writes the device "
            "rules, so the kernel refuses the node.")
        found.notes.append("That the NVIDIA hook gave this container its GPU is inferred from "
                           "the configuration; its run is not recorded.")
    elif config.get("no_cgroups") is False and rootless and config.get("mode") != "cdi":
        found.notes.append(f"{config.get('path')} has no-cgroups = false: the NVIDIA hook fails in "
                           "rootless containers (it cannot write device rules); rootless "
                           "containers get the GPU through CDI (--device nvidia.com/gpu=all).")


def config_stories(errno_name: str, facts: Facts, run: ModelRun,
                   found: "Classification") -> "Classification":
    cdi_story(facts, errno_name, found)
    if errno_name == "EACCES":
        driver_story(facts, found)
    if errno_name == "EPERM":
        toolkit_story(facts, found)
    return found
