"""The denial scenarios against the real kernel, podman, runc and crun (as root).

Each test asserts the errno the kernel really returned to gtprobe, that the reported
host pid is that process (read from /proc while it holds), and that the scenario left
nothing behind.  These are the ground truth the sensor and verdict tests build on."""

from __future__ import annotations

import errno
import json
import os
import pwd
import signal
import subprocess
import sys
import time

import pytest

from tests.support import scenarios
from tests.support.probe import Attempt

pytestmark = pytest.mark.kernel
SCENARIO_BUDGET_S = 20.0


@pytest.fixture(scope="module", autouse=True)
def no_stale_scenarios() -> None:
    """Start from a clean host even if an earlier run was killed mid-scenario."""
    scenarios.sweep_stale_scenarios()


def status_field(pid: int, name: str) -> list[str]:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(name + ":"):
                return line.split()[1:]
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def supplementary_groups(pid: int) -> set[int]:
    """Host gids of the process's supplementary groups (we read from the initial userns)."""
    return {int(g) for g in status_field(pid, "Groups")}


def in_own_user_namespace(pid: int) -> bool:
    return os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")


def assert_is_probe(attempt: Attempt) -> None:
    """host_pid is the live process that opened the node, seen from the host."""
    assert attempt.alive()
    with open(f"/proc/{attempt.host_pid}/comm", encoding="ascii") as comm:
        assert comm.read().strip() == "gtprobe"
    assert int(status_field(attempt.host_pid, "NSpid")[-1]) == attempt.report.pid


def assert_container_probe(attempt: Attempt) -> None:
    assert_is_probe(attempt)
    assert attempt.report.pid == 1                      # the container's first process
    assert len(status_field(attempt.host_pid, "NSpid")) == 2
    assert attempt.engine is not None                   # podman as the scenario ran it
    running = attempt.engine.run("ps", "--format", "{{.Names}} {{.ID}}").split("\n")
    assert f"{attempt.container_name} {(attempt.container_id or '')[:12]}" in running


def assert_cleaned(attempt: Attempt) -> None:
    assert not os.path.exists(attempt.node_path)
    assert not attempt.alive()
    assert not any(name.endswith(attempt.token) for name in os.listdir("/tmp"))
    with open("/proc/self/mountinfo", encoding="utf-8") as mounts:
        assert attempt.token not in mounts.read()
    users = [entry.pw_name for entry in pwd.getpwall()]
    assert not any(name.endswith(attempt.token) for name in users)
    with open("/etc/group", encoding="utf-8") as groups:
        assert attempt.token not in groups.read()
    if attempt.container_name and not attempt.rootless:
        listing = subprocess.run(["podman", "ps", "--all", "--format", "{{.Names}}"],
                                 capture_output=True, text=True, check=True).stdout
        assert attempt.container_name not in listing.split()


