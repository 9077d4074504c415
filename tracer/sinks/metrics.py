"""Prometheus metrics: what gputrace saw, and whether it saw everything.

Denials are counted per event here (exact: repeats arrive as count updates and
add their difference).  Kernel-side counters are not copied per event: a
custom collector reads `sensor.stats()` at scrape time.  Labels are bounded:
node class, errno name, verdict reason, container engine; never a pid, a path
or a container id.

Metric names (all prefixed ``gputrace_``) are listed in METRIC_NAMES; the
Grafana dashboard and alert rules in contrib/ use only these.
"""

from __future__ import annotations

import errno as errno_mod
import platform
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tracer import __version__
from tracer.counts import CountDeltas
from tracer.discards import OTHER_REASONS, PIPELINE_DISCARDS, SENSOR_DISCARDS, by_reason
from tracer.errors import EnvironmentProblem
from tracer.event import Event
from tracer.sensors.gpu_nodes import classify_node  # the one GPU-node model (no enrichment)

METRIC_NAMES = (
    "gputrace_denials_total",
    "gputrace_last_denial_timestamp_seconds",
    "gputrace_events_discarded_total",
    "gputrace_sensor_counter_total",
    "gputrace_probe_attached",
    "gputrace_subscribers",
    "gputrace_journal_lines_written_total",
    "gputrace_build_info",
    "gputrace_container_snapshots",
    "gputrace_container_snapshot_bytes",
    "gputrace_container_starts_held",
    "gputrace_container_tracker_total",
)
DENIAL_LABELS = ("node_class", "errno", "reason", "container_engine")
MAX_TRACKED_KEYS = 65536
# reasons counted by the daemon itself (DaemonState.discard), besides the pipeline's
USER_DISCARDS = {**{d.reason: d.intentional for d in PIPELINE_DISCARDS.values()}, **OTHER_REASONS}

def fact_value(event: Event, name: str) -> Any:
    return event.facts.get(name)


def node_class(event: Event) -> str:
    value = fact_value(event, "node.class")
    if isinstance(value, str) and value:
        return value
    path = event.node.path.decode("utf-8", "replace") if event.node.path else None
    return classify_node(path, event.node.major, event.node.minor, {})


def denial_labels(event: Event) -> tuple[str, str, str, str]:
    reason = (event.verdict or {}).get("reason") or "unknown"
    engine = fact_value(event, "container.engine") or "none"
    return node_class(event), event.errno_name, str(reason), str(engine)


@dataclass
class Probe:
    sensor: str
    hook: str
    transport: str
    attached: bool


@dataclass
class DaemonState:
    """What the collector reads at scrape time; the daemon keeps it current."""
    sensor_stats: Callable[[], dict[str, int]] = dict
    probes: Callable[[], list[Probe]] = list
    user_discards: dict[str, int] = field(default_factory=dict)   # USER_DISCARDS keys
    sensor_name: Callable[[], str] = lambda: "bpf"
    # the pipeline's own drops: queue_full (bounded queue overflowed), rate_limited (per cgroup)
    pipeline_discards: Callable[[], dict[str, int]] = dict
    subscribers: Callable[[], int] = lambda: 0
    journal_lines: Callable[[], int] = lambda: 0
    # the container snapshot store's counters (snapshots_held, snapshot_bytes are levels)
    containers: Callable[[], dict[str, int]] = dict

    def discard(self, reason: str, count: int = 1) -> None:
        if reason not in USER_DISCARDS:
            raise ValueError(f"unbounded discard reason {reason!r}")
        self.user_discards[reason] = self.user_discards.get(reason, 0) + count


