"""sensor -> enrichment -> verdict -> sinks, shared by `watch` and the daemon."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Protocol

from tracer.counts import CountDeltas
from tracer.discards import lost_events
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
        (unless resent by a later repeat), lost by audit (kernel, socket, parse),
        or dropped by the queue or the rate limit (tracer.discards)."""
        return lost_events(self.sensor_stats)

    def line(self) -> str:
        s = self.sensor_stats
        head = f"{self.denials} denial events, {self.repeats} repeats aggregated, {self.dropped} dropped"
        pipeline = (f"queue full {s.get('dropped_queue_full', 0)}; "
                    f"rate limited {s.get('dropped_rate_limited', 0)}")
        if "lost_by_kernel" in s:  # the audit sensor
            return (f"{head} (audit records lost by the kernel {s['lost_by_kernel']}, "
                    f"socket overflows {s.get('socket_overflows', 0)}, "
                    f"parse errors {s.get('parse_errors', 0)}, "
                    f"ioctl fd gone {s.get('dropped.ioctl_fd_unresolved', 0)}; {pipeline})")
        full = s.get("dropped_buffer_full", 0)
        lost = s.get("first_event_lost", 0)
        return (f"{head} (kernel buffer full {full}, of which {lost} reported "
                f"later as counts only; {pipeline}; "
                f"perf lost {s.get('dropped_perf_lost', 0)}; "
                f"count updates {s.get('dropped_update', 0)})" + _aliases(s))


def _aliases(s: dict[str, int]) -> str:
    """Refused opens outside the GPU prefixes matched by device number: how many
    were GPU nodes, how many of those only a gone container's snapshot could
    resolve, and how many could not be resolved at all (no process, no snapshot)."""
    if not s.get("candidates"):
        return ""
    via = s.get("candidates_gpu_via_snapshot", 0)
    return (f"; other paths matched by device {s.get('candidates_gpu', 0) + via} "
            f"(of which {via} through a gone container's snapshot), "
            f"unresolved {s.get('candidates_unresolved', 0)}")


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
        counts: CountDeltas[None] = CountDeltas()
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
            if not event.key:
                summary.total += event.count
            elif event.kind == "denial":
                summary.total += counts.start(event.key, event.count)
            else:  # an update whose denial was never seen still counts in full
                added = counts.advance(event.key, event.count)
                summary.total += counts.start(event.key, event.count) if added is None else added
            for sink in self.sinks:
                sink.consume(event)
