"""Why events did not reach the sinks in full: one bounded table of reasons.

The sensors and the pipeline count what they lose under their own stat names
(`Sensor.stats()`); this table gives each a `reason` label for
``gputrace_events_discarded_total{reason, intentional}`` and a name for the
summary line, so `/metrics` and the summary can never disagree about what was
lost.  A stat that is not here is not a loss (records ignored on purpose,
events emitted, rules installed...).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Discard:
    reason: str          # the bounded `reason` label
    intentional: bool    # designed (rate limiting) rather than a failure
    lost_event: bool     # a denial that reached no sink in full (summary's "dropped")


SENSOR_DISCARDS: dict[str, Discard] = {
    # BPF sensor (kernel map counters)
    "dropped_buffer_full": Discard("kernel_buffer_full", False, True),
    "dropped_update": Discard("kernel_buffer_full", False, False),  # a later count repairs it
    "dropped_perf_lost": Discard("kernel_buffer_full", False, True),
    "first_event_lost": Discard("first_event_lost", False, False),  # part of buffer_full
    "aggregated": Discard("rate_aggregated", True, False),
    # refused opens outside the GPU prefixes that could not be matched by device:
    # each might have been a GPU node reached under another name
    "candidates_rate_limited": Discard("candidate_rate_limited", True, False),
    "candidates_unresolved": Discard("candidate_unresolved", False, False),
    "candidates_first_event_lost": Discard("kernel_buffer_full", False, False),
    # audit sensor: records the kernel dropped (backlog limit exceeded, rate limit,
    # out of memory; AUDIT_GET `lost`, kernel-wide), records our socket could not
    # take (ENOBUFS, at least one each), records or events that did not parse, and
    # denied ioctls whose fd was gone before it could be resolved to a node
    "lost_by_kernel": Discard("audit_kernel_lost", False, True),
    "socket_overflows": Discard("audit_socket_overflow", False, True),
    "parse_errors": Discard("audit_parse_error", False, True),
    "dropped.ioctl_fd_unresolved": Discard("audit_ioctl_unresolved", False, True),
}

# the pipeline's own drops (stat names in Summary.sensor_stats)
PIPELINE_DISCARDS: dict[str, Discard] = {
    "dropped_queue_full": Discard("queue_full", False, True),
    "dropped_rate_limited": Discard("rate_limited", True, True),
}

# reasons counted outside the sensor and pipeline stats (daemon sinks)
OTHER_REASONS: dict[str, bool] = {
    "subscriber_queue_full": False, "enrichment_failed": False, "journal_disk_full": False,
    "journal_write_error": False, "decode_error": False}


def by_reason(stats: dict[str, int], table: dict[str, Discard]) -> dict[tuple[str, bool], int]:
    """(reason, intentional) -> count for every reason of `table` (zero included)."""
    out: dict[tuple[str, bool], int] = {}
    for stat, d in table.items():
        out[(d.reason, d.intentional)] = out.get((d.reason, d.intentional), 0) + stats.get(stat, 0)
    return out


def lost_events(stats: dict[str, int]) -> int:
    """Denials that never reached the sinks in full, from sensor and pipeline stats."""
    return sum(stats.get(stat, 0) for table in (SENSOR_DISCARDS, PIPELINE_DISCARDS)
               for stat, d in table.items() if d.lost_event)
