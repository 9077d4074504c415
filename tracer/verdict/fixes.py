"""Fixes for each reason: exact commands, the runtime they apply to, and a
security note wherever a fix widens access.  Fixes for the runtime the process
ran under come first."""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

from tracer.verdict import reasons as R
from tracer.verdict.fix_lines import (apparmor_path, fix_line, modprobe_options, number,
                                      shell_path, shell_word, systemd_device_path, udev_value)
from tracer.verdict.fixes_over_time import FIXES_OVER_TIME
from tracer.verdict.fixes_driver_config import exclusive_story, story_fixes
from tracer.verdict.fixes_numbers import number_fixes, recreate_node
from tracer.verdict.reasons import Fix
from tracer.enrichment.systemd_unit import UNIT_NAME

WORLD_WRITABLE_NOTE = ("Every local user and every container that can see the node may then "
                       "use the GPU; this removes the group check that keeps them out.")
NVIDIA_CLASSES = ("nvidia-gpu", "nvidiactl", "nvidia-modeset", "nvidia-uvm", "nvidia-uvm-tools",
                  "nvidia-caps", "nvidia-nvswitch")


def _device_file_mode(ctx: dict[str, Any]) -> list[Fix]:
    if ctx["node_class"] not in NVIDIA_CLASSES:
        return []
    return [fix_line("Let the NVIDIA driver create its nodes world read/writable, then rebuild "
                     "the initramfs and reboot (update-initramfs -u on Debian/Ubuntu, dracut -f "
                     "on Fedora/Gentoo).", "host",
                     lambda: modprobe_options("nvidia", {"NVreg_DeviceFileMode": "0666"}),
                     where="/etc/modprobe.d/nvidia.conf", security_note=WORLD_WRITABLE_NOTE)]


def _group_dropped(ctx: dict[str, Any]) -> list[Fix]:
    g = ctx["gid"]
    fixes = [
        Fix("Run the container with crun and keep your host groups inside it.",
            "podman run --runtime crun --group-add keep-groups ...", "podman-crun"),
        Fix("Make keep-groups the default for every container you start with crun.",
            '[containers]\nannotations=["run.oci.keep_original_groups=1"]', "podman-crun",
            where="~/.config/containers/containers.conf"),
        Fix("Map your own uid and gid into the container; this helps when the node's group "
            f"({ctx['group']}, gid {g}) is your primary group.",
            "podman run --userns keep-id ...", "podman-runc"),
    ]
    if ctx.get("node_label"):
        fixes.append(Fix("On SELinux hosts also let containers use devices.",
                         "setsebool -P container_use_devices true", "host"))
    return fixes + _device_file_mode(ctx)


ROOT_GID = 0  # never a group to join for a GPU: it opens every root-group file too


def _usermod(ctx: dict[str, Any], summary: str) -> list[Fix]:
    """usermod only for a named host account: a host process's user or the owner of
    a rootless container's user namespace, never whoever has the same uid."""
    user = ctx.get("user_name")
    if not user or ctx.get("gid") == ROOT_GID or ctx.get("gid") in ctx.get("user_groups", ()):
        return []  # never offer the membership the user already has
    group = _known(ctx["group"])
    return [fix_line(summary, "host", lambda: f"usermod -aG {shell_word(group, 'group')} "
                     f"{shell_word(user, 'user')}")]


def _udev_group(ctx: dict[str, Any]) -> Fix:
    name = ctx["group"] if ctx.get("gid") != ROOT_GID and ctx["group"] not in ("root", "0") \
        else "render" if ctx.get("node_class") == "drm-render" else "video"
    return fix_line(f"Have udev give the node to group {name} with mode 0660.", "host",
                    lambda: f'KERNEL=={udev_value(_node_name(ctx))}, '
                    f'GROUP={udev_value(name, "group")}, MODE="0660"',
                    where="/etc/udev/rules.d/99-gpu-access.rules")


