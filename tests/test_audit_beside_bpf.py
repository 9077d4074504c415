"""The audit sensor's answer beside the BPF sensor's, for processes already gone
(issue 19): what audit cannot capture (groups, capabilities, namespaces) is null,
and what gputrace infers instead is labelled and lowers the confidence.

* a child of a rootless podman container's init (`sh -c 'cat /dev/nvidia0; true'`):
  audit finds the container through the parent pid, and the dropped group through
  the user namespace the container's snapshot holds;
* a short-lived host process not in `render`: audit infers a host process from its
  live parent, and its groups from /etc/group (medium, labelled inferred).

The docker `-u` and bind-mount (no `--device`) cases are in test_exited_containers.py;
every case records a row for the closing note (RESULTS).
"""

from __future__ import annotations

import errno
import grp
import os
import subprocess
import time
from typing import Iterator

import pytest

from tests.support import podman as podman_support
from tests.support.probe import probe_binary
from tests.support.scenario_workspace import Scenario
from tests.support.sensor_harness import SensorHarness
from tests.test_exited_containers import record
from tracer.enrichment.container_store import SnapshotStore
from tracer.enrichment.container_tracker import ContainerTracker
from tracer.enrichment.enricher import Enricher
from tracer.event import Event
from tracer.facts import Facts
from tracer.host import HostPaths
from tracer.sensors.audit_pipeline import AuditConfig
from tracer.sensors.audit_sensor import AuditSensor
from tracer.verdict import reasons as R
from tracer.verdict.explain import explain_facts
from tracer.verdict.reasons import Verdict

pytestmark = [pytest.mark.kernel, pytest.mark.podman]


@pytest.fixture(scope="module")
def store() -> Iterator[SnapshotStore]:
    snapshots = SnapshotStore()
    tracker = ContainerTracker(HostPaths(), snapshots).start()
    yield snapshots
    tracker.close()


@pytest.fixture(scope="module")
def audit_sensor() -> Iterator[SensorHarness]:
    harness = SensorHarness(sensor=AuditSensor(AuditConfig(
        extra_prefixes=("/dev/dri-gttest/",)))).start()
    yield harness
    harness.close()


def both(bpf_sensor: SensorHarness, audit_sensor: SensorHarness, store: SnapshotStore,
         node_path: str, opened: str, comm: bytes, started: float,
         case: str) -> dict[str, tuple[Event, Facts, Verdict]]:
    """The one denial as each sensor saw it, explained once the process is gone."""
    out = {}
    for sensor, label in ((bpf_sensor, "bpf"), (audit_sensor, "audit")):
        event = sensor.wait_for(lambda e: e.kind == "denial" and e.time >= started - 0.05
                                and e.process.comm == comm
                                and e.node.path == opened.encode(), timeout=15)[0]
        facts = Enricher(HostPaths(), snapshots=store).enrich(event)
        verdict = explain_facts(event, facts)
        assert facts.get("process.live") is False, f"{label}: the process should be gone"
        record(case, label, facts, verdict)
        out[label] = (event, facts, verdict)
    assert node_path
    return out


def test_child_of_a_rootless_podman_init(bpf_sensor, audit_sensor, store) -> None:
    with Scenario("audit-child") as scenario:
        os.makedirs("/run/user", 0o755, exist_ok=True)
        video = grp.getgrnam("video")
        node = scenario.nvidia_node(0o660, video.gr_gid)
        user = scenario.user("pod", groups=["video"], home=True)
        engine = podman_support.Podman(runtime="runc", user=user)
        engine.prepare_user_runtime_dir()
        rootfs = podman_support.video_rootfs(
            scenario.workdir, probe_binary(), (user.pw_uid, user.pw_gid), video.gr_gid)
        name = f"gttest-child-{scenario.token}"
        scenario.undo(f"podman rm {name}", engine.remove, name)
        started = time.time()
        done = subprocess.run(engine.argv(
            "run", "--rm", "--name", name, "--network=none", "--device",
            f"{node.path}:/dev/nvidia0", "--group-add", "keep-groups", "--rootfs", rootfs,
            "sh", "-c", "cat /dev/nvidia0; true"), env=engine.env(), cwd="/",
            capture_output=True, text=True, timeout=60)
        assert "Permission denied" in done.stderr, done.stderr[-600:]
        seen = both(bpf_sensor, audit_sensor, store, node.path, "/dev/nvidia0", b"cat", started,
                    "rootless podman child (sh -c 'cat /dev/nvidia0')")
    event, facts, verdict = seen["audit"]
    assert event.process.groups is None and event.process.userns.inum is None  # null, not 0
    assert event.to_json()["process"]["groups"] is None
    assert facts.get("container.name") == name, facts.get("container.snapshot_key")
    assert facts.get("container.snapshot_key").startswith("parent pid")
    assert verdict.reason == R.GROUP_DROPPED_IN_USERNS, (verdict.to_json(), {
        n: facts.fact(n) for n in ("node.seen_from", "node.mode", "node.gid", "node.path",
                                   "container.snapshot_key", "process.groups",
                                   "process.groups_mapped_only", "userns.level")})
    assert verdict.confidence == "medium" and any("inferred" in n for n in verdict.notes)
    _event, _facts, by_bpf = seen["bpf"]
    assert by_bpf.reason == R.GROUP_DROPPED_IN_USERNS, by_bpf.to_json()


def test_short_lived_host_process_not_in_render(bpf_sensor, audit_sensor, store) -> None:
    with Scenario("audit-host") as scenario:
        render = scenario.group("render")
        node = scenario.render_node(0o660, render.gr_gid)
        user = scenario.user("host")  # its login groups: its own only
        started = time.time()
        done = subprocess.run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                               "--init-groups", probe_binary(), node.path, "0", scenario.token],
                              capture_output=True, text=True, timeout=30)
        assert f"errno={errno.EACCES}" in done.stdout, done.stdout + done.stderr
        seen = both(bpf_sensor, audit_sensor, store, node.path, node.path, b"gtprobe", started,
                    "short-lived host process, not in render")
    for label in ("bpf", "audit"):
        _event, facts, verdict = seen[label]
        assert verdict.reason == R.NOT_IN_GROUP, (label, verdict.notes, {
            n: facts.fact(n) for n in ("process.host_process", "userns.level", "process.groups",
                                       "process.cap_effective", "host.user_groups")})
        assert facts.get("host.user_name") == user.pw_name
        assert f"usermod -aG {render.gr_name} {user.pw_name}" in verdict.fixes[0].command
    _event, facts, verdict = seen["audit"]
    groups = facts.fact("process.groups")
    assert groups is not None and groups.source == "inferred" and "/etc/group" in groups.origin
    assert facts.fact("process.host_process") is not None
    assert "parent" in facts.fact("process.host_process").origin
    assert verdict.confidence == "medium" and any("inferred" in n for n in verdict.notes)
