"""The access ladder on real refusals: cgroup v2 device programs, a denial hidden
behind another (v1 and v2), seccomp, Landlock, and a rootful crun container on
cgroup v2.  The BPF sensor catches each refusal; the process is gone by the time
it is explained (as in the field) unless a test says why it must still be alive."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from typing import Any, Iterator

import pytest

from tests.conftest import SCENARIO_PREFIXES, URANDOM
from tests.support import actor, scenarios
from tests.support.unit_caps import Explainer, explainer_fixture
from tests.support.nodes import char195_nodes, device_cgroup
from tests.support.probe import ProbeFailed
from tests.support.v2_device_cgroup import deny_major, v2_device_cgroup
from tracer.enrichment.enricher import Enricher
from tracer.event import Event
from tracer.host import HostPaths
from tracer.verdict import reasons as R
from tracer.verdict.explain import explain
from tracer.verdict.reasons import Verdict

pytestmark = [pytest.mark.kernel]
SECURITYFS = "/sys/kernel/security"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def nvidia_node() -> Iterator[Any]:
    """A fresh /dev/nvidia-gttest<minor> (char 195) factory."""
    with char195_nodes("/dev/nvidia-gttest") as make:
        yield make


# each test taking `explainer` runs twice: as root in this process, and by `gputrace
# watch` under the systemd unit's capability bounding set (tests/support/unit_caps.py)
explainer = explainer_fixture(SCENARIO_PREFIXES, (f"{URANDOM[0]}:{URANDOM[1]}",))


def _in_process(event: Event) -> Verdict:
    """As the pipeline does it: prime on arrival (too late for a dead process), explain."""
    enricher = Enricher(HostPaths())
    enricher.prime(event.process)
    return explain(event, enricher)


def explained(explainer: Explainer, pid: int) -> tuple[Event, Verdict]:
    return explainer.explain(lambda e: e.process.pid == pid, _in_process)


def root_explained(bpf_sensor: Any, pid: int) -> tuple[Event, Verdict]:
    """In this process only: the test changes the host between the denial and it."""
    event = bpf_sensor.wait_for(lambda e: e.process.pid == pid and e.kind == "denial", timeout=15)[0]
    return event, _in_process(event)


def _has_cap_sys_resource() -> bool:
    with open("/proc/self/status", encoding="ascii") as status:
        cap_eff = next(line for line in status if line.startswith("CapEff:")).split()[1]
    return bool(int(cap_eff, 16) >> 24 & 1)


def layer(verdict: Verdict, name: str) -> dict[str, Any]:
    return next(step for step in verdict.ladder if step["layer"] == name)


def test_v2_device_program_refusal_names_the_program(explainer: Explainer, nvidia_node: Any) -> None:
    node = nvidia_node(0o666)
    with v2_device_cgroup(deny_major(195, "systemd")) as cgroup:
        result = actor.spawn({"cgroup_procs": [os.path.join(cgroup, "cgroup.procs")],
                              "actions": [{"op": "open", "path": node, "flags": "O_RDWR"}]}).check()
        assert result.errnos() == [errno.EPERM]
        event, verdict = explained(explainer, result.pid)  # the actor has exited
    # `watch` explains on arrival, maybe before the exit; in this process it is gone
    assert explainer.mode == "unit" or event.facts.get("process.live") is False
    assert verdict.reason == R.DEVICE_CGROUP and verdict.confidence == "high", verdict.to_json()
    v2 = layer(verdict, "device_cgroup_v2")
    assert v2["refuses"] is True and v2["program"]["name"] == "sd_devices"
    said = " ".join(verdict.notes)
    assert "sd_devices" in said and f"id {v2['program']['id']}" in said and v2["program"]["tag"] in said
    assert "Deciding instructions:" in said and "exit" in said


def test_not_in_group_then_v2_program_would_refuse(explainer: Explainer, nvidia_node: Any) -> None:
    node = nvidia_node(0o660, gid=42001)
    with v2_device_cgroup(deny_major(195, "runc")) as cgroup:
        result = actor.spawn({"uid": 41001, "gid": 41001, "groups": [],
                              "cgroup_procs": [os.path.join(cgroup, "cgroup.procs")],
                              "actions": [{"op": "open", "path": node, "flags": "O_RDWR"}]}).check()
        assert result.errnos() == [errno.EACCES]  # DAC refuses first; the program never ran
        _event, verdict = explained(explainer, result.pid)
    assert verdict.reason == R.NOT_IN_GROUP, verdict.to_json()
    [then] = verdict.then
    assert (then["layer"], then["errno"], then["reason"]) == ("device_cgroup_v2", "EPERM", R.DEVICE_CGROUP)
    assert any(n.startswith("Then the device cgroup (v2 BPF program) would refuse") for n in verdict.notes)
    assert then["fix"]["command"]


def test_not_in_group_then_v1_list_would_refuse(explainer: Explainer, nvidia_node: Any) -> None:
    """v1 is read through /proc/PID/cgroup, so this process is held until explained."""
    node = nvidia_node(0o660, gid=42001)
    rules = [("devices.deny", "a"), ("devices.allow", "c 1:* rwm"), ("devices.allow", "c 226:* rw")]
    with device_cgroup(rules) as cgroup:
        held = actor.start({"uid": 41001, "gid": 41001, "groups": [], "hold": True,
                            "cgroup_procs": [os.path.join(cgroup, "cgroup.procs")],
                            "actions": [{"op": "open", "path": node, "flags": "O_RDWR"}]})
        try:
            assert held.wait().check().errnos() == [errno.EACCES]
            _event, verdict = explained(explainer, held.pid)
        finally:
            held.release()
    assert verdict.reason == R.NOT_IN_GROUP, verdict.to_json()
    [then] = verdict.then
    assert (then["layer"], then["errno"]) == ("device_cgroup_v1", "EPERM")
    assert "no devices.list allow rule covers c 195:" in then["detail"]
    assert any("would refuse with EPERM" in n for n in verdict.notes)


def _restricted(mode: str, node: str, hold: bool) -> tuple[subprocess.Popen[str], int, int]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.restricted_open", mode, node,
                             *(["hold"] if hold else [])], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    pid, err = (int(x) for x in proc.stdout.readline().split())
    return proc, pid, err


def _exited_after(mode: str, expected: int, explainer: Explainer, node: str) -> Verdict:
    """Open `node` under the restriction, exit at once, then explain."""
    return _exited_event_after(mode, expected, explainer, node)[1]


def _exited_event_after(mode: str, expected: int, explainer: Explainer,
                        node: str) -> tuple[Event, Verdict]:
    proc, pid, err = _restricted(mode, node, hold=False)
    proc.wait(timeout=10)
    assert err == expected
    return explained(explainer, pid)


def test_seccomp_eperm_is_not_device_cgroup(explainer: Explainer, nvidia_node: Any) -> None:
    """The seccomp state is read from /proc/PID/status: held until explained."""
    node = nvidia_node(0o666)
    proc, pid, err = _restricted("seccomp", node, hold=True)
    try:
        assert err == errno.EPERM
        _event, verdict = explained(explainer, pid)
    finally:
        proc.communicate("x", timeout=10)
    assert verdict.reason == R.SECCOMP_DENIED, verdict.to_json()
    assert "seccomp" in verdict.summary
    assert layer(verdict, "device_cgroup_v2")["refuses"] is False


def test_seccomp_eperm_of_an_exited_process_is_seccomp_denied(explainer: Explainer,
                                                              nvidia_node: Any) -> None:
    """The sensor captures task->seccomp (mode, filter count) with the event, so the
    filter is known although /proc/PID/status is gone."""
    event, verdict = _exited_event_after("seccomp", errno.EPERM, explainer, nvidia_node(0o666))
    # `watch` explains on arrival, maybe before the exit; in this process it is gone
    assert explainer.mode == "unit" or event.facts.get("process.live") is False
    assert event.process.seccomp_mode == 2 and (event.process.seccomp_filters or 0) >= 1
    assert verdict.reason == R.SECCOMP_DENIED and verdict.confidence == "high", verdict.to_json()
    assert "seccomp" in verdict.summary
    facts = {e.fact: e for e in verdict.evidence}
    assert facts["process.seccomp"].value == 2 and facts["process.seccomp"].source == "kernel"
    assert layer(verdict, "device_cgroup_v2")["refuses"] is False


def test_v1_device_cgroup_eperm_without_a_filter_stays_device_cgroup(explainer: Explainer,
                                                                     nvidia_node: Any) -> None:
    """No seccomp filter (mode 0 captured by the kernel): the refusing v1 list is the cause.
    v1 is read through /proc/PID/cgroup, so this process is held until explained."""
    node = nvidia_node(0o666)
    rules = [("devices.deny", "a"), ("devices.allow", "c 1:* rwm")]
    with device_cgroup(rules) as cgroup:
        held = actor.start({"hold": True, "cgroup_procs": [os.path.join(cgroup, "cgroup.procs")],
                            "actions": [{"op": "open", "path": node, "flags": "O_RDWR"}]})
        try:
            assert held.wait().check().errnos() == [errno.EPERM]
            event, verdict = explained(explainer, held.pid)
        finally:
            held.release()
    assert event.process.seccomp_mode == 0 and event.process.seccomp_filters == 0
    assert verdict.reason == R.DEVICE_CGROUP and verdict.confidence == "high", verdict.to_json()
    assert layer(verdict, "device_cgroup_v1")["refuses"] is True


@pytest.fixture
def securityfs() -> Iterator[None]:
    mounted = os.path.exists(os.path.join(SECURITYFS, "lsm"))
    if not mounted:
        subprocess.run(["mount", "-t", "securityfs", "none", SECURITYFS], check=True)
    yield
    if not mounted:
        subprocess.run(["umount", SECURITYFS], check=True)


def test_landlock_sandbox_is_lsm_denied_naming_landlock(explainer: Explainer, nvidia_node: Any,
                                                        securityfs: None) -> None:
    verdict = _exited_after("landlock", errno.EACCES, explainer, nvidia_node(0o666))
    assert verdict.reason == R.LSM_DENIED, verdict.to_json()
    assert "Landlock" in verdict.summary
    assert "landlock" in {e.fact: e.value for e in verdict.evidence}["lsm.active"]


@pytest.mark.podman
def test_rootful_runc_on_cgroup_v2_bind_mount_is_device_cgroup(explainer: Explainer) -> None:
    """runc's own device program on a real v2 cgroup (private cgroup2 mount); the
    probe is held: the --rm cgroup and its program vanish with the container."""
    with scenarios.rootful_podman(via="bind", runtime="runc", private_cgroup2=True) as attempt:
        assert attempt.errno == errno.EPERM
        event, verdict = explained(explainer, attempt.host_pid)
    assert verdict.reason == R.DEVICE_CGROUP and verdict.confidence == "high", verdict.to_json()
    v2 = layer(verdict, "device_cgroup_v2")
    assert v2["refuses"] is True and v2["program"]["id"] > 0 and len(v2["program"]["tag"]) == 16
    assert f"program id {v2['program']['id']}" in " ".join(verdict.notes)
    assert any("--device" in f.command for f in verdict.fixes)


@pytest.mark.podman
def test_rootful_crun_on_cgroup_v2_bind_mount_is_device_cgroup(explainer: Explainer) -> None:
    """The container's device program vanishes with its --rm cgroup (the container
    tracker snapshots it at start); here the probe is held until explained.
    Named skip (README): crun 1.8 raises RLIMIT_MEMLOCK to infinity before it loads
    its device program, which root without CAP_SYS_RESOURCE (this CI VM) cannot."""
    try:
        with scenarios.rootful_podman(via="bind", runtime="crun", private_cgroup2=True) as attempt:
            assert attempt.errno == errno.EPERM
            event, verdict = explained(explainer, attempt.host_pid)
    except ProbeFailed as exc:
        if "RLIM_MEMLOCK" in str(exc) and not _has_cap_sys_resource():
            pytest.skip("crun cannot raise RLIMIT_MEMLOCK without CAP_SYS_RESOURCE (README: named skips)")
        raise
    assert verdict.reason == R.DEVICE_CGROUP and verdict.confidence == "high", verdict.to_json()
    v2 = layer(verdict, "device_cgroup_v2")
    assert v2["refuses"] is True and v2["program"]["id"] > 0 and len(v2["program"]["tag"]) == 16
    assert f"program id {v2['program']['id']}" in " ".join(verdict.notes)
    assert any("--device" in f.command for f in verdict.fixes)


def test_node_removed_after_a_refusal_is_not_node_missing(bpf_sensor: Any,
                                                          nvidia_node: Any) -> None:
    """EACCES proves the node existed when the kernel checked it; removed before the
    explanation, it is unknown with the node's metadata listed as missing."""
    node = nvidia_node(0o600)
    result = actor.spawn({"uid": 41001, "gid": 41001, "groups": [],
                          "actions": [{"op": "open", "path": node, "flags": "O_RDWR"}]}).check()
    assert result.errnos() == [errno.EACCES]
    os.unlink(node)
    event, verdict = root_explained(bpf_sensor, result.pid)
    assert event.facts.get("node.exists") is False
    assert verdict.reason == R.UNKNOWN, verdict.to_json()
    assert "existed when it was checked" in verdict.notes[0]
    assert any("node.mode" in n for n in verdict.notes)