def probe_gone(pid: int, token: str, timeout_s: float) -> bool:
    """Whether pid stops being the probe with `token` (exits, or becomes a zombie) in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if token.encode() not in cmdline.read().split(b"\0"):
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def timed(started: float, attempt: Attempt) -> None:
    total = time.monotonic() - started
    print(f"{attempt.scenario}: setup {attempt.setup_s:.2f}s, total {total:.2f}s")
    assert total < SCENARIO_BUDGET_S


@pytest.mark.podman
@pytest.mark.parametrize("keep_groups", [False, True], ids=["plain", "keep-groups"])
def test_rootless_runc_drops_the_video_group(keep_groups: bool) -> None:
    started = time.monotonic()
    with scenarios.rootless_podman(runtime="runc", keep_groups=keep_groups) as attempt:
        assert attempt.errno == errno.EACCES
        assert_container_probe(attempt)
        host_user = pwd.getpwnam(attempt.user or "")
        assert status_field(attempt.host_pid, "Uid")[0] == str(host_user.pw_uid)
        assert in_own_user_namespace(attempt.host_pid)
        assert attempt.details["node_gid"] not in supplementary_groups(attempt.host_pid)
        assert attempt.report.groups == ()
    assert_cleaned(attempt)
    assert not os.path.exists(f"/run/user/{host_user.pw_uid}")
    timed(started, attempt)


@pytest.mark.podman
def test_rootless_crun_keep_groups_is_granted() -> None:
    started = time.monotonic()
    with scenarios.rootless_podman(runtime="crun", keep_groups=True) as attempt:
        assert attempt.errno == errno.ENXIO               # permission granted, no driver
        assert_container_probe(attempt)
        assert in_own_user_namespace(attempt.host_pid)
        assert attempt.details["node_gid"] in supplementary_groups(attempt.host_pid)
        assert 65534 in attempt.report.groups             # video is unmapped inside
    assert_cleaned(attempt)
    timed(started, attempt)


@pytest.mark.podman
def test_rootless_crun_without_keep_groups_is_denied() -> None:
    with scenarios.rootless_podman(runtime="crun", keep_groups=False) as attempt:
        assert attempt.errno == errno.EACCES
        assert_container_probe(attempt)
        assert attempt.details["node_gid"] not in supplementary_groups(attempt.host_pid)
    assert_cleaned(attempt)


@pytest.mark.podman
def test_rootful_bind_mount_without_device_hits_the_device_cgroup() -> None:
    started = time.monotonic()
    with scenarios.rootful_podman(via="bind") as attempt:
        assert attempt.errno == errno.EPERM
        assert_container_probe(attempt)
        assert attempt.opened_path == "/dev/nvidia0"
        with open(f"/proc/{attempt.host_pid}/cgroup", encoding="ascii") as cgroup:
            assert f"devices:/gttest-{attempt.token}/libpod-{attempt.container_id}" in cgroup.read()
        assert not in_own_user_namespace(attempt.host_pid)
    assert_cleaned(attempt)
    assert not os.path.exists(f"/sys/fs/cgroup/devices/gttest-{attempt.token}")
    timed(started, attempt)


@pytest.mark.podman
def test_rootful_with_device_is_granted() -> None:
    with scenarios.rootful_podman(via="device") as attempt:
        assert attempt.errno == errno.ENXIO
        assert_container_probe(attempt)
    assert_cleaned(attempt)


def test_device_cgroup_v1_deny_rule() -> None:
    started = time.monotonic()
    with scenarios.device_cgroup_v1() as attempt:
        assert attempt.errno == errno.EPERM
        assert_is_probe(attempt)
        cgroup = str(attempt.details["cgroup"])
        with open(f"/proc/{attempt.host_pid}/cgroup", encoding="ascii") as membership:
            assert f"devices:/{os.path.basename(cgroup)}\n" in membership.read()
        with open(os.path.join(cgroup, "devices.list"), encoding="ascii") as rules:
            assert "c 195:* rwm" not in rules.read()     # the deny rule removed it
    assert not os.path.exists(cgroup)
    assert_cleaned(attempt)
    timed(started, attempt)


def test_nodev_mount() -> None:
    started = time.monotonic()
    with scenarios.nodev_mount() as attempt:
        assert attempt.errno == errno.EACCES
        assert_is_probe(attempt)
        assert status_field(attempt.host_pid, "Uid")[0] == "0"
        with open(f"/proc/{attempt.host_pid}/mountinfo", encoding="utf-8") as mounts:
            line = next(m for m in mounts if f" {attempt.details['mountpoint']} " in m)
        assert "nodev" in line.split()[5].split(",")
    assert_cleaned(attempt)
    timed(started, attempt)


@pytest.mark.podman
@pytest.mark.parametrize("fixed, expected", [(False, errno.EACCES), (True, errno.ENXIO)],
                         ids=["group-by-name", "numeric-host-gid"])
def test_container_render_gid_mismatch(fixed: bool, expected: int) -> None:
    started = time.monotonic()
    with scenarios.container_gid_mismatch(numeric_host_gid=fixed) as attempt:
        assert attempt.errno == expected
        assert_container_probe(attempt)
        groups = supplementary_groups(attempt.host_pid)
        assert attempt.details["container_gid"] in groups
        assert (attempt.details["host_gid"] in groups) is fixed
        assert os.stat(attempt.node_path).st_gid == attempt.details["host_gid"]
        assert status_field(attempt.host_pid, "Uid")[0] == "1000"
    assert_cleaned(attempt)
    timed(started, attempt)


@pytest.mark.parametrize("opener, acl, expected", [
    ("ssh", True, errno.EACCES), ("seat", True, errno.ENXIO), ("ssh", False, errno.EACCES)],
    ids=["ssh-user", "seat-user", "ssh-user-no-acl"])
def test_seat_acl_on_render_node(opener: str, acl: bool, expected: int) -> None:
    started = time.monotonic()
    with scenarios.seat_acl(opener=opener, acl=acl) as attempt:
        assert attempt.errno == expected
        assert_is_probe(attempt)
        assert attempt.user == attempt.details[f"{opener}_user"]
        assert attempt.details["render_gid"] not in supplementary_groups(attempt.host_pid)
        facl = subprocess.run(["getfacl", "--omit-header", "--numeric", attempt.node_path],
                              capture_output=True, text=True, check=True).stdout
        seat_uid = pwd.getpwnam(str(attempt.details["seat_user"])).pw_uid
        assert (f"user:{seat_uid}:rw-" in facl) is acl
    assert_cleaned(attempt)
    timed(started, attempt)


def test_probe_holds_for_the_hold_time_then_exits() -> None:
    with scenarios.nodev_mount(hold_s=2) as attempt:
        time.sleep(1.0)
        assert attempt.alive()
        time.sleep(2.0)
        assert not attempt.alive()


def test_release_ends_the_hold_early() -> None:
    with scenarios.rootful_podman(via="device", hold_s=60) as attempt:
        released = time.monotonic()
        attempt.release()
        assert not attempt.alive()
        assert time.monotonic() - released < 10
    assert_cleaned(attempt)


def test_failure_inside_the_block_still_cleans_up() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with scenarios.seat_acl() as attempt:
            raise RuntimeError("boom")
    assert_cleaned(attempt)


def test_failed_container_start_cleans_up() -> None:
    """podman refuses an unknown runtime: the scenario raises and leaves nothing."""
    def ours() -> set[str]:
        return ({name for name in os.listdir("/dev") if name.startswith("nvidia-gttest")}
                | {name for name in os.listdir("/tmp") if name.startswith("gttest-rootful-")})
    before = ours()
    with pytest.raises(RuntimeError, match="no-such-runtime"):
        with scenarios.rootful_podman(runtime="no-such-runtime"):
            pass
    assert ours() - before == set()


CRASHING_TEST = """
import json, sys, time
from tests.support import scenarios
with scenarios.{call} as attempt:
    print(json.dumps(dict(token=attempt.token, pid=attempt.host_pid, node=attempt.node_path,
                          user=attempt.user, container=attempt.container_name)), flush=True)
    time.sleep(60)
