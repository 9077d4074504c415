"""Audit record text -> `AuditRecord`, and records -> events grouped by serial.

A record reads `audit(1700000000.123:42): key=value key="value" ...`.  Values
are plain tokens, double-quoted strings (the kernel quotes a string only when
it holds no space, quote or control byte), `(null)`, or, for untrusted strings
that needed escaping, unquoted hex.  All records of one syscall share the
serial; AUDIT_EOE closes the event.  Bad input never raises: every problem is
counted under a bounded reason and the record or event is dropped.
"""

from __future__ import annotations

import binascii
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Optional

from tracer.sensors.audit_marshal import (AUDIT_CWD, AUDIT_EOE, AUDIT_LANDLOCK_ACCESS,
                                          AUDIT_LANDLOCK_DOMAIN, AUDIT_PATH, AUDIT_PROCTITLE,
                                          AUDIT_SYSCALL)

EVENT_RECORD_TYPES = frozenset({AUDIT_SYSCALL, AUDIT_PATH, AUDIT_CWD, AUDIT_PROCTITLE,
                                AUDIT_LANDLOCK_ACCESS, AUDIT_LANDLOCK_DOMAIN})
LANDLOCK_RECORD_TYPES = frozenset({AUDIT_LANDLOCK_ACCESS, AUDIT_LANDLOCK_DOMAIN})
# Fields the kernel writes with audit_log_untrustedstring(): quoted or hex.
UNTRUSTED_FIELDS = frozenset({b"comm", b"exe", b"name", b"cwd", b"key", b"proctitle",
                              b"path"})  # path: Landlock's LANDLOCK_ACCESS
HEADER = re.compile(rb"audit\((\d{1,12})\.(\d{3}):(\d{1,20})\): ?")  # bounded: int() limits
MAX_EPOCH_S = 253402300799  # 9999-12-31T23:59:59Z
PARSE_ERROR_REASONS = ("bad_header", "bad_token", "bad_hex", "unterminated_quote",
                       "missing_field", "bad_number", "no_syscall_record", "missing_path_record",
                       "late_record", "bad_netlink_header")


class RecordError(ValueError):
    """A record that cannot be read; `reason` is one of PARSE_ERROR_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class AuditRecord:
    type: int
    time: float
    serial: int
    fields: dict[bytes, Optional[bytes]]  # decoded values; `(null)` is None

    def get(self, name: str) -> Optional[bytes]:
        return self.fields.get(name.encode())

    def number(self, name: str, base: int = 10) -> int:
        """A required numeric field; RecordError when absent or not a number."""
        raw = self.fields.get(name.encode())
        if raw is None:
            raise RecordError("missing_field", f"{name} in type {self.type}")
        try:
            return int(raw, base)
        except ValueError:
            raise RecordError("bad_number", f"{name}={raw!r}") from None


def parse_record(kind: int, text: bytes) -> AuditRecord:
    head = HEADER.match(text)
    if head is None:
        raise RecordError("bad_header", repr(text[:40]))
    stamp = int(head.group(1)) + int(head.group(2)) / 1000.0
    if stamp >= MAX_EPOCH_S:  # not a time an event can carry (datetime stops at 9999)
        raise RecordError("bad_header", f"time {head.group(1)[:20]!r}")
    return AuditRecord(kind, stamp, int(head.group(3)), parse_fields(text[head.end():]))


def parse_fields(body: bytes) -> dict[bytes, Optional[bytes]]:
    fields: dict[bytes, Optional[bytes]] = {}
    at, size = 0, len(body)
    while at < size:
        if body[at:at + 1] == b" ":
            at += 1
            continue
        equals = body.find(b"=", at)
        space = body.find(b" ", at)
        if equals < 0 or (0 <= space < equals) or equals == at:
            raise RecordError("bad_token", repr(body[at:at + 40]))
        name = body[at:equals]
        at = equals + 1
        if body[at:at + 1] == b'"':
            close = body.find(b'"', at + 1)
            if close < 0:
                raise RecordError("unterminated_quote", name.decode("ascii", "replace"))
            fields[name] = body[at + 1:close]
            at = close + 1
            continue
        end = body.find(b" ", at)
        end = size if end < 0 else end
        raw = body[at:end]
        at = end
        if raw == b"(null)":
            fields[name] = None
        elif name in UNTRUSTED_FIELDS:
            fields[name] = decode_hex(name, raw)
        else:
            fields[name] = raw
    return fields


def decode_hex(name: bytes, raw: bytes) -> bytes:
    try:
        return binascii.unhexlify(raw)
    except (binascii.Error, ValueError):
        raise RecordError("bad_hex", name.decode("ascii", "replace")) from None


@dataclass
class AuditEventRecords:
    """All records of one serial, in arrival order."""

    serial: int
    time: float
    records: list[AuditRecord] = field(default_factory=list)
    ended: bool = False  # closed by AUDIT_EOE (not by timeout)
    first_seen: float = 0.0  # monotonic clock of the first record

    def of_type(self, kind: int) -> list[AuditRecord]:
        return [r for r in self.records if r.type == kind]


class RecordAssembler:
    """Groups records by serial until EOE, a timeout, or too many open serials."""

    def __init__(self, timeout: float = 2.0, max_open: int = 1024) -> None:
        self.timeout = timeout
        self.max_open = max_open
        self.open: OrderedDict[int, AuditEventRecords] = OrderedDict()
        self.closed_serials: OrderedDict[int, None] = OrderedDict()
        self.errors: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()

    def add(self, kind: int, text: bytes, now: float) -> list[AuditEventRecords]:
        """Feed one record; returns the events it completed."""
        self.counts["records_read"] += 1
        if kind not in EVENT_RECORD_TYPES and kind != AUDIT_EOE:
            self.counts["records_ignored"] += 1
            return []
        try:
            record = parse_record(kind, text)
        except RecordError as exc:
            self.errors[exc.reason] += 1
            return []
        if record.serial in self.closed_serials:
            self.errors["late_record"] += 1
            return []
        if kind == AUDIT_EOE:
            done = self.open.pop(record.serial, None)
            self._remember_closed(record.serial)
            if done is None:
                return []
            done.ended = True
            return [done]
        group = self.open.get(record.serial)
        if group is None:
            group = AuditEventRecords(record.serial, record.time, first_seen=now)
            self.open[record.serial] = group
        group.records.append(record)
        finished = []
        while len(self.open) > self.max_open:
            finished.append(self._close_oldest())
        return finished

    def expire(self, now: float) -> list[AuditEventRecords]:
        """Events whose EOE did not come within `timeout` seconds."""
        finished = []
        while self.open:
            oldest = next(iter(self.open.values()))
            if now - oldest.first_seen < self.timeout:
                break
            finished.append(self._close_oldest())
        return finished

    def drain(self) -> list[AuditEventRecords]:
        finished = []
        while self.open:
            finished.append(self._close_oldest())
        return finished

    def _close_oldest(self) -> AuditEventRecords:
        serial, group = self.open.popitem(last=False)
        self._remember_closed(serial)
        self.counts["events_without_eoe"] += 1
        return group

    def _remember_closed(self, serial: int) -> None:
        self.closed_serials[serial] = None
        while len(self.closed_serials) > 4 * self.max_open:
            self.closed_serials.popitem(last=False)
