"""Fixes that correct a configuration file on the host, put first when a story in
config_stories.py showed that file made the refused node what it is: a CDI
spec's missing gid, NVreg_DeviceFileMode without its leading 0, the container
toolkit's no-cgroups.  Each value goes through fix_lines.py."""

from __future__ import annotations

import re
from typing import Any, Callable

from tracer.verdict.fix_lines import (Unpastable, fix_line, modprobe_options, number,
                                      shell_path, shell_word)
from tracer.verdict.reasons import Fix

OCTAL_MODE = re.compile(r"0[0-7]{3,4}")


def _file_of(source: Any) -> Any:
    """`/etc/modprobe.d/nvidia.conf:3` -> the file; /proc/cmdline stays as it is."""
    if not isinstance(source, str):
        return None
    head, sep, line = source.rpartition(":")
    return head if sep and line.isdigit() else source


def _cdi_gid(ctx: dict[str, Any]) -> list[Fix]:
    spec, device, gid = ctx.get("cdi_spec"), ctx.get("cdi_device"), ctx.get("cdi_host_gid")
    fixes = [fix_line(f"Give the node its host group in the CDI spec ({device}), then re-create "
                      "the container.", "host", lambda: f"gid: {number(gid, 'group')}",
                      where=f"{spec}, the deviceNodes entry for {ctx.get('cdi_node_path')}"
                      if isinstance(spec, str) else "the CDI spec's deviceNodes entry")]
    if isinstance(device, str) and device.startswith("nvidia.com/"):
        fixes.append(fix_line("Or regenerate the spec with a toolkit that writes each node's gid "
                              "(NVIDIA/nvidia-container-toolkit#1631).", "host",
                              lambda: f"nvidia-ctk cdi generate --output={shell_path(spec, 'file')}"))
    path = ctx.get("node_path")
    fixes += [fix_line("Or pass the node itself: the runtime copies its host owner, group and "
                       "mode.", applies, lambda: f"{engine} run --device {shell_path(path)} ...")
              for engine, applies in (("podman", "podman-crun"), ("docker", "docker"))]
    return fixes


def _intended_mode(ctx: dict[str, Any]) -> str:
    mode = ctx.get("driver_mode_intended")
    if not isinstance(mode, str) or not OCTAL_MODE.fullmatch(mode):
        raise Unpastable("mode", "is not a known octal mode", "find the mode you meant")
    return mode


def _driver_mode(ctx: dict[str, Any]) -> list[Fix]:
    source = _file_of(ctx.get("driver_mode_source"))
    where = source if isinstance(source, str) and source.startswith("/") \
        and "cmdline" not in source else "/etc/modprobe.d/nvidia.conf"
    return [fix_line("Write the mode with its leading 0 (octal), then rebuild the initramfs and "
                     "reload the driver or reboot (update-initramfs -u on Debian/Ubuntu, dracut "
                     "-f on Fedora/Gentoo).", "host",
                     lambda: modprobe_options("nvidia", {"NVreg_DeviceFileMode": _intended_mode(ctx)}),
                     where=where),
            fix_line("Until then, give the node the mode you meant.", "host",
                     lambda: f"chmod {shell_word(_intended_mode(ctx), 'mode')} "
                     f"{shell_path(ctx.get('node_path'))}")]


def _toolkit_cgroups(ctx: dict[str, Any]) -> list[Fix]:
    config = ctx.get("toolkit_config")
    return [Fix("Let the NVIDIA hook write the device rules for rootful containers "
                "(no-cgroups = true is for rootless ones), then re-create the container.",
                "[nvidia-container-cli]\nno-cgroups = false", "host",
                where=config if isinstance(config, str) else
                "/etc/nvidia-container-runtime/config.toml"),
            Fix("Or give the container its GPU through CDI, where the runtime writes the rules.",
                "podman run --device nvidia.com/gpu=all ...", "podman-crun"),
            Fix("Or give the container its GPU through CDI, where the runtime writes the rules.",
                "docker run --device nvidia.com/gpu=all ...", "docker")]


STORY_FIXES: dict[str, Callable[[dict[str, Any]], list[Fix]]] = {
    "cdi_gid": _cdi_gid, "driver_mode": _driver_mode, "toolkit_cgroups": _toolkit_cgroups}


def story_fixes(ctx: dict[str, Any]) -> list[Fix]:
    """The fixes of the stories told for this denial, in the order they were told."""
    return [fix for key in ctx.get("stories") or [] if key in STORY_FIXES
            for fix in STORY_FIXES[key](ctx)]


# stories whose fix is the only right one: the reason's own fixes would change what is
# already right (a CDI spec's missing gid: the host node's group is fine, udev or
# --group-add cannot give the container's node its group)
EXCLUSIVE = ("cdi_gid",)


def exclusive_story(ctx: dict[str, Any]) -> bool:
    return any(key in EXCLUSIVE for key in ctx.get("stories") or [])
