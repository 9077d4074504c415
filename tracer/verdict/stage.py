"""The enrichment + verdict stages of the pipeline, shared by `watch` and the daemon."""

from __future__ import annotations

import errno
import threading
from typing import Callable, Optional

from tracer.enrichment.container_tracker import shared_tracker
from tracer.enrichment.start_follower import shared_follower
from tracer.enrichment.enricher import Enricher
from tracer.event import Event
from tracer.host import HostPaths
from tracer.verdict.explain import explain


def explain_stages(host: Optional[HostPaths] = None, cache_size: int = 256,
                   track_containers: bool = True
                   ) -> tuple[Callable[[Event], None], Callable[[Event], None]]:
    """(on_arrival, stage): snapshot a new container's facts the moment its first
    denial arrives (on the sensor thread), then enrich and explain (in order).
    Containers are learnt when they start (one tracker per host tree and process)."""
    host = host or HostPaths()
    tracker = shared_tracker(host) if track_containers else None
    starts = shared_follower(host).book if track_containers else None
    enricher = Enricher(host, cache_size=cache_size,
                        snapshots=tracker.store if tracker else None, starts=starts,
                        history=tracker.history if tracker else None)
    lock = threading.Lock()  # the enricher's caches are shared by both threads

    def on_arrival(event: Event) -> None:
        if enricher.needs_prime(event.process):
            with lock:
                enricher.prime(event.process)
        if event.errno == errno.ENOENT:  # explained by the /dev this process saw: read it now
            with lock:
                enricher.capture_mount_table(event.process)
        elif event.errno == errno.EPERM:  # its v1 devices cgroup may be removed soon after
            with lock:
                enricher.capture_v1_rules(event)

    def stage(event: Event) -> None:
        with lock:
            explain(event, enricher)
    return on_arrival, stage
