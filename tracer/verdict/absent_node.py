"""ENOENT on a GPU node: which of the causes users meet (CAUSES.md #9, #10).

* The node is on the host but not in the process's /dev: a unit's
  PrivateDevices=, a container runtime that did not pass it, or another private
  /dev (a sandbox's tmpfs).  `node_not_in_private_dev`; nvidia-modprobe is never
  offered, the node exists.
* The node is not on the host: its module is not loaded, or the node was never
  created; for the nodes nvidia-modprobe makes, whether it is installed, setuid
  root, and what stopped it for this process (no_new_privs, a user namespace, a
  nosuid mount).  `node_missing`.
"""

from __future__ import annotations

from typing import Any, Optional

from tracer.facts import Facts
from tracer.verdict import reasons as R
from tracer.verdict.unit_policy import unit_refusal

MODPROBE_CLASSES = ("nvidia-gpu", "nvidiactl", "nvidia-modeset", "nvidia-uvm",
                    "nvidia-uvm-tools", "nvidia-caps", "nvidia-nvswitch")
BLOCKER_TEXT = {
    "no_new_privs": "the process runs with no_new_privs (NoNewPrivileges=, Flatpak, Apptainer, "
                    "enroot), so the setuid bit gives nothing",
    "user_namespace": "the process is in a user namespace, where host root's setuid, module "
                      "loading and mknod do not apply",
    "nosuid": "nvidia-modprobe lies on a nosuid mount in the process's mount table",
    "not_setuid_root": "nvidia-modprobe is not setuid root",
}
ENOENT_EVIDENCE = ["node.on_host", "node.host_device", "process.dev_private", "node.mount",
                   "systemd.unit", "systemd.unit_properties", "container.engine",
                   "container.passes_node", "node.module_loaded", "host.gpu_modules",
                   "host.gpu_char_majors", "nvidia_modprobe.installed", "nvidia_modprobe.binary",
                   "nvidia_modprobe.blockers", "process.no_new_privs", "userns.level",
                   "node.path", "node.class"]


def major_names(facts: Facts) -> dict[int, str]:
    """/proc/devices GPU char names now, by major."""
    table = facts.get("host.gpu_char_majors") or {}
    return {int(k): str(v) for k, v in table.items() if str(k).isdigit()} \
        if isinstance(table, dict) else {}


def _host_device(facts: Facts) -> tuple[Optional[int], Optional[int]]:
    text = facts.get("node.host_device")
    if isinstance(text, str) and ":" in text:
        major, _, minor = text.partition(":")
        if major.isdigit() and minor.isdigit():
            return int(major), int(minor)
    return None, None


def _on_host_story(facts: Facts, ctx: dict[str, Any]) -> tuple[str, str, list[str]]:
    """(confidence, summary, notes) when the host has the node."""
    path = ctx["path"]
    major, minor = _host_device(facts)
    ctx["major"], ctx["minor"] = major, minor
    refusal = unit_refusal(facts, path, major, minor, major_names(facts))
    if refusal is not None and refusal.private_devices:
        ctx.update(unit=refusal.unit, unit_prop="PrivateDevices", unit_private=True,
                   allow_name=refusal.allow_name)
        return ("high", f"{path} exists on the host, but the systemd unit {refusal.unit} runs with "
                "PrivateDevices=yes: its private /dev has only pseudo devices and its device "
                "policy is closed, so the service cannot see the GPU.", refusal.notes)
    engine, passes = facts.get("container.engine"), facts.get("container.passes_node")
    if engine is not None or passes is not None:
        ctx["story"] = "container"
        told = " (its OCI config has neither a device nor a bind mount for it)" \
            if passes is False else ""
        return ("high" if passes is False else "medium",
                f"{path} exists on the host, but the {engine or 'container'} runtime did not "
                f"pass it into the container{told}.", [])
    if facts.get("process.dev_private") is True:
        ctx["story"] = "sandbox"
        return ("high", f"{path} exists on the host, but the process has a private /dev (a tmpfs "
                "in its mount namespace, as a sandbox or PrivateDevices= makes) that lacks it.",
                [])
    return ("low", f"{path} exists on the host now, but was not there for the process: created "
            "after the failure, or the process saw another /dev.", [])


def _absent_story(facts: Facts, ctx: dict[str, Any]) -> tuple[str, str, list[str]]:
    """(confidence, summary, notes) when the host lacks the node too."""
    path, cls = ctx["path"], ctx["node_class"]
    module = facts.get("node.module_loaded")
    head = f"{path} does not exist on the host either"
    if module is False:
        head += " and its driver module is not loaded"
    elif module is True:
        head += " although its driver module is loaded"
    if cls not in MODPROBE_CLASSES:
        return "high" if module is not None else "medium", head + ".", []
    installed = facts.get("nvidia_modprobe.installed")
    blockers = [b for b in facts.get("nvidia_modprobe.blockers") or [] if b in BLOCKER_TEXT]
    ctx["modprobe_blockers"] = blockers
    ctx["modprobe_installed"] = installed
    binary = facts.get("nvidia_modprobe.binary")
    ctx["modprobe_path"] = binary.get("path") if isinstance(binary, dict) else None
    if installed is False:
        tail = "; CUDA creates it by running nvidia-modprobe, which is not installed"
        if blockers:
            tail += (", and even installed it could not help this process: "
                     + "; ".join(BLOCKER_TEXT[b] for b in blockers))
    elif blockers:
        tail = ("; CUDA creates it by running the setuid nvidia-modprobe, but "
                + "; ".join(BLOCKER_TEXT[b] for b in blockers))
    elif installed:
        tail = ("; nvidia-modprobe is installed and setuid root and nothing shown stops it "
                "for this process (was it run?)")
    else:
        tail = ""
    unit = facts.get("systemd.unit")
    notes = []
    props = facts.get("systemd.unit_properties")
    if "no_new_privs" in blockers and isinstance(props, dict) and props.get("NoNewPrivileges"):
        notes.append(f"The systemd unit {unit} sets NoNewPrivileges=yes.")
    return ("high" if module is not None and installed is not None else "medium",
            head + tail + ".", notes)


def classify_enoent(facts: Facts, ctx: dict[str, Any]) -> tuple[str, str, str, list[str]]:
    """(reason, confidence, summary, notes) for an ENOENT on a GPU node path."""
    on_host = facts.get("node.on_host")
    if on_host is True:
        confidence, summary, notes = _on_host_story(facts, ctx)
        reason = R.NODE_NOT_IN_PRIVATE_DEV if confidence != "low" else R.NODE_MISSING
        ctx["on_host"] = True
        return reason, confidence, summary, notes
    if on_host is False:
        ctx["on_host"] = False
        confidence, summary, notes = _absent_story(facts, ctx)
        return R.NODE_MISSING, confidence, summary, notes
    return (R.NODE_MISSING, "low", f"{ctx['path']} does not exist where the process looked "
            "for it; whether the host has it is not known.", [])
