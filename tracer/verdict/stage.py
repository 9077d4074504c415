"""The enrichment + verdict stages of the pipeline, shared by `watch` and the daemon."""

from __future__ import annotations

import threading
from typing import Callable, Optional

from tracer.enrichment.enricher import Enricher
from tracer.event import Event
from tracer.host import HostPaths
from tracer.verdict.explain import explain


def explain_stages(host: Optional[HostPaths] = None, cache_size: int = 256
                   ) -> tuple[Callable[[Event], None], Callable[[Event], None]]:
    """(on_arrival, stage): snapshot a new container's facts the moment its first
    denial arrives (on the sensor thread), then enrich and explain (in order)."""
    enricher = Enricher(host or HostPaths(), cache_size=cache_size)
    lock = threading.Lock()  # the enricher's caches are shared by both threads

    def on_arrival(event: Event) -> None:
        if enricher.needs_prime(event.process):
            with lock:
                enricher.prime(event.process)

    def stage(event: Event) -> None:
        with lock:
            explain(event, enricher)
    return on_arrival, stage
