"""The one cumulative-count-to-delta model (tracer.counts) and the one table of
discard reasons (tracer.discards), as the summary and /metrics use them."""

from __future__ import annotations

from tracer.counts import CountDeltas, KernelCounter
from tracer.discards import SENSOR_DISCARDS, by_reason, lost_events
from tracer.pipeline import Summary
from tracer.sinks.metrics import DaemonState, StateCollector


def test_late_updates_add_nothing_and_unknown_keys_are_reported():
    deltas: CountDeltas[str] = CountDeltas()
    assert deltas.start("k", 3, "labels") == 3
    assert deltas.advance("k", 7) == 4
    assert deltas.advance("k", 5) == 0  # arrived late
    assert deltas.advance("k", 8) == 1 and deltas.payload("k") == "labels"
    assert deltas.advance("other", 4) is None


def test_the_bound_forgets_the_oldest_key_first():
    deltas: CountDeltas[None] = CountDeltas(max_keys=2)
    for key in ("a", "b", "c"):
        deltas.start(key, 1)
    assert deltas.advance("a", 5) is None and deltas.advance("c", 5) == 4
    assert len(deltas) == 2 and deltas.forgotten == 1


def test_kernel_counter_survives_a_reset():
    lost = KernelCounter(first_reading=100)
    assert lost.read(130) == 30
    assert lost.read(4) == 34      # auditctl --reset-lost, then 4 more
    assert lost.read(10) == 40


def test_every_audit_loss_reaches_summary_and_metrics_under_its_reason():
    stats = {"lost_by_kernel": 11, "socket_overflows": 2, "parse_errors": 5,
             "dropped.ioctl_fd_unresolved": 1, "dropped.not_gpu_node": 40, "records_read": 900}
    summary = Summary(sensor_stats=dict(stats, dropped_queue_full=3))
    assert summary.dropped == 11 + 2 + 5 + 1 + 3 == lost_events(summary.sensor_stats)
    assert ("audit records lost by the kernel 11, socket overflows 2, parse errors 5, "
            "ioctl fd gone 1; queue full 3") in summary.line()
    families = {f.name: f for f in StateCollector(DaemonState(sensor_stats=lambda: stats,
                                                              sensor_name=lambda: "audit")).collect()}
    got = {(s.labels["reason"], s.labels["intentional"]): s.value
           for s in families["gputrace_events_discarded"].samples}
    assert got[("audit_kernel_lost", "false")] == 11
    assert got[("audit_socket_overflow", "false")] == 2
    assert got[("audit_parse_error", "false")] == 5
    assert got[("audit_ioctl_unresolved", "false")] == 1
    assert by_reason(stats, SENSOR_DISCARDS)[("kernel_buffer_full", False)] == 0
