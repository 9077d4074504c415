"""Metrics from recorded events: exact counts with repeats, bounded labels, the
scrape-time collector of sensor counters, and the HTTP endpoint itself."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.sample_events import denial, update
from tracer.errors import EnvironmentProblem
from tracer.facts import Facts
from tracer.sinks.metrics import METRIC_NAMES, DaemonState, MetricsSink, Probe


def samples(sink: MetricsSink) -> dict[tuple[str, tuple], float]:
    from prometheus_client import generate_latest
    out = {}
    for family in text_string_to_metric_families(generate_latest(sink.registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def labels(node_class="nvidia-gpu", errno="EACCES", reason="not_in_group", engine="none"):
    return (("container_engine", engine), ("errno", errno), ("node_class", node_class),
            ("reason", reason))


def test_denials_count_repeats_exactly_by_labels():
    sink = MetricsSink(DaemonState())
    a = denial(1, at=100.0)
    b = denial(2, reason=None, engine="podman", errno=1, at=101.0)
    c = denial(3, path="/dev/nvidia-gttest-x", minor=255, at=102.0)
    c.facts = Facts()  # no enrichment: the class comes from the device number
    for event in (a, b, update(a, 4, 103.0), update(a, 3, 103.5), update(a, 9, 104.0), c,
                  update(b, 2, 105.0)):
        sink.consume(event)
    got = samples(sink)
    assert got[("gputrace_denials_total", labels())] == 9
    assert got[("gputrace_denials_total", labels(errno="EPERM", reason="unknown", engine="podman"))] == 2
    assert got[("gputrace_denials_total", labels(node_class="nvidiactl"))] == 1
    assert got[("gputrace_last_denial_timestamp_seconds", ())] == 105.0
    assert len([k for k in got if k[0] == "gputrace_denials_total"]) == 3


def test_update_without_its_first_event_is_not_guessed():
    sink = MetricsSink(DaemonState())
    sink.consume(update(denial(7), 5, 10.0))
    got = samples(sink)
    assert not [k for k in got if k[0] == "gputrace_denials_total"]
    assert ("gputrace_last_denial_timestamp_seconds", ()) not in got


def test_collector_reads_sensor_counters_at_scrape_time():
    stats = {"denials": 10, "aggregated": 6, "dropped_buffer_full": 1, "dropped_update": 2,
             "dropped_perf_lost": 3, "first_event_lost": 1, "decode_error_short": 2}
    state = DaemonState(sensor_stats=lambda: dict(stats),
                        probes=lambda: [Probe("bpf", "tracepoint", "ringbuf", True)],
                        pipeline_discards=lambda: {"queue_full": 4, "rate_limited": 6})
    state.discard("subscriber_queue_full", 5)
    state.discard("enrichment_failed")
    sink = MetricsSink(state)
    got = samples(sink)
    d = "gputrace_events_discarded_total"
    assert got[(d, (("intentional", "false"), ("reason", "kernel_buffer_full")))] == 6
    assert got[(d, (("intentional", "true"), ("reason", "rate_aggregated")))] == 6
    assert got[(d, (("intentional", "false"), ("reason", "first_event_lost")))] == 1
    assert got[(d, (("intentional", "false"), ("reason", "queue_full")))] == 4
    assert got[(d, (("intentional", "true"), ("reason", "rate_limited")))] == 6
    assert got[(d, (("intentional", "false"), ("reason", "subscriber_queue_full")))] == 5
    assert got[(d, (("intentional", "false"), ("reason", "enrichment_failed")))] == 1
    assert got[(d, (("intentional", "false"), ("reason", "decode_error")))] == 2
    assert got[("gputrace_probe_attached", (("hook", "tracepoint"), ("sensor", "bpf"),
                                            ("transport", "ringbuf")))] == 1
    stats["denials"] = 11  # read again at the next scrape, never copied per event
    assert samples(sink)[("gputrace_sensor_counter_total",
                          (("counter", "denials"), ("sensor", "bpf")))] == 11
    with pytest.raises(ValueError):
        state.discard("some_new_reason")


def test_every_documented_metric_is_exported():
    sink = MetricsSink(DaemonState(sensor_stats=lambda: {"denials": 1},
                                   probes=lambda: [Probe("bpf", "", "", False)]))
    sink.consume(denial(1))
    names = {name for name, _ in samples(sink)}
    for metric in METRIC_NAMES:
        assert metric in names, metric


def test_http_endpoint_and_port_in_use():
    sink = MetricsSink(DaemonState())
    port = sink.serve("127.0.0.1", 0)
    try:
        sink.consume(denial(1, count=3))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
        assert 'gputrace_denials_total{container_engine="none",errno="EACCES",' \
               'node_class="nvidia-gpu",reason="not_in_group"} 3.0' in body
        other = MetricsSink(DaemonState())
        with pytest.raises(EnvironmentProblem, match=f"127.0.0.1:{port} is already in use"):
            other.serve("127.0.0.1", port)
    finally:
        sink.close()
    with socket.create_server(("127.0.0.1", 0)) as probe:
        free = probe.getsockname()[1]
    with pytest.raises(EnvironmentProblem, match="not usable"):
        MetricsSink(DaemonState()).serve("203.0.113.7", free)  # TEST-NET: not ours


def test_container_snapshot_store_counters_are_exported():
    stats = {"snapshots_held": 3, "snapshot_bytes": 9000, "snapshots_evicted": 7,
             "containers_missed": 1}
    sink = MetricsSink(DaemonState(containers=lambda: stats))
    got = samples(sink)
    assert got[("gputrace_container_snapshots", ())] == 3
    assert got[("gputrace_container_snapshot_bytes", ())] == 9000
    assert got[("gputrace_container_tracker_total", (("counter", "snapshots_evicted"),))] == 7
    assert got[("gputrace_container_tracker_total", (("counter", "containers_missed"),))] == 1