class StateCollector:
    """Kernel and daemon counters, read when Prometheus scrapes."""

    def __init__(self, state: DaemonState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        stats = self.state.sensor_stats()
        discarded = CounterMetricFamily("gputrace_events_discarded", "Events not delivered, by "
                                        "reason; intentional=true for designed rate limiting.",
                                        labels=["reason", "intentional"])
        totals = by_reason(stats, SENSOR_DISCARDS)
        decode = sum(v for k, v in stats.items() if k.startswith("decode_error_"))
        user = dict(self.state.user_discards)
        user["decode_error"] = user.get("decode_error", 0) + decode
        for reason, count in self.state.pipeline_discards().items():
            user[reason] = user.get(reason, 0) + count
        for reason, intentional in USER_DISCARDS.items():
            totals[(reason, intentional)] = user.get(reason, 0)
        for (reason, intentional), value in sorted(totals.items()):
            discarded.add_metric([reason, str(intentional).lower()], value)
        yield discarded
        raw = CounterMetricFamily("gputrace_sensor_counter", "The sensor's own counters "
                                  "(kernel map values and userspace decode counts).",
                                  labels=["sensor", "counter"])
        sensor = self.state.sensor_name()
        for name, value in sorted(stats.items()):
            raw.add_metric([sensor, name], value)
        yield raw
        probes = GaugeMetricFamily("gputrace_probe_attached", "1 while the sensor's probe is "
                                   "attached.", labels=["sensor", "hook", "transport"])
        for probe in self.state.probes():
            probes.add_metric([probe.sensor, probe.hook or "none", probe.transport or "none"],
                              1 if probe.attached else 0)
        yield probes
        containers = {"snapshots_taken": 0, "snapshots_evicted": 0, "snapshots_expired": 0,
                      "containers_missed": 0, **self.state.containers()}
        levels = {"snapshots_held": "gputrace_container_snapshots",
                  "snapshot_bytes": "gputrace_container_snapshot_bytes",
                  "starts_held": "gputrace_container_starts_held"}
        for stat, metric in levels.items():
            yield GaugeMetricFamily(metric, f"Container snapshot store: {stat.replace('_', ' ')} "
                                    "(bounded by its capacity and byte limit).",
                                    value=containers.get(stat, 0))
        tracked = CounterMetricFamily("gputrace_container_tracker", "Containers learnt at "
                                      "start: snapshots taken, evicted, expired, missed, "
                                      "look-ups.", labels=["counter"])
        for name, value in sorted(containers.items()):
            if name not in levels:
                tracked.add_metric([name], value)
        yield tracked
        yield GaugeMetricFamily("gputrace_subscribers", "Clients attached to the event socket.",
                                value=self.state.subscribers())
        yield CounterMetricFamily("gputrace_journal_lines_written", "Lines written to the "
                                  "journal.", value=self.state.journal_lines())
        info = GaugeMetricFamily("gputrace_build_info", "Build information.",
                                 labels=["version", "python_version"])
        info.add_metric([__version__, platform.python_version()], 1)
        yield info


class MetricsSink:
    """Per-event metrics; with `listen`, serves them over HTTP."""

    def __init__(self, state: DaemonState, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.denials = Counter("gputrace_denials", "GPU node denials seen, repeats included.",
                               DENIAL_LABELS, registry=self.registry)
        self.last_denial = LastDenialCollector()
        self.registry.register(self.last_denial)
        self.registry.register(StateCollector(state))
        self._counts: CountDeltas[tuple[str, ...]] = CountDeltas(MAX_TRACKED_KEYS)
        self.server: Any = None
        self.thread: Any = None

    def consume(self, event: Event) -> None:
        labels: Optional[tuple[str, ...]]
        added: Optional[int]
        if event.kind == "denial":
            labels, added = denial_labels(event), event.count
            if event.key:
                self._counts.start(event.key, event.count, labels)
        else:
            labels = self._counts.payload(event.key)
            added = self._counts.advance(event.key, event.count)
        if labels is None or added is None:
            return  # an update whose first event was never seen (counted by the sensor)
        if added:
            self.denials.labels(*labels).inc(added)
            self.last_denial.value = max(self.last_denial.value or 0.0, event.time)

    def serve(self, listen: str, port: int) -> int:
        """Start the HTTP endpoint; returns the bound port (useful with port 0)."""
        try:
            self.server, self.thread = start_http_server(port, addr=listen, registry=self.registry)
        except OSError as exc:
            if exc.errno == errno_mod.EADDRINUSE:
                raise EnvironmentProblem(f"metrics port {listen}:{port} is already in use "
                                         "(set metrics.port in the configuration)") from None
            if isinstance(exc, socket.gaierror) or exc.errno == errno_mod.EADDRNOTAVAIL:
                raise EnvironmentProblem(f"metrics address {listen!r} is not usable here "
                                         "(set metrics.listen)") from None
            raise EnvironmentProblem(f"cannot serve metrics on {listen}:{port}: "
                                     f"{exc.strerror or exc}") from None
        return int(self.server.server_address[1])

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class LastDenialCollector:
    """The time of the newest denial; absent until there is one."""

    def __init__(self) -> None:
        self.value: Optional[float] = None

    def collect(self) -> Iterator[Metric]:
        if self.value is not None:
            yield GaugeMetricFamily("gputrace_last_denial_timestamp_seconds",
                                    "Unix time of the newest denial seen.", value=self.value)