def _node_name(ctx: dict[str, Any]) -> Any:
    """The node's last path component (udev matches the kernel name), None unknown."""
    path = ctx.get("node_path")
    return path.rsplit("/", 1)[-1] if isinstance(path, str) else path


def _add_group(ctx: dict[str, Any]) -> list[Fix]:
    g, name = ctx["gid"], ctx["group"]
    if g == ROOT_GID:  # the node's group is root's: give the node a GPU group instead
        return [_udev_group(ctx)]
    fixes = _group_add(ctx, f"Give the container the host group {name} by its number.")
    return fixes + _usermod(ctx, f"Add the user to group {name}, then log in again.")


def _group_add(ctx: dict[str, Any], summary: str) -> list[Fix]:
    """--group-add for podman and docker, supplementalGroups for a pod: by number."""
    gid = ctx.get("gid")
    return [fix_line(summary, "podman-crun",
                     lambda: f"podman run --group-add {number(gid, 'group')} ..."),
            fix_line(summary, "docker", lambda: f"docker run --group-add {number(gid, 'group')} ..."),
            fix_line(f"Add gid {gid} to the pod's supplemental groups.", "kubernetes",
                     lambda: f"securityContext:\n  supplementalGroups: [{number(gid, 'group')}]")]


def _not_in_group(ctx: dict[str, Any]) -> list[Fix]:
    return _listed_member(ctx) + _add_group(ctx) + _device_file_mode(ctx)


def _listed_member(ctx: dict[str, Any]) -> list[Fix]:
    """The user is in the group in /etc/group; the process was started without it."""
    user, unit = ctx.get("user_name"), ctx.get("unit")
    if not ctx.get("member_listed") or not user:
        return []
    fixes = [fix_line("Start the program through a tool that gives the user its /etc/group "
                      "groups (runuser, su and sudo -u call initgroups; setpriv needs "
                      "--init-groups).", "host",
                      lambda: f"runuser -u {shell_word(user, 'user')} -- '<command>'")]
    if unit:
        fixes.insert(0, fix_line("Restart the service: systemd gives a unit's User= the user's "
                                 "/etc/group groups when it starts.", "host",
                                 lambda: f"systemctl restart {shell_word(unit, 'unit')}"))
    return fixes


def _seat_acl_only(ctx: dict[str, Any]) -> list[Fix]:
    name = ctx["group"]
    return _usermod(ctx, f"Add the user to group {name} so access no longer depends on the "
                    "local seat, then log in again.") + _add_group(ctx)[:3]


def _gid_mismatch(ctx: dict[str, Any]) -> list[Fix]:
    g, name, cg = ctx["gid"], ctx["group"], ctx.get("container_gid")
    return _group_add(ctx, f"Add the host's gid {g} by number, not the image's {name} ({cg}).") + [
        fix_line(f"Give the image's {name} group the host's gid.", "any",
                 lambda: f"RUN groupmod -g {number(g, 'group')} {shell_word(name, 'group')}",
                 where="Containerfile / Dockerfile")]


def _unit_drop_in(ctx: dict[str, Any], summary: str) -> list[Fix]:
    """A systemd unit's device sandboxing refused: the drop-in that allows the node
    (by its driver's current /proc/devices name, else its path), then the restart."""
    unit, name = ctx.get("unit"), ctx.get("allow_name")

    def drop_in() -> str:
        allow = f"char-{name}" if name else systemd_device_path(ctx.get("node_path"))
        private = "PrivateDevices=no\n" if ctx.get("unit_private") else ""
        return f"[Service]\n{private}DeviceAllow={allow} rw"
    where = (f"/etc/systemd/system/{unit}.d/gpu.conf" if isinstance(unit, str)
             and UNIT_NAME.fullmatch(unit) else "a drop-in of the unit (systemctl edit)")
    note = ("The service then sees every host device node; its device policy still limits "
            "which it may open.") if ctx.get("unit_private") else ""
    return [fix_line(summary, "host", drop_in, where=where, security_note=note),
            fix_line("Apply the drop-in.", "host", lambda: "systemctl daemon-reload && "
                     f"systemctl restart {shell_word(unit, 'unit')}")]


