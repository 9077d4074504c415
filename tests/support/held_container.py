"""A rootful podman container (runc, cgroupfs) whose gtprobe opens a node and holds on
a few seconds, watched by a BPF sensor and a container tracker that share one store,
as tracer/assembly.py wires them; the denial is explained while the process lives."""

from __future__ import annotations

import subprocess
import time
from typing import Iterator, Sequence

import pytest

from tests.support import podman as podman_support
from tests.support.scenario_workspace import ROOTFUL_GLOBAL_OPTIONS, ROOTFUL_RUN_OPTIONS, Scenario
from tests.support.sensor_harness import SensorHarness
from tracer.enrichment.container_store import SnapshotStore
from tracer.enrichment.container_tracker import ContainerTracker
from tracer.enrichment.enricher import Enricher
from tracer.event import Event
from tracer.facts import Facts
from tracer.host import HostPaths
from tracer.sensors.bpf_sensor import BpfConfig, BpfSensor
from tracer.verdict.explain import explain_facts
from tracer.verdict.reasons import Verdict

HOLD_S = 4


class Tracked:
    def __init__(self, errnos: Sequence[int]) -> None:
        self.store = SnapshotStore()
        self.tracker = ContainerTracker(HostPaths(), self.store)
        self.harness = SensorHarness(sensor=BpfSensor(
            BpfConfig(errnos=tuple(errnos), aggregate_interval_s=0.5, sweep_interval_s=0.5),
            say=lambda msg: None, snapshots=self.store))

    def __enter__(self) -> "Tracked":
        self.tracker.start()
        self.harness.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.harness.close()
        self.tracker.close()

    def explain_held(self, scenario: Scenario, rootfs: str, options: Sequence[str],
                     command: Sequence[str], inside: str) -> tuple[Event, Facts, Verdict]:
        """`podman run --rm` of `command` (ending in gtprobe INSIDE HOLD TOKEN); the
        first denial of `inside` by gtprobe, explained while the process holds on."""
        engine = podman_support.Podman(runtime="runc", global_options=ROOTFUL_GLOBAL_OPTIONS)
        name = f"gttest-{scenario.name}-{scenario.token}"
        scenario.created("cgroup", f"gttest-{scenario.token}")
        scenario.created("rootful-container", name)
        started = time.time()
        run = subprocess.Popen(engine.argv("run", "--rm", "--name", name, "--network=none",
                                           f"--cgroup-parent=/gttest-{scenario.token}",
                                           *ROOTFUL_RUN_OPTIONS, *options, "--rootfs", rootfs,
                                           *command),
                               env=engine.env(), cwd="/", stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        try:
            events = self.harness.wait_for(
                lambda e: e.kind == "denial" and e.node.path == inside.encode()
                and e.process.comm == b"gtprobe" and e.time >= started - 0.05, timeout=30)
            event = events[0]
            facts = Enricher(HostPaths(), snapshots=self.store).enrich(event)
            verdict = explain_facts(event, facts)
        finally:
            out, err = run.communicate(timeout=60)
        assert f"token={scenario.token}" in out, err[-600:]
        assert facts.get("process.live") is True, "explained while gtprobe held on"
        print(inside, event.errno, verdict.reason, "|", verdict.summary, "|",
              [f.command for f in verdict.fixes[:2]])
        return event, facts, verdict


@pytest.fixture(scope="module")
def tracked_podman(request: pytest.FixtureRequest) -> Iterator[Tracked]:
    errnos = getattr(request.module, "WATCHED_ERRNOS")
    with Tracked(errnos) as tracked:
        yield tracked
