"""Real-kernel situations in which a process is denied a GPU device node.

Each scenario is a context manager.  Entering it builds the host state (device node,
users, groups, cgroup, mount, container), runs gtprobe, which opens the node once and
then stays alive for `hold_s` seconds, and yields an `Attempt`: the errno the kernel
returned and the host pid of the process that did the open.  Leaving it releases the
probe and undoes every change, also after a failure.  Needs root.

    with scenarios.rootless_podman(runtime="runc") as attempt:
        assert attempt.errno == errno.EACCES
        read_status(attempt.host_pid)        # alive until the block ends or release()

Names and paths (sensor filters rely on them; all carry `gttest` or a `gt` prefix):
nodes /dev/nvidia-gttest<minor> (char 195), /dev/dri-gttest/renderD<minor> (char 226),
/tmp/gttest-nodev-<token>/nodev/nvidia-gttest<minor>; users and groups gt<role><token>;
containers gttest-<scenario>-<token>; cgroups gttest-<token>; work directories
/tmp/gttest-<scenario>-<token>, each with an `owner` file and a journal of what it
created, so `sweep_stale_scenarios()` can undo a run that was killed.

Building blocks live on `Scenario` (tests/support/scenario_workspace.py); gtprobe and
`Attempt` in tests/support/probe.py; the podman side in tests/support/podman.py.
"""

from __future__ import annotations

import contextlib
import grp
import os
from typing import Iterator

from tests.support import podman as podman_support
from tests.support.probe import Attempt, probe_binary
from tests.support.scenario_workspace import (CGROUP_ROOT, HOLD_S, NVIDIA_MAJOR,
                                              ROOTFUL_GLOBAL_OPTIONS, ROOTFUL_RUN_OPTIONS,
                                              Scenario, ScenarioError, run_command,
                                              sweep_stale_scenarios)

__all__ = ["Attempt", "ScenarioError", "sweep_stale_scenarios", "rootless_podman",
           "rootful_podman", "container_gid_mismatch", "device_cgroup_v1", "nodev_mount",
           "seat_acl"]


# --- the scenarios ------------------------------------------------------------------

@contextlib.contextmanager
def rootless_podman(runtime: str = "runc", keep_groups: bool = False, hold_s: float = HOLD_S,
                    node_group: str = "video", container_path: "str | None" = None,
                    private_cgroup2: "bool | None" = None) -> Iterator[Attempt]:
    """CAUSES #1.  Host node 0660 root:`node_group`; a fresh user in that group runs a
    rootless container with `--device`.  runc always drops the user's supplementary
    groups (EACCES, with or without keep-groups); crun keeps them with
    `--group-add keep-groups` (access granted: ENXIO, no driver) and drops them
    without it (EACCES).  crun runs inside a private pure-cgroup2 mount."""
    with Scenario(f"rootless-{runtime}") as scenario:
        if not os.path.isdir("/run/user"):  # made first, so it is removed after the user's
            os.mkdir("/run/user", 0o755)
            scenario.created("dir", "/run/user")
        group = grp.getgrnam(node_group)
        node = scenario.nvidia_node(0o660, group.gr_gid)
        user = scenario.user("pod", groups=[node_group], home=True)
        engine = podman_support.Podman(
            runtime=runtime, user=user,
            private_cgroup2=runtime == "crun" if private_cgroup2 is None else private_cgroup2)
        engine.prepare_user_runtime_dir()   # removed with the user
        rootfs = podman_support.build_rootfs(
            os.path.join(scenario.workdir, "rootfs"), probe_binary(),
            podman_support.RootfsFiles(
                passwd=("root:x:0:0:root:/:/bin/sh", "nobody:x:65534:65534:nobody:/:/bin/sh"),
                group=("root:x:0:", f"{node_group}:x:{group.gr_gid}:", "nogroup:x:65534:")),
            owner=(user.pw_uid, user.pw_gid))
        inside = container_path or node.path
        options = ["--device", f"{node.path}:{inside}"]
        if keep_groups:
            options += ["--group-add", "keep-groups"]
        attempt = scenario.run_in_container(engine, node, rootfs, inside, options, hold_s,
                                            user=user.pw_name)
        attempt.details.update(host_uid=user.pw_uid, node_group=node_group,
                               node_gid=group.gr_gid, keep_groups=keep_groups)
        yield attempt


@contextlib.contextmanager
def rootful_podman(via: str = "bind", runtime: str = "runc", hold_s: float = HOLD_S,
                   container_path: str = "/dev/nvidia0",
                   private_cgroup2: bool = False) -> Iterator[Attempt]:
    """CAUSES #6.  Rootful podman with the cgroupfs manager on this cgroup v1 host
    (or, with `private_cgroup2`, inside a private pure-cgroup2 mount, where the
    runtime attaches a BPF device program instead of writing devices.allow).
    via="bind": the node is only bind-mounted (`-v`), so the container's device cgroup
    has no rule for it: EPERM.  via="device": `--device` adds the rule: ENXIO."""
    if via not in ("bind", "device"):
        raise ValueError(f"via must be 'bind' or 'device', not {via!r}")
    with Scenario(f"rootful-{via}") as scenario:
        node = scenario.nvidia_node(0o666, 0)
        engine = podman_support.Podman(runtime=runtime, global_options=ROOTFUL_GLOBAL_OPTIONS,
                                       private_cgroup2=private_cgroup2)
        rootfs = podman_support.build_rootfs(os.path.join(scenario.workdir, "rootfs"),
                                             probe_binary(), podman_support.RootfsFiles())
        options = [*ROOTFUL_RUN_OPTIONS,
                   "-v" if via == "bind" else "--device", f"{node.path}:{container_path}"]
        if private_cgroup2 and runtime == "runc":  # the pids controller is v1's on this hybrid host
            options[:0] = ["--pids-limit=-1"]
        attempt = scenario.run_in_container(engine, node, rootfs, container_path, options,
                                            hold_s, user="root")
        attempt.details.update(via=via)
        yield attempt


