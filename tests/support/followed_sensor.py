"""A BPF sensor whose container-start signals go to a tracker that lists no extra
state roots: all a container start teaches comes from the kernel's signal."""

from __future__ import annotations

import contextlib
from typing import Iterator

from tests.support.sensor_harness import SensorHarness
from tracer.enrichment.container_store import SnapshotStore
from tracer.enrichment.container_tracker import ContainerTracker
from tracer.enrichment.enricher import Enricher
from tracer.enrichment.start_follower import StartFollower
from tracer.event import Event
from tracer.facts import Facts
from tracer.host import HostPaths
from tracer.sensors.bpf_sensor import BpfConfig, BpfSensor
from tracer.verdict.explain import explain_facts
from tracer.verdict.reasons import Verdict


@contextlib.contextmanager
def followed_sensor() -> Iterator[tuple[SensorHarness, StartFollower]]:
    tracker = ContainerTracker(HostPaths(), SnapshotStore()).start()
    follower = StartFollower(HostPaths(), tracker)
    harness = SensorHarness(sensor=BpfSensor(BpfConfig(aggregate_interval_s=0.5,
                                                       sweep_interval_s=0.5),
                                             say=lambda msg: None,
                                             on_container_start=follower.on_start))
    try:
        harness.start()
        yield harness, follower
    finally:
        harness.close()
        tracker.close()


def explained(event: Event, follower: StartFollower) -> tuple[Facts, Verdict]:
    """Enriched with the tracker's snapshots and the kernel's start records, explained."""
    facts = Enricher(HostPaths(), snapshots=follower.tracker.store,
                     starts=follower.book).enrich(event)
    return facts, explain_facts(event, facts)
