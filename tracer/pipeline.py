"""sensor -> enrichment -> verdict -> sinks, shared by `watch` and the daemon."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

from tracer.event import Event


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
        return sum(v for k, v in self.sensor_stats.items()
                   if k.startswith("dropped_") or k == "first_event_lost")

    def line(self) -> str:
        s = self.sensor_stats
        return (f"{self.denials} denial events, {self.repeats} repeats aggregated, "
                f"{self.dropped} dropped (buffer full {s.get('dropped_buffer_full', 0)}, "
                f"updates {s.get('dropped_update', 0)}, first events lost "
                f"{s.get('first_event_lost', 0)})")


@dataclass
class Pipeline:
    sensor: Sensor
    stages: list[Stage]
    sinks: list[Sink]
    on_stage_error: Callable[[Event, Exception], None] = lambda e, exc: None

    def run(self, stop: threading.Event) -> Summary:
        summary = Summary()
        last_count: dict[str, int] = {}
        for event in self.sensor.events(stop):
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
        summary.sensor_stats = self.sensor.stats()
        return summary
