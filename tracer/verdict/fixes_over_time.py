"""Fixes for the causes told over time (causes_over_time.py).

The rule for all of them: a fix must survive what took the access away, and
never repeat what the user already did.  A device grant is made to survive a
re-apply by putting it in the container's spec (--device, CDI), by letting
systemd express it (/dev/char links) or by a cgroup manager that does not
re-apply (cgroupfs); a devices.allow write is a stop-gap and says so.  A
session older than its group needs a new session, not `usermod`; a group the
entrypoint dropped needs the entrypoint fixed, not another `--group-add`.
"""

from __future__ import annotations

from typing import Any, Callable

from tracer.verdict import reasons as R
from tracer.verdict.fix_lines import fix_line, number, shell_path, shell_word, udev_value
from tracer.verdict.reasons import Fix

DEV_CHAR_UDEV = ('ACTION=="add", DEVPATH=="/bus/pci/drivers/nvidia", '
                 'RUN+="/usr/bin/nvidia-ctk system create-dev-char-symlinks --create-all"')
STOP_GAP = ("Stop-gap: allow it again now; the next re-apply (daemon-reload, a resource "
            "update, a restart) drops it again.")


def _nvidia(ctx: dict[str, Any]) -> bool:
    return str(ctx.get("node_class", "")).startswith("nvidia")


def _device_in_spec(ctx: dict[str, Any]) -> list[Fix]:
    path = ctx.get("node_path")
    why = "Pass the node in the container's spec, so every re-apply keeps its rule."
    fixes = [fix_line(why, "docker", lambda: f"docker run --device {shell_path(path)} ..."),
             fix_line(why, "podman-crun", lambda: f"podman run --device {shell_path(path)} ...")]
    if _nvidia(ctx):
        fixes.insert(0, Fix("Request the GPU through CDI instead of the legacy hook, so the "
                            "runtime writes its device rules into the spec "
                            "(nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml first).",
                            "docker run --device nvidia.com/gpu=all ...", "docker"))
        fixes.insert(1, Fix("Request the GPU through CDI, so the runtime writes its device "
                            "rules into the spec (nvidia-ctk cdi generate "
                            "--output=/etc/cdi/nvidia.yaml first).",
                            "podman run --device nvidia.com/gpu=all ...", "podman-crun"))
    return fixes


def _keep_across_reapply(ctx: dict[str, Any]) -> list[Fix]:
    """The systemd driver: its re-apply keeps a rule only through /dev/char; or leave it."""
    fixes = []
    if ctx.get("manager") == "systemd" and ctx.get("dev_char_missing") and _nvidia(ctx):
        fixes.append(Fix("Create the /dev/char links systemd needs to keep NVIDIA device rules "
                         "across daemon-reload, and a udev rule that makes them at boot.",
                         "nvidia-ctk system create-dev-char-symlinks --create-all", "any"))
        fixes.append(Fix("Make the /dev/char links at every driver load.", DEV_CHAR_UDEV, "any",
                         where="/lib/udev/rules.d/71-nvidia-dev-char.rules"))
    if ctx.get("manager") == "systemd":
        fixes.append(Fix("Let the engine manage cgroups itself (cgroupfs driver): systemd then "
                         "never re-applies the container's device rules.",
                         '{"exec-opts": ["native.cgroupdriver=cgroupfs"]}', "docker",
                         where="/etc/docker/daemon.json (then restart docker)"))
        fixes.append(Fix("Use the cgroupfs driver in kubelet, and SystemdCgroup = false in "
                         "containerd's runc options (the two must match).",
                         "cgroupDriver: cgroupfs", "kubernetes",
                         where="the kubelet configuration"))
    return fixes


def _stop_gap(ctx: dict[str, Any]) -> list[Fix]:
    cgroup, rule = ctx.get("cgroup_v1"), ctx.get("allow_rule")
    if ctx.get("device_layer") != "device_cgroup_v1" or not cgroup:
        return []
    return [fix_line(STOP_GAP, "host", lambda: f"echo {shell_word(rule, 'rule')} > "
                     + shell_path(f"/sys/fs/cgroup/devices{cgroup}/devices.allow", "cgroup"))]