def _device_cgroup(ctx: dict[str, Any]) -> list[Fix]:
    if ctx.get("unit"):
        return _unit_drop_in(ctx, f"Allow the node in the unit's device policy "
                             f"({ctx.get('unit_prop')}= refused it).")
    return [*_pass_device(ctx, "Pass the node with --device so the runtime allows it in the "
                          "device cgroup."),
            Fix("Create the /dev/char symlinks the systemd cgroup driver needs to keep "
                "NVIDIA rules across daemon-reload.",
                "nvidia-ctk system create-dev-char-symlinks --create-all", "kubernetes"),
            _device_cgroup_host_fix(ctx)]


def _pass_device(ctx: dict[str, Any], summary: str) -> list[Fix]:
    path = ctx.get("node_path")
    return [fix_line(summary, "podman-crun", lambda: f"podman run --device {shell_path(path)} ..."),
            fix_line(summary, "docker", lambda: f"docker run --device {shell_path(path)} ...")]


def _device_cgroup_host_fix(ctx: dict[str, Any]) -> Fix:
    if ctx.get("device_layer") == "device_cgroup_v2":
        return fix_line("On cgroup v2 the policy is the BPF program the runtime or systemd "
                        "attached; have it allow the node (for a systemd unit: DeviceAllow=).",
                        "host", lambda: f"DeviceAllow={systemd_device_path(ctx.get('node_path'))} rw",
                        where="the unit's [Service] section")
    major = ctx.get("major")
    return fix_line("Stop-gap: allow the device in the cgroup now; any re-apply of the "
                    "container's rules (restart, systemctl daemon-reload, a resource update) "
                    "drops it again.", "host",
                    lambda: "echo " + shell_word(
                        f"c {'*' if major is None else number(major, 'major')}:* rwm", "rule")
                    # the placeholder is quoted: unquoted, <cgroup> is a redirection
                    + " > '/sys/fs/cgroup/devices/<cgroup>/devices.allow'")


def _nodev(ctx: dict[str, Any]) -> list[Fix]:
    mount = ctx.get("mount")
    return [*_pass_device(ctx, "Pass the node with --device instead of a bind mount of a nodev "
                          "filesystem."),
            fix_line("Remount the filesystem holding the node without nodev.", "host",
                     lambda: f"mount -o remount,dev {shell_path(_known(mount), 'mount point')}",
                     security_note="Device nodes on that filesystem become usable; only do "
                     "this where untrusted users cannot create nodes.")]


def _known(value: Any) -> Any:
    """The catalog writes '?' for a fact it does not know: no line names it."""
    return None if value == "?" else value


def _lsm(ctx: dict[str, Any]) -> list[Fix]:
    if "Landlock" in str(ctx.get("lsm", "")):
        return [fix_line("Landlock is set by the program itself (landlock_restrict_self): add "
                         "the node to the sandbox's allowed paths with read/write file access.",
                         "any", lambda: "LANDLOCK_ACCESS_FS_READ_FILE|LANDLOCK_ACCESS_FS_WRITE_FILE"
                         f" on {shell_path(ctx.get('node_path'))}",
                         where="the sandboxing program's ruleset"),
                Fix("See Landlock's own record of the denial (kernel 6.15+ with audit).",
                    "ausearch -m 1423 -ts recent", "host")]
    fixes = [Fix("Find the security module's denial record.", "ausearch -m avc,apparmor -ts recent",
                 "host")]
    label = ctx.get("lsm_label") or ""
    if ctx.get("node_label") or ":" in label:
        fixes += [Fix("Let SELinux-confined containers use devices.",
                      "setsebool -P container_use_devices true", "host"),
                  fix_line("Restore the node's default SELinux label.", "host",
                           lambda: f"restorecon -v {shell_path(ctx.get('node_path'))}"),
                  Fix("Run the container without SELinux separation.",
                      "podman run --security-opt label=disable ...", "podman-crun",
                      security_note="The container is no longer confined by SELinux.")]
    else:
        fixes.append(fix_line("Allow the node in the AppArmor profile (include "
                              "nvidia-uvm-tools).", "host",
                              lambda: f"{apparmor_path(ctx.get('node_path'))} rw,",
                              where="/etc/apparmor.d/local/<profile>"))
    return fixes


