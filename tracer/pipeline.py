"""sensor -> enrichment -> verdict -> sinks, shared by `watch` and the daemon."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Protocol

from tracer.event import Event
from tracer.rate_limit import RateLimiter


class Sensor(Protocol):
    def start(self) -> None: ...
    def events(self, stop: threading.Event) -> Iterator[Event]: ...
    def stats(self) -> dict[str, int]: ...
    def close(self) -> None: ...


class Sink(Protocol):
    def consume(self, event: Event) -> None: ...


Stage = Callable[[Event], None]  # adds facts or a verdict to the event in place


@dataclass
class Summary:
    denials: int = 0          # distinct denial events (first occurrences)
    total: int = 0            # denials counted, repeats included (exact)
    stage_errors: int = 0
    sensor_stats: dict[str, int] = field(default_factory=dict)

    @property
    def repeats(self) -> int:
        return self.total - self.denials

    @property
    def dropped(self) -> int:
        """Events that never reached the sinks in full: refused by the kernel buffer
        (unless resent by a later repeat), or dropped by the queue or the rate limit."""
        s = self.sensor_stats
        return (s.get("dropped_buffer_full", 0) + s.get("dropped_queue_full", 0)
                + s.get("dropped_perf_lost", 0) + s.get("dropped_rate_limited", 0))

    def line(self) -> str:
        s = self.sensor_stats
        full = s.get("dropped_buffer_full", 0)
        lost = s.get("first_event_lost", 0)
        return (f"{self.denials} denial events, {self.repeats} repeats aggregated, "
                f"{self.dropped} dropped (kernel buffer full {full}, of which {lost} reported "
                f"later as counts only; queue full "
                f"{s.get('dropped_queue_full', 0)}; rate limited {s.get('dropped_rate_limited', 0)}; "
                f"perf lost {s.get('dropped_perf_lost', 0)}; "
                f"count updates {s.get('dropped_update', 0)})")


@dataclass
class Pipeline:
    """The sensor is drained on its own thread into a bounded queue, so a slow
    stage (enrichment reads /proc) never lets the kernel buffer overflow; what
    the queue cannot hold is counted as `dropped_queue_full`."""

    sensor: Sensor
    stages: list[Stage]
    sinks: list[Sink]
    on_stage_error: Callable[[Event, Exception], None] = lambda e, exc: None
    queue_size: int = 10000
    # runs on the sensor thread as each denial arrives, before any queueing delay:
    # the place to snapshot facts of a process that may exit in a moment
    on_arrival: Optional[Stage] = None
    # more event sources drained into the same queue (e.g. the node lifecycle watcher)
    side_sources: list[Sensor] = field(default_factory=list)
    # per-container limit on distinct denials (None: unlimited); drops are counted
    rate_limiter: Optional[RateLimiter] = None

    def run(self, stop: threading.Event) -> Summary:
        pending: "queue.Queue[Optional[Event]]" = queue.Queue(self.queue_size)
        dropped = {"dropped_queue_full": 0, "dropped_rate_limited": 0}
        self.dropped = dropped  # live view for scrapes while running
        failure: list[BaseException] = []

        def drain_sensor(source: Sensor) -> None:
            try:
                for event in source.events(stop):
                    if self.rate_limiter is not None and event.kind == "denial" \
                            and not self.rate_limiter.allow(event):
                        dropped["dropped_rate_limited"] += 1
                        continue
                    if self.on_arrival is not None and event.kind == "denial":
                        try:
                            self.on_arrival(event)
                        except Exception:  # a failed snapshot is retried by enrichment
                            dropped["arrival_errors"] = dropped.get("arrival_errors", 0) + 1
                    try:
                        pending.put_nowait(event)
                    except queue.Full:
                        dropped["dropped_queue_full"] += 1
            except BaseException as exc:  # re-raised on the consuming thread
                failure.append(exc)
            finally:
                pending.put(None)

        sources = [self.sensor, *self.side_sources]
        producers = [threading.Thread(target=drain_sensor, args=(s,), name="sensor", daemon=True)
                     for s in sources]
        for producer in producers:
            producer.start()
        summary = self._consume(pending, len(producers))
        for producer in producers:
            producer.join()
        if failure:
            raise failure[0]
        summary.sensor_stats = {k: v for s in sources for k, v in s.stats().items()}
        summary.sensor_stats.update(dropped)
        return summary

    def _consume(self, pending: "queue.Queue[Optional[Event]]", producers: int) -> Summary:
        summary = Summary()
        last_count: dict[str, int] = {}
        while True:
            event = pending.get()
            if event is None:
                producers -= 1
                if producers == 0:
                    return summary
                continue
            if event.kind == "denial":
                summary.denials += 1
                for stage in self.stages:
                    try:
                        stage(event)
                    except Exception as exc:  # one bad event must not stop the watch
                        summary.stage_errors += 1
                        self.on_stage_error(event, exc)
            if event.kind == "denial" or not event.key:
                summary.total += event.count
            else:
                summary.total += max(event.count - last_count.get(event.key, 0), 0)
            if event.key:
                last_count[event.key] = max(event.count, last_count.get(event.key, 0)
                                            if event.kind == "update" else 0)
                while len(last_count) > 65536:  # oldest keys first (dict keeps order)
                    del last_count[next(iter(last_count))]
            for sink in self.sinks:
                sink.consume(event)