def _revoked(ctx: dict[str, Any]) -> list[Fix]:
    if ctx.get("story") == "config_not_kept":  # already in the spec: only what keeps it helps
        return _keep_across_reapply(ctx) + _stop_gap(ctx)
    return _device_in_spec(ctx) + _keep_across_reapply(ctx) + _stop_gap(ctx)


def _new_session(ctx: dict[str, Any]) -> list[Fix]:
    group, user, unit = ctx.get("group"), ctx.get("user_name"), ctx.get("unit")
    fixes = []
    if unit and unit.startswith("user@"):
        fixes.append(fix_line("The process runs under your systemd user manager, which started "
                              "before the group was added: end it and log in again.", "host",
                              lambda: f"loginctl terminate-user {shell_word(user, 'user')}"))
    elif unit:
        fixes.append(fix_line("Restart the service: its processes get the groups of a new "
                              "start.", "host", lambda: f"systemctl restart {shell_word(unit, 'unit')}"))
    fixes += [
        fix_line("Start a shell in this session that has the group (only that shell gets it).",
                 "host", lambda: f"newgrp {shell_word(group, 'group')}"),
        fix_line("Run one command with the group, from this session.", "host",
                 lambda: f"sg {shell_word(group, 'group')} -c '<command>'"),
        fix_line("Log out and in again (every session of the user, including the user manager).",
                 "host", lambda: f"loginctl terminate-user {shell_word(user, 'user')}",
                 security_note="Ends every process of the user's sessions.")]
    return fixes


def _dropped_group(ctx: dict[str, Any]) -> list[Fix]:
    gid, user, dropper = ctx.get("gid"), ctx.get("container_user"), str(ctx.get("dropper") or "")
    primary = ctx.get("container_user_gid")

    def who() -> str:  # a placeholder is quoted: unquoted, <user> is a redirection
        return shell_word(user, "user") if user else "'<user>'"
    image_group = fix_line(f"List the user in a group with gid {gid} in the image's /etc/group, "
                           "so an entrypoint that sets groups from it (gosu user, su-exec, "
                           "initgroups) keeps it.", "any",
                           lambda: f"RUN addgroup -g {number(gid, 'group')} gpu && "
                           f"addgroup {who()} gpu",
                           where="Containerfile / Dockerfile (groupadd -g and usermod -aG on "
                           "images without busybox)")
    gosu = fix_line("Call gosu (or su-exec) with the user alone, not user:group: it then keeps "
                    "the groups the image's /etc/group gives the user.", "any",
                    lambda: f"exec gosu {who()} '<command>'", where="the entrypoint script")
    setpriv = fix_line("Switch user without touching the groups the runtime gave.", "any",
                       lambda: f"exec setpriv --reuid={who()} --regid="
                       + (number(primary, "gid") if primary is not None else "'<gid>'")
                       + " --keep-groups '<command>'", where="the entrypoint script")
    if dropper in ("gosu", "su-exec"):
        return [gosu, image_group, setpriv]
    return [setpriv, image_group, gosu]


def _name(path: Any) -> Any:
    return path.rsplit("/", 1)[-1] if isinstance(path, str) else path


def _acl_mask(ctx: dict[str, Any]) -> list[Fix]:
    path = ctx.get("node_path")
    return [fix_line("Widen the ACL mask so the ACL's entries get read and write.", "host",
                     lambda: f"setfacl -m m::rw {shell_path(path)}",
                     security_note="Every named ACL entry then gets the access it lists."),
            fix_line("Keep it after the node is re-created: udev sets the group bits, which are "
                     "the ACL mask.", "host",
                     lambda: f'KERNEL=={udev_value(_name(path))}, MODE="0660"',
                     where="/etc/udev/rules.d/99-gpu-access.rules")]


FIXES_OVER_TIME: dict[str, Callable[[dict[str, Any]], list[Fix]]] = {
    R.DEVICE_CGROUP_REVOKED: _revoked, R.SESSION_PREDATES_GROUP: _new_session,
    R.GROUP_DROPPED_BY_PROCESS: _dropped_group, R.ACL_MASK_WITHHOLDS: _acl_mask,
}