def _mode_restrictive(ctx: dict[str, Any]) -> list[Fix]:
    fixes = [_udev_group(ctx)]
    if ctx["node_class"] in NVIDIA_CLASSES:
        # <gid> is left for the user to choose: a placeholder, not a value from the event
        fixes.append(Fix("Have the NVIDIA driver create its nodes for a group, then rebuild "
                         "the initramfs and reboot.",
                         "options nvidia NVreg_DeviceFileGID=<gid> NVreg_DeviceFileMode=0660",
                         "host", where="/etc/modprobe.d/nvidia.conf"))
    return fixes


def _capability(ctx: dict[str, Any]) -> list[Fix]:
    if ctx.get("cap_held"):
        return [Fix("Root in a rootless container has no power over host-owned nodes; give "
                    "access through the node's group instead.",
                    "podman run --runtime crun --group-add keep-groups ...", "podman-crun"),
                fix_line("Run the container rootful so its root maps to host root.",
                         "podman-runc",
                         lambda: f"sudo podman run --device {shell_path(ctx.get('node_path'))} ...",
                         security_note="A rootful container's root is host root.")]
    return [Fix("Keep CAP_DAC_OVERRIDE in the container.",
                "podman run --cap-add DAC_OVERRIDE ...", "podman-crun",
                security_note="Lets the container's root ignore file permissions."),
            Fix("Keep CAP_DAC_OVERRIDE in the container.",
                "docker run --cap-add DAC_OVERRIDE ...", "docker",
                security_note="Lets the container's root ignore file permissions.")]


MODPROBE_ARGS = {"nvidia-uvm": "-u -c=0", "nvidia-uvm-tools": "-u -c=0", "nvidia-modeset": "-m",
                 "nvidiactl": "-c=0"}
BOOT_UNIT = ("[Unit]\nDescription=Load NVIDIA modules and create their device nodes\n"
             "[Service]\nType=oneshot\nExecStart=/usr/bin/nvidia-modprobe {args}\n"
             "[Install]\nWantedBy=multi-user.target")
GPU_INDEX = re.compile(r"/dev/nvidia(\d{1,4})")


def _modprobe_args(ctx: dict[str, Any]) -> Optional[str]:
    """nvidia-modprobe's options for the node's class (digits only, never a name)."""
    if ctx["node_class"] != "nvidia-gpu":
        return MODPROBE_ARGS.get(ctx["node_class"])
    minor, path = ctx.get("minor"), ctx.get("node_path")
    index = GPU_INDEX.fullmatch(path) if isinstance(path, str) else None
    if isinstance(minor, int) and not isinstance(minor, bool) and 0 <= minor < 254:
        return f"-c={minor}"  # /dev/nvidiaN is minor N
    return f"-c={int(index.group(1))}" if index else "-c=0"