def test_seccomp_eperm_on_a_node_removed_since_is_still_seccomp_denied(bpf_sensor: Any,
                                                                        nvidia_node: Any) -> None:
    """Process exited and node removed: the seccomp state captured with the event still
    shows the refusing layer (seccomp does not need the node's inode)."""
    node = nvidia_node(0o666)
    proc, pid, err = _restricted("seccomp", node, hold=False)
    proc.wait(timeout=10)
    assert err == errno.EPERM
    os.unlink(node)
    event, verdict = root_explained(bpf_sensor, pid)
    assert event.facts.get("node.exists") is False and event.facts.get("process.live") is False
    assert verdict.reason == R.SECCOMP_DENIED, verdict.to_json()
    assert "existed when it was checked" in verdict.notes[0]


def test_node_removed_after_a_refusal_named_from_the_node_watchers_reading(
        bpf_sensor: Any, nvidia_node: Any) -> None:
    """With the GPU node watcher running (as in `watch`), the mode and owner it read
    before the refusal still name the cause after the node is gone (confidence lowered,
    facts marked cached, origin the watcher); once it stops, nothing vouches for them."""
    import time

    from tracer.sensors.node_watch import NodeWatcher

    watcher = NodeWatcher(use_uevents=False)
    watcher.start()
    try:
        node = nvidia_node(0o600)

        def drain_until(change: str) -> None:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if any(e.node.path == node.encode() and e.facts.get("node.change") == change
                       for e in watcher.poll(0.1)):
                    return
            raise AssertionError(f"node watcher did not see {change}")
        drain_until("created")
        result = actor.spawn({"uid": 41001, "gid": 41001, "groups": [],
                              "actions": [{"op": "open", "path": node, "flags": "O_RDWR"}]}).check()
        assert result.errnos() == [errno.EACCES]
        os.unlink(node)
        drain_until("removed")
        event, verdict = root_explained(bpf_sensor, result.pid)
    finally:
        watcher.close()
    assert event.facts.get("node.exists") is False
    assert verdict.reason == R.MODE_RESTRICTIVE and verdict.confidence == "medium", verdict.to_json()
    mode = event.facts.fact("node.mode")
    assert mode is not None and mode.value == "0600" and mode.source == "cached"
    assert "GPU node watcher" in mode.origin
    assert any("node watcher read before the refusal" in n for n in verdict.notes)
    # stopped: the same reading no longer vouches
    again = Enricher(HostPaths())
    assert explain(event, again).reason == R.UNKNOWN
