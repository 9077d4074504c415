"""Fixes for a node whose number the rules (or the node itself) got wrong
(`device_number_mismatch`, `no_driver_for_node`), in the form the user used:
the CDI spec, the runtime's `--device`, a `--device-cgroup-rule`, an LXC
config line, a systemd unit restart, or the host's devices.allow.

Every value goes through fix_lines.py; the context comes from
number_mismatch.context_for."""

from __future__ import annotations

import re
from typing import Any, Optional

from tracer.verdict.fix_lines import fix_line, number, shell_path, shell_word
from tracer.verdict.reasons import Fix

DYNAMIC = ("nvidia-uvm's and nvidia-caps' majors change when the driver reloads: a path "
           "(--device) is resolved again each time the container is created, a number is not.")
SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _major_now(ctx: dict[str, Any]) -> Any:
    """The major the node's driver has now (the host node's, where the refused node was
    made with a stale one)."""
    return ctx.get("major_now", ctx.get("major"))


def _rule(ctx: dict[str, Any]) -> str:
    """`c MAJOR:* rwm` for the node's current major (digits only)."""
    return shell_word(f"c {number(_major_now(ctx), 'major')}:* rwm", "rule")


def _engines(ctx: dict[str, Any]) -> list[tuple[str, str]]:
    engine = ctx.get("engine")
    both = [("docker", "docker"), ("podman", "podman-crun")]
    return [e for e in both if e[0] == engine] or both


def _cdi(ctx: dict[str, Any]) -> list[Fix]:
    spec, device = ctx.get("cdi_spec"), ctx.get("cdi_device")
    fixes = []
    if isinstance(device, str) and device.startswith("nvidia.com/"):
        fixes.append(fix_line("Regenerate the stale CDI spec for the driver and nodes the host "
                              "has now.", "host",
                              lambda: f"nvidia-ctk cdi generate --output={shell_path(spec, 'file')}"))
    else:
        fixes.append(fix_line("Correct the node's number in the CDI spec (or drop type, major "
                              "and minor there, so the runtime reads them from the host node).",
                              "host", lambda: f"major: {number(_major_now(ctx), 'major')}",
                              where=f"{spec}, the deviceNodes entry for the node"
                              if isinstance(spec, str) else "the CDI spec"))
    fixes += [fix_line(f"Then re-create the container with the CDI device ({device}).", applies,
                       lambda: f"{engine} run --device {shell_word(device, 'CDI device')} ...")
              for engine, applies in _engines(ctx)]
    return fixes


def _recreate(ctx: dict[str, Any]) -> list[Fix]:
    return [fix_line("Re-create the container: the runtime reads the node's number again when "
                     "it creates it (a restart of the same container keeps the old one). "
                     + DYNAMIC, applies,
                     lambda: f"{engine} run --device {shell_path(ctx.get('node_path'))} ...")
            for engine, applies in _engines(ctx)]


def _cgroup_rule(ctx: dict[str, Any]) -> list[Fix]:
    stale = ctx.get("stale_major")
    was = f" instead of the stale {stale}" if isinstance(stale, int) else ""
    return [fix_line(f"Give the rule the node's major now{was} (re-create the container). "
                     + DYNAMIC, applies,
                     lambda: f"{engine} run --device-cgroup-rule {_rule(ctx)} ...")
            for engine, applies in _engines(ctx)] + _recreate(ctx)[:1]


def _lxc(ctx: dict[str, Any]) -> list[Fix]:
    key = "lxc.cgroup.devices.allow" if ctx.get("cgroup_version") == 1 else \
        "lxc.cgroup2.devices.allow"
    name = ctx.get("container_name")
    where = (f"/var/lib/lxc/{name}/config" if isinstance(name, str) and SAFE_NAME.fullmatch(name)
             else "the container's LXC config") + ", then restart the container"
    return [fix_line("Allow the node's major now in the container's LXC config. " + DYNAMIC,
                     "host", lambda: f"{key} = c {number(_major_now(ctx), 'major')}:* rwm",
                     where=where)]


def _unit(ctx: dict[str, Any]) -> list[Fix]:
    return [fix_line("Restart the unit: systemd resolves DeviceAllow= names and paths to numbers "
                     "when the unit starts, and this one started before the node got its "
                     "number.", "host", lambda: f"systemctl restart {shell_word(ctx.get('unit'), 'unit')}")]


FORMS = {"cdi": _cdi, "device": _recreate, "cgroup_rule": _cgroup_rule, "lxc": _lxc,
         "unit": _unit}


def number_fixes(ctx: dict[str, Any]) -> list[Fix]:
    """The fixes of the form the user used; [] when that form is not known."""
    form = FORMS.get(str(ctx.get("number_form")))
    return form(ctx) if form is not None else []


def recreate_node(ctx: dict[str, Any], modprobe_args: Optional[str]) -> list[Fix]:
    """A host node made with another driver's (or a gone driver's) number."""
    path = ctx.get("node_path")
    if ctx.get("driver_major") is None:
        if modprobe_args is None:
            return []
        return [fix_line("Load the driver and create its nodes.", "host",
                         lambda: f"nvidia-modprobe {modprobe_args}")]
    if modprobe_args is None:
        return [fix_line("Remove the node made with the old number; the driver's udev rule or "
                         "loader makes it again with the current one.", "host",
                         lambda: f"rm -f {shell_path(path)}")]
    return [fix_line("Remove the node made with the old number and create it again with the "
                     "current one.", "host",
                     lambda: f"rm -f {shell_path(path)} && nvidia-modprobe {modprobe_args}")]