def _node_missing(ctx: dict[str, Any]) -> list[Fix]:
    """The host lacks the node: create it there (never when the host has it)."""
    fixes: list[Fix] = []
    args = _modprobe_args(ctx) if ctx.get("on_host") is not True else None
    if args is not None:
        blockers = ctx.get("modprobe_blockers") or []
        now = Fix("Load the module and create the node as root now.", f"nvidia-modprobe {args}",
                  "host")
        boot = Fix("Create the nodes at every boot as root, so processes that cannot run the "
                   "setuid helper (no_new_privs, user namespaces) find them.",
                   BOOT_UNIT.format(args=args), "host",
                   where="/etc/systemd/system/nvidia-nodes.service (then systemctl enable "
                   "nvidia-nodes)")
        if any(b in blockers for b in ("no_new_privs", "user_namespace", "nosuid")):
            fixes += [boot, now]  # the helper can never run for this process: make them first
        else:
            if ctx.get("modprobe_installed") is False:
                fixes.append(Fix("Install nvidia-modprobe (the driver's setuid helper that CUDA "
                                 "runs to create the nodes).", "apt-get install nvidia-modprobe",
                                 "host"))
            fixes += [now, boot]
        if "not_setuid_root" in blockers and ctx.get("modprobe_path"):
            fixes.append(fix_line("Restore the setuid bit the driver package installs.", "host",
                                  lambda: f"chmod 4755 {shell_path(ctx.get('modprobe_path'), 'file')}",
                                  security_note="A setuid root helper runs with root's power "
                                  "for every local user."))
    if ctx.get("on_host") is not False or not fixes:
        fixes += _pass_into_container(ctx)
    return fixes


def _pass_into_container(ctx: dict[str, Any]) -> list[Fix]:
    return _pass_device(ctx, "Pass the node into the container.") + [
        Fix("Pass the GPU into the container with CDI (a spec generated for the driver in use).",
            "podman run --device nvidia.com/gpu=all ...", "podman-crun")]


def _node_not_in_private_dev(ctx: dict[str, Any]) -> list[Fix]:
    """The host has the node; the process's /dev does not: give it the node."""
    if ctx.get("unit"):
        return _unit_drop_in(ctx, "Give the service the host's /dev and allow the node in its "
                             "device policy (PrivateDevices=yes hides it).")
    if ctx.get("story") == "sandbox":
        return [Fix("Give the sandbox the host's device nodes (Flatpak: --device=all; "
                    "bubblewrap: --dev-bind for the node).",
                    "flatpak override --device=all '<app-id>'", "any",
                    security_note="The sandbox can then open every device node the user can.")]
    return _pass_into_container(ctx)


def _device_number_mismatch(ctx: dict[str, Any]) -> list[Fix]:
    """The device-cgroup fixes for the node's number now (ranked_fixes puts the fix in
    the form the user used first: fixes_numbers.number_fixes)."""
    return _device_cgroup(ctx)


def _no_driver_for_node(ctx: dict[str, Any]) -> list[Fix]:
    fixes: list[Fix] = []
    if ctx.get("number_form") == "host" and ctx.get("stale_node") is not False:
        fixes += recreate_node(ctx, _modprobe_args(ctx) if ctx["node_class"] in NVIDIA_CLASSES
                               else None)
    elif ctx.get("stale_node") is False and ctx["node_class"] in NVIDIA_CLASSES:
        fixes.append(Fix("See which GPUs the driver has (a GPU that fell off the bus is in the "
                         "kernel log: NVRM lines of dmesg).", "ls /proc/driver/nvidia/gpus/",
                         "host"))
    return fixes + [Fix("See which drivers hold which majors now.", "cat /proc/devices", "any")]


def _unique(fixes: list[Fix]) -> list[Fix]:
    seen: set[tuple[str, str]] = set()
    out = []
    for fix in fixes:
        if (fix.command, fix.applies_to) not in seen:
            seen.add((fix.command, fix.applies_to))
            out.append(fix)
    return out


def _seccomp(ctx: dict[str, Any]) -> list[Fix]:
    return [Fix("Find the seccomp filter's refusal (SECCOMP records need audit).",
                "ausearch -m seccomp -ts recent", "host"),
            Fix("Allow open/openat/ioctl in the container's seccomp profile.",
                "docker run --security-opt 'seccomp=<profile.json>' ...", "docker"),
            Fix("Allow open/openat/ioctl in the container's seccomp profile.",
                "podman run --security-opt 'seccomp=<profile.json>' ...", "podman-crun"),
            Fix("Let the service's system call filter allow opening files.",
                "SystemCallFilter=@file-system @io-event ioctl", "host",
                where="the unit's [Service] section")]


