"""Audit records -> events, independent of where the records come from.

The live sensor feeds what its socket receives; tests and replays feed captured
netlink datagrams through `replay_datagrams`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from pyroute2.netlink import nlmsg

from tracer.event import Event
from tracer.host import HostPaths
from tracer.sensors.audit_events import EventMapper, GpuNodeFilter
from tracer.sensors.audit_marshal import MarshalAudit, is_record
from tracer.sensors.audit_records import AuditEventRecords, RecordAssembler, RecordError
from tracer.sensors.audit_rules import GPUTRACE_KEY


@dataclass(frozen=True)
class AuditConfig:
    key: str = GPUTRACE_KEY
    extra_prefixes: tuple[str, ...] = ()  # besides gpu_nodes.DEFAULT_PREFIXES
    read_mode: str = "auto"  # auto | consumer | multicast
    eoe_timeout_s: float = 2.0
    poll_interval_s: float = 0.2
    lost_refresh_s: float = 5.0
    rcvbuf_bytes: int = 4 << 20  # the reading socket's buffer; overflow is counted (ENOBUFS)


class AuditPipeline:
    """Records -> events, independent of where the records come from."""

    def __init__(self, config: AuditConfig, host: HostPaths) -> None:
        self.assembler = RecordAssembler(timeout=config.eoe_timeout_s)
        self.mapper = EventMapper(host, GpuNodeFilter.discover(host, config.extra_prefixes))
        self.events_emitted = 0

    def feed(self, msg: nlmsg, now: float) -> list[Event]:
        if not is_record(msg):
            return []
        return self._map(self.assembler.add(msg["header"]["type"], msg["text"], now))

    def expire(self, now: float) -> list[Event]:
        return self._map(self.assembler.expire(now))

    def drain(self) -> list[Event]:
        return self._map(self.assembler.drain())

    def _map(self, groups: list[AuditEventRecords]) -> list[Event]:
        out = []
        for group in groups:
            try:
                event = self.mapper.map(group)
            except RecordError as exc:
                self.assembler.errors[exc.reason] += 1
                continue
            if event is not None:
                self.events_emitted += 1
                out.append(event)
        return out

    def stats(self) -> dict[str, int]:
        counts, errors = self.assembler.counts, self.assembler.errors
        out = {"records_read": counts["records_read"],
               "records_ignored": counts["records_ignored"],
               "events_without_eoe": counts["events_without_eoe"],
               "events_emitted": self.events_emitted,
               "parse_errors": sum(errors.values())}
        out.update({f"parse_errors.{r}": n for r, n in sorted(errors.items())})
        out.update({f"dropped.{r}": n for r, n in sorted(self.mapper.dropped.items())})
        return out


def replay_datagrams(pipeline: AuditPipeline, datagrams: Iterable[bytes]) -> list[Event]:
    """Feed captured netlink datagrams (as received) through `pipeline`, then drain."""
    marshal = MarshalAudit()
    events: list[Event] = []
    for number, datagram in enumerate(datagrams):
        messages = list(marshal.parse(datagram))
        if not messages:
            pipeline.assembler.errors["bad_netlink_header"] += 1
        for msg in messages:
            events.extend(pipeline.feed(msg, number * 0.001))
    return events + pipeline.drain()
