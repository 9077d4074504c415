"""A GPU node under another name in a `--rm` container that is already gone
(real kernel, real rootful podman with runc).

`--device NODE:/dev/gpu0` or `-v NODE:/dev/gpu0`: the container opens /dev/gpu0,
a name no GPU prefix matches, so the kernel sends a candidate.  The process
exits at once and podman removes the container; the sensor is not polled until
`podman ps -a` no longer lists it, so no process of its mount namespace is left
to resolve the path in.  Only the container snapshot (the tracker's store,
shared with the sensor) says what /dev/gpu0 was: a `linux.devices` entry, or a
bind mount of the host node.  Without it there is no event at all."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from typing import Iterator

import pytest

from tests.support import podman as podman_support
from tests.support.probe import probe_binary
from tests.support.scenario_workspace import (ROOTFUL_GLOBAL_OPTIONS, ROOTFUL_RUN_OPTIONS,
                                              Scenario)
from tests.test_exited_containers import explained, podman_to_exit
from tracer.enrichment.container_store import SnapshotStore
from tracer.enrichment.container_tracker import ContainerTracker
from tracer.event import Event
from tracer.host import HostPaths
from tracer.sensors.bpf_sensor import BpfConfig, BpfSensor

pytestmark = [pytest.mark.kernel, pytest.mark.podman]
INSIDE = "/dev/gpu0"


@pytest.fixture(scope="module")
def tracked() -> Iterator[tuple[BpfSensor, SnapshotStore]]:
    """One tracker and one sensor sharing its store, as tracer/assembly.py wires them.
    The sensor is polled only by the tests, after the container is gone."""
    store = SnapshotStore()
    tracker = ContainerTracker(HostPaths(), store).start()
    sensor = BpfSensor(BpfConfig(aggregate_interval_s=0.5, sweep_interval_s=0.5),
                       say=lambda msg: None, snapshots=store)
    try:
        sensor.start()
        yield sensor, store
    finally:
        sensor.close()
        tracker.close()


def gone(engine: podman_support.Podman, name: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = subprocess.run(engine.argv("ps", "-a", "--format", "{{.Names}}"),
                                env=engine.env(), cwd="/", capture_output=True, text=True,
                                timeout=60)
        if listed.returncode == 0 and name not in listed.stdout.split():
            return
        time.sleep(0.2)
    raise AssertionError(f"container {name} still listed by podman ps -a")


def drain_denials(sensor: BpfSensor, started: float, seconds: float = 3.0) -> list[Event]:
    """Everything the sensor has buffered since the container ran, resolved now."""
    out: list[Event] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        out.extend(sensor.poll(100))
    out.extend(sensor.drain())
    return [e for e in out if e.kind == "denial" and e.time >= started - 0.05
            and e.process.comm == b"gtprobe"]


def run_gone(tracked, via: str, user: str) -> tuple[Event, dict[str, object], str]:
    sensor, store = tracked
    with Scenario(f"gone-alias-{via}") as scenario:
        group = scenario.group("video")
        node = scenario.nvidia_node(0o660, group.gr_gid)
        rootfs = podman_support.build_rootfs(
            os.path.join(scenario.workdir, "rootfs"), probe_binary(), podman_support.RootfsFiles(
                passwd=("root:x:0:0:root:/:/bin/sh", "gtuser:x:1000:1000::/:/bin/sh"),
                group=("root:x:0:", "gtuser:x:1000:")))
        engine = podman_support.Podman(runtime="runc", global_options=ROOTFUL_GLOBAL_OPTIONS)
        before = dict(sensor.stats())
        started = time.time()
        name = podman_to_exit(scenario, engine, rootfs,
                              [*ROOTFUL_RUN_OPTIONS, "--device" if via == "device" else "-v",
                               f"{node.path}:{INSIDE}", "--user", user], INSIDE)
        gone(engine, name)
        denials = drain_denials(sensor, started)
        after = sensor.stats()
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after
                 if k.startswith("candidates")}
        assert len(denials) == 1, ([(e.node.path, e.node.major, e.node.minor) for e in denials],
                                   delta, store.stats(), started,
                                   [(s.id[:8], s.created, s.died, s.keys(), s.pid) for s in store._items.values()])
        event = denials[0]
        assert event.node.path == INSIDE.encode()
        assert (event.node.major, event.node.minor) == (node.major, node.minor)
        # explained while the node and its group still exist (container and process gone)
        facts, verdict = explained(event, store)
    return event, {**delta, "reason": verdict.reason, "confidence": verdict.confidence,
                   "node.gid": facts.get("node.gid")}, name


def test_device_alias_of_a_gone_container_resolved_from_its_oci_devices(tracked):
    """`--device NODE:/dev/gpu0 --user 1000:1000`: the runtime made /dev/gpu0 with
    the node's mode and group, which the container user is not in: EACCES."""
    event, seen, name = run_gone(tracked, "device", "1000:1000")
    assert event.errno == errno.EACCES
    assert seen["candidates_gpu_via_snapshot"] == 1, seen
    assert seen.get("candidates_unresolved", 0) == 0, seen
    fact = event.facts.fact("sensor.node_identity")
    assert fact is not None and fact.source == "cached"
    assert fact.value["how"] == "linux.devices" and fact.value["name"] == name
    assert name in fact.origin and "snapshot" in fact.origin
    assert seen["reason"] == "not_in_group", seen


def test_bind_alias_of_a_gone_container_resolved_from_its_host_source(tracked):
    """`-v NODE:/dev/gpu0` (no --device): the device cgroup refuses it: EPERM.  The
    OCI config says /dev/gpu0 was a bind mount of NODE: stat'ed on the host."""
    event, seen, name = run_gone(tracked, "bind", "0:0")
    assert event.errno == errno.EPERM
    assert seen["candidates_gpu_via_snapshot"] == 1, seen
    fact = event.facts.fact("sensor.node_identity")
    assert fact is not None and fact.value["how"].startswith("bind mount of host /dev/nvidia-gttest")
    assert seen["reason"] == "device_cgroup", seen


def test_assembly_gives_the_sensor_the_trackers_one_store():
    """watch and the daemon build the pipeline through tracer/assembly.py: the BPF
    sensor's resolver and the enrichment must read the same store the tracker fills."""
    from tracer.assembly import start_sources
    from tracer.config import Config
    from tracer.enrichment.container_tracker import shared_tracker

    cfg = Config()
    cfg.sensor.kind, cfg.sensor.watch_nodes = "bpf", False
    host = HostPaths()
    sources = start_sources(cfg, host, lambda msg: None)
    try:
        sensor = sources.sensor
        assert isinstance(sensor, BpfSensor) and sensor.resolver is not None
        assert sensor.resolver.snapshots is shared_tracker(host).store
    finally:
        sources.close()