def _unknown(ctx: dict[str, Any]) -> list[Fix]:
    return [Fix("Look for a security module's record of the denial.",
                "ausearch -m avc,apparmor -ts recent", "host")]


FIXES: dict[str, Callable[[dict[str, Any]], list[Fix]]] = {
    R.GROUP_DROPPED_IN_USERNS: _group_dropped, R.NOT_IN_GROUP: _not_in_group,
    R.SEAT_ACL_ONLY: _seat_acl_only, R.GID_MISMATCH_IN_CONTAINER: _gid_mismatch,
    R.DEVICE_CGROUP: _device_cgroup, R.NODEV_MOUNT: _nodev, R.LSM_DENIED: _lsm,
    R.MODE_RESTRICTIVE: _mode_restrictive, R.CAPABILITY_REQUIRED: _capability,
    R.NODE_MISSING: _node_missing, R.SECCOMP_DENIED: _seccomp, R.UNKNOWN: _unknown,
    R.NODE_NOT_IN_PRIVATE_DEV: _node_not_in_private_dev,
    **FIXES_OVER_TIME,
    R.DEVICE_NUMBER_MISMATCH: _device_number_mismatch, R.NO_DRIVER_FOR_NODE: _no_driver_for_node,
}


RELATED = {"podman-runc": ("podman-runc", "podman-crun"), "podman-crun": ("podman-crun",)}
HOST_WIDE = ("host", "any")


# reasons whose fixes are already in the order that matters (what survives a re-apply
# first, the stop-gap last): only filtered by runtime, never reordered
STORY_ORDER = frozenset(FIXES_OVER_TIME)
NUMBER_REASONS = (R.DEVICE_NUMBER_MISMATCH, R.NO_DRIVER_FOR_NODE)


def _for_runtime(fixes: list[Fix], runtime: str) -> list[Fix]:
    if runtime == "host":
        return [f for f in fixes if f.applies_to in HOST_WIDE]
    if runtime == "any":
        return fixes
    mine = RELATED.get(runtime, (runtime,))
    return [f for f in fixes if f.applies_to in mine or f.applies_to in HOST_WIDE]


def ranked_fixes(reason: str, ctx: dict[str, Any]) -> list[Fix]:
    """Only fixes that apply to the process's own runtime: a host process gets
    host fixes; a container of a known engine gets that engine's fixes, then the
    host-wide ones (driver, udev, device cgroup).  When the engine is unknown
    every engine's fix is offered, the process's runtime being unknown.  Fixes of
    the configuration a story showed at fault (a CDI spec, driver parameters, the
    form the device rules were given in) come first, in their own order."""
    lead = story_fixes(ctx) + (number_fixes(ctx) if reason in NUMBER_REASONS else [])
    fixes = [] if exclusive_story(ctx) else FIXES[reason](ctx)
    runtime = ctx.get("runtime", "any")
    if runtime == "host":
        ranked = [f for f in fixes if f.applies_to in HOST_WIDE]
    elif reason in STORY_ORDER:  # already in the order that matters: only filtered
        ranked = _for_runtime(fixes, runtime)
    elif runtime == "any":
        ranked = sorted(fixes, key=lambda f: 1 if f.applies_to in HOST_WIDE else 0)
    else:
        mine = RELATED.get(runtime, (runtime,))
        kept = [f for f in fixes if f.applies_to in mine or f.applies_to in HOST_WIDE]
        ranked = sorted(kept, key=lambda f: 0 if f.applies_to in mine else 1)
    return _unique(_for_runtime(lead, runtime) + ranked)