@contextlib.contextmanager
def container_gid_mismatch(hold_s: float = HOLD_S, numeric_host_gid: bool = False,
                           runtime: str = "runc") -> Iterator[Attempt]:
    """CAUSES #3/#13.  Host render node 0660 root:gtrenderT (gid H).  The container's
    /etc/group lists the same group name with another gid C; a non-root container
    user joins it by name (`--group-add gtrenderT` resolves to C): EACCES.
    numeric_host_gid=True applies the fix, `--group-add H`: ENXIO."""
    with Scenario("gid-mismatch") as scenario:
        group = scenario.group("render")
        node = scenario.render_node(0o660, group.gr_gid)
        container_gid = 109 if group.gr_gid != 109 else 110
        rootfs = podman_support.build_rootfs(
            os.path.join(scenario.workdir, "rootfs"), probe_binary(),
            podman_support.RootfsFiles(
                passwd=("root:x:0:0:root:/:/bin/sh", "gtuser:x:1000:1000::/:/bin/sh"),
                group=("root:x:0:", "gtuser:x:1000:", f"{group.gr_name}:x:{container_gid}:gtuser")))
        engine = podman_support.Podman(runtime=runtime, global_options=ROOTFUL_GLOBAL_OPTIONS)
        inside = "/dev/dri/renderD128"
        options = [*ROOTFUL_RUN_OPTIONS, "--device", f"{node.path}:{inside}",
                   "--user", "gtuser",
                   "--group-add", str(group.gr_gid) if numeric_host_gid else group.gr_name]
        attempt = scenario.run_in_container(engine, node, rootfs, inside, options, hold_s,
                                            user="root")
        attempt.details.update(host_group=group.gr_name, host_gid=group.gr_gid,
                               container_gid=container_gid, container_user="gtuser")
        yield attempt


@contextlib.contextmanager
def device_cgroup_v1(hold_s: float = HOLD_S, rule: str = f"c {NVIDIA_MAJOR}:* rwm") -> Iterator[Attempt]:
    """CAUSES #5.  A root process in a v1 devices cgroup whose devices.deny has `rule`:
    EPERM, whatever the node's mode."""
    hierarchy = os.path.join(CGROUP_ROOT, "devices")
    if not os.path.exists(os.path.join(hierarchy, "devices.deny")):
        raise ScenarioError(f"no cgroup v1 devices controller at {hierarchy}")
    with Scenario("devcgroup") as scenario:
        node = scenario.nvidia_node(0o666, 0)
        cgroup = os.path.join(hierarchy, f"gttest-{scenario.token}")
        os.mkdir(cgroup)
        scenario.created("cgroup", os.path.basename(cgroup))
        with open(os.path.join(cgroup, "devices.deny"), "w", encoding="ascii") as deny:
            deny.write(rule)
        attempt = scenario.run_on_host(node, hold_s=hold_s,
                                       cgroup_procs=os.path.join(cgroup, "cgroup.procs"))
        attempt.details.update(cgroup=cgroup, rule=rule)
        yield attempt


@contextlib.contextmanager
def nodev_mount(hold_s: float = HOLD_S) -> Iterator[Attempt]:
    """CAUSES #20.  A node on a tmpfs mounted `nodev`, opened by root: EACCES."""
    with Scenario("nodev") as scenario:
        mountpoint = os.path.join(scenario.workdir, "nodev")
        scenario.mount("gttest-nodev", mountpoint, "tmpfs", "nodev,size=64k,mode=0755")
        node = scenario.nvidia_node(0o666, 0, directory=mountpoint)
        attempt = scenario.run_on_host(node, hold_s=hold_s)
        attempt.details.update(mountpoint=mountpoint)
        yield attempt


@contextlib.contextmanager
def seat_acl(opener: str = "ssh", acl: bool = True, hold_s: float = HOLD_S) -> Iterator[Attempt]:
    """CAUSES #12/#13, a Jetson-like host.  Render node 0660 root:gtrenderT with the
    logind-style ACL `user:gtseatT:rw-`.  opener="ssh": a user in neither the group
    nor the ACL: EACCES (with acl=False too: plain not-in-group).  opener="seat": the
    ACL's user: granted, ENXIO."""
    if opener not in ("ssh", "seat"):
        raise ValueError(f"opener must be 'ssh' or 'seat', not {opener!r}")
    with Scenario(f"seat-acl-{opener}") as scenario:
        group = scenario.group("render")
        seat = scenario.user("seat")
        ssh = scenario.user("ssh")
        node = scenario.render_node(0o660, group.gr_gid)
        if acl:
            run_command(["setfacl", "--modify", f"user:{seat.pw_name}:rw-", node.path])
        attempt = scenario.run_on_host(node, user=seat if opener == "seat" else ssh, hold_s=hold_s)
        attempt.details.update(render_group=group.gr_name, render_gid=group.gr_gid,
                               seat_user=seat.pw_name, ssh_user=ssh.pw_name, acl=acl)
        yield attempt