"""


@pytest.mark.podman
@pytest.mark.parametrize("call", ["rootless_podman(runtime='crun', hold_s=60)",
                                  "seat_acl(hold_s=60)", "device_cgroup_v1(hold_s=60)"])
def test_sweep_undoes_a_scenario_whose_test_process_was_killed(call: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", CRASHING_TEST.format(call=call)],
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        facts = json.loads(child.stdout.readline())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    workdir = next(os.path.join("/tmp", name) for name in os.listdir("/tmp")
                   if name.startswith("gttest-") and name.endswith(facts["token"]))
    assert os.path.exists(facts["node"]) and os.path.exists(f"/proc/{facts['pid']}")

    assert workdir in scenarios.sweep_stale_scenarios()

    assert not os.path.exists(workdir)
    assert not os.path.exists(facts["node"])
    assert probe_gone(facts["pid"], facts["token"], timeout_s=5), "the probe outlived the sweep"
    assert not any(entry.pw_name.endswith(facts["token"]) for entry in pwd.getpwall())
    with open("/etc/group", encoding="utf-8") as groups:
        assert facts["token"] not in groups.read()
    assert not [name for name in os.listdir("/tmp") if name.startswith("gttest-probe-")
                and owner_pid(os.path.join("/tmp", name)) == child.pid]


def owner_pid(directory: str) -> "int | None":
    try:
        with open(os.path.join(directory, "owner"), encoding="ascii") as owner:
            return int(owner.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def test_sweep_leaves_live_scenarios_alone() -> None:
    with scenarios.nodev_mount() as attempt:
        assert not any(path.endswith(attempt.token) for path in scenarios.sweep_stale_scenarios())
        assert attempt.alive() and os.path.exists(attempt.node_path)
    assert_cleaned(attempt)
