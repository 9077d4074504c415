"""A stale-major device rule on the real kernel (issue 18 item 3): rootful podman
with runc on this host's v1 device cgroup, `--device-cgroup-rule 'c OLD:* rwm'`
for a dynamic major /proc/devices gives to no driver, and the node bind-mounted
as /dev/nvidia-uvm with the number of a driver /proc/devices does list (a real
dynamic major of this VM, as nvidia-uvm's would be after a reload).  The kernel
refuses the open (EPERM); the verdict names the stale rule, the node's number
and its driver, and gives the same flag with the major /proc/devices has now."""

from __future__ import annotations

import errno
import os

import pytest

from tests.support import podman as podman_support
from tests.support.held_container import HOLD_S, Tracked, tracked_podman  # noqa: F401
from tests.support.probe import probe_binary
from tests.support.scenario_workspace import Scenario
from tracer.sensors.gpu_nodes import parse_proc_devices
from tracer.verdict.number_mismatch import dynamic_major

pytestmark = [pytest.mark.kernel, pytest.mark.podman]
WATCHED_ERRNOS = (errno.EACCES, errno.EPERM)
INSIDE = "/dev/nvidia-uvm"


def dynamic_majors() -> tuple[int, str, int]:
    """(a dynamic major a driver holds now, its name, a dynamic major none holds)."""
    with open("/proc/devices", encoding="ascii") as f:
        names = parse_proc_devices(f.read())
    held = sorted(m for m in names if dynamic_major(m))
    free = [m for m in list(range(234, 255)) + list(range(384, 512))
            if m not in names]
    if not held or not free:
        pytest.fail(f"/proc/devices has no dynamic major held and one free: {sorted(names)}")
    return held[-1], names[held[-1]], free[0]


def test_a_device_cgroup_rule_for_a_stale_major(tracked_podman: Tracked) -> None:
    major, driver, stale = dynamic_majors()
    with Scenario("h18b-stale-major") as scenario:
        node = scenario.node(major, range(200, 250), "gttest-h18b-uvm{minor}", 0o666, 0)
        rootfs = podman_support.build_rootfs(os.path.join(scenario.workdir, "rootfs"),
                                             probe_binary(), podman_support.RootfsFiles())
        event, facts, verdict = tracked_podman.explain_held(
            scenario, rootfs, [f"--device-cgroup-rule=c {stale}:* rwm", "-v",
                               f"{node.path}:{INSIDE}"],
            ["/gtprobe", INSIDE, str(HOLD_S), scenario.token], INSIDE)
    assert event.errno == errno.EPERM
    assert f"c {stale}:* rwm" in facts.get("device_cgroup.v1_rules")   # the rule in force
    assert str(major) in facts.get("host.char_majors")                  # /proc/devices now
    assert verdict.reason == "device_number_mismatch", verdict.summary
    assert verdict.summary.startswith(
        f"The device cgroup allows c {stale}:* rwm, but /proc/devices gives major {stale} "
        f"to no driver now, and {INSIDE} is c {major}:{node.minor} ({driver}), which no rule "
        "allows: the rule names a stale major"), verdict.summary
    assert verdict.fixes[0].command == f"podman run --device-cgroup-rule 'c {major}:* rwm' ..."
    assert f"instead of the stale {stale}" in verdict.fixes[0].summary
    assert verdict.fixes[0].applies_to == "podman-crun"  # podman's own flag, runc or crun
