"""The kernel's container-start signals, on the real kernel with runc itself.

- A runtime state root nobody listed (`runc --root DIR`) is found from runc's own
  command line, which the kernel reads as runc makes the container's cgroup: the
  container is snapshotted, and its denial is explained with its device rules.
- A start is never lost: with the tracker's thread held up until the container
  is gone (no state left to read), the denial still carries the container's id
  and name, from what the kernel captured at its start.
The container's cgroup is /gttest-<token>, not its id: the cgroup name alone
cannot name it."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from typing import Iterator

import pytest

from tests.support import podman as podman_support
from tests.support.probe import probe_binary
from tests.support.scenario_workspace import Scenario
from tests.support.followed_sensor import explained, followed_sensor
from tests.support.sensor_harness import SensorHarness
from tracer.enrichment.start_follower import StartFollower
from tracer.event import Event

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def followed() -> Iterator[tuple[SensorHarness, StartFollower]]:
    with followed_sensor() as both:
        yield both


@pytest.fixture(scope="module")
def sensor(followed) -> SensorHarness:
    return followed[0]


@pytest.fixture(scope="module")
def follower(followed) -> StartFollower:
    return followed[1]


def runc_container(scenario: Scenario, state_root: str, cid: str) -> tuple[str, float]:
    """`runc --root STATE run` of a busybox container whose only process opens a
    bind-mounted /dev/nvidia0 (EPERM: not in its device rules) and exits."""
    node = scenario.nvidia_node(0o666, 0)
    bundle = os.path.join(scenario.workdir, "bundle")
    rootfs = podman_support.build_rootfs(os.path.join(bundle, "rootfs"), probe_binary(),
                                         podman_support.RootfsFiles())
    subprocess.run(["runc", "spec", "--bundle", bundle], check=True)
    with open(os.path.join(bundle, "config.json"), encoding="utf-8") as f:
        spec = json.load(f)
    spec["process"].update(terminal=False, args=["/gtprobe", "/dev/nvidia0", "0", scenario.token])
    spec["root"] = {"path": rootfs, "readonly": False}
    spec["mounts"].append({"destination": "/dev/nvidia0", "type": "bind", "source": node.path,
                           "options": ["bind"]})
    spec["linux"]["cgroupsPath"] = f"/gttest-{scenario.token}"
    scenario.created("cgroup", f"gttest-{scenario.token}")
    with open(os.path.join(bundle, "config.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f)
    started = time.time()
    done = subprocess.run(["runc", "--root", state_root, "run", "--bundle", bundle, cid],
                          capture_output=True, text=True, timeout=60)
    assert "errno=1 " in done.stdout, done.stdout + done.stderr
    return node.path, started


def denial(sensor: SensorHarness, token_pid_comm: bytes, started: float) -> Event:
    return sensor.wait_for(lambda e: e.kind == "denial" and e.time >= started - 0.05
                           and e.process.comm == token_pid_comm
                           and e.node.path == b"/dev/nvidia0", timeout=15)[-1]


def test_a_state_root_nobody_listed_is_found_from_runcs_command_line(sensor, follower):
    with Scenario("start-root") as scenario:
        state_root = os.path.join(scenario.workdir, "runc-state")
        cid = f"gttest-start-{scenario.token}"
        _, started = runc_container(scenario, state_root, cid)
        event = denial(sensor, b"gtprobe", started)
        deadline = time.monotonic() + 10
        while follower.tracker.store.get(cid) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        facts, verdict = explained(event, follower)
    snap = follower.tracker.store.get(cid)
    assert snap is not None, follower.tracker.store.stats()
    assert (facts.get("container.id"), facts.get("container.name")) == (cid, cid)
    assert facts.get("container.runtime") == "runc"
    assert verdict.reason == "device_cgroup" and verdict.confidence == "high", (
        verdict.to_json(), facts.get("device_cgroup.v1_rules"), facts.get("container.snapshot_key"))
    assert follower.tracker.store.stats().get("tracker_roots_found", 0) >= 1


def test_a_start_is_never_lost_when_its_state_is_gone_before_it_is_read(sensor, follower):
    """The tracker's thread is held until the container is gone: nothing of its
    runtime state is ever read, yet its denial is attributed by the kernel's record."""
    release = threading.Event()
    follower.tracker.submit(lambda: release.wait(30))
    try:
        with Scenario("start-lost") as scenario:
            cid = f"gttest-lost-{scenario.token}"
            _, started = runc_container(scenario, os.path.join(scenario.workdir, "state"), cid)
            event = denial(sensor, b"gtprobe", started)
            facts, verdict = explained(event, follower)
            assert follower.tracker.store.get(cid) is None  # never read: the thread was held
    finally:
        release.set()
    assert facts.get("process.live") is False
    assert facts.get("container.id") == cid, {n: facts.get(n) for n in (
        "process.cgroup_leaf", "process.cgroup_id", "container.snapshot_key")}
    assert facts.fact("container.id").source == "kernel"
    assert "cgroup" in facts.fact("container.id").origin
    assert facts.get("container.name") == cid and facts.get("container.runtime") == "runc"
    assert facts.get("process.host_process") is False
    assert verdict.reason != "not_in_group" and not any("usermod" in f.command
                                                        for f in verdict.fixes)
