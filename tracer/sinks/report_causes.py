"""Denials grouped by cause, built while the journal streams past: bounded memory.

One `Aggregate` per (process, node, errno): a denial event opens it, its
`update` events raise the count (tracer.counts), and a window (`since`) counts
only what happened inside it.  An aggregate keeps no `Event`, only what the
report shows; its verdict is kept only until it entered the window.  Open
aggregates are bounded (oldest forgotten first; a later update of a forgotten
one opens a new aggregate, as an update without its denial always did), each
cause keeps at most MAX_PROCESSES_PER_CAUSE processes, MAX_NODES_PER_CAUSE
nodes and MAX_FIXES_PER_CAUSE fixes, and the timeline keeps the newest
TIMELINE_MAX entries.  Memory does not grow with the journal's length.

The journal may have been written by anyone: a cause is keyed only by a known
reason code (any other is `unknown`), and what an aggregate keeps of its verdict
is cut to bounded sizes.  Both are counted in `folded`, never silent.
"""

from __future__ import annotations

import datetime as _dt
import heapq
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

from tracer.counts import CountDeltas
from tracer.event import Event
from tracer.sinks.metrics import denial_labels, fact_value
from tracer.verdict.reasons import CONFIDENCES, REASONS

MAX_OPEN_AGGREGATES = 65536
MAX_PROCESSES_PER_CAUSE = 20
MAX_NODES_PER_CAUSE = 200
MAX_FIXES_PER_CAUSE = 50
MAX_UIDS = 4096
TIMELINE_MAX = 500
FIX_KEYS = ("summary", "command", "applies_to", "where", "security_note")
MAX_TEXT = 4096             # any one string kept from a recorded verdict
MAX_NOTES = 32
MAX_FIXES_PER_VERDICT = 32


def _bounded_text(value: Any, cut: list[bool]) -> Optional[str]:
    if value is None:
        return None
    text = str(value)
    if len(text) > MAX_TEXT:
        cut[0] = True
        return text[:MAX_TEXT] + "..."
    return text


def kept_verdict(verdict: Any, folded: Counter[str]) -> Optional[dict[str, Any]]:
    """What a cause takes from a recorded verdict (summary, confidence, notes,
    fixes), each bounded; anything cut is counted as `verdict_trimmed`."""
    if not isinstance(verdict, dict):
        return None
    cut = [False]
    raw_notes, raw_fixes = verdict.get("notes"), verdict.get("fixes")
    notes: list[Any] = raw_notes if isinstance(raw_notes, list) else []
    fixes: list[Any] = raw_fixes if isinstance(raw_fixes, list) else []
    if len(notes) > MAX_NOTES or len(fixes) > MAX_FIXES_PER_VERDICT:
        cut[0] = True
    kept = {"reason": verdict.get("reason"),
            "summary": _bounded_text(verdict.get("summary"), cut),
            "confidence": verdict.get("confidence") if verdict.get("confidence") in CONFIDENCES
            else None,
            "notes": [_bounded_text(n, cut) for n in notes[:MAX_NOTES]],
            "fixes": [{k: _bounded_text(f[k], cut) for k in FIX_KEYS if k in f}
                      for f in fixes[:MAX_FIXES_PER_VERDICT] if isinstance(f, dict)]}
    if cut[0]:
        folded["verdict_trimmed"] += 1
    return kept


def iso(ts: Optional[float]) -> Optional[str]:
    if ts is None:
        return None
    return (_dt.datetime.fromtimestamp(ts, _dt.timezone.utc)
            .isoformat(timespec="seconds").replace("+00:00", "Z"))


def _text(raw: Optional[bytes]) -> Optional[str]:
    return None if raw is None else raw.decode("utf-8", "replace")


def _process_entry(e: Event) -> dict[str, Any]:
    engine = fact_value(e, "container.engine")
    container = None
    if engine or fact_value(e, "container.id") or fact_value(e, "container.name"):
        container = {"engine": engine, "name": fact_value(e, "container.name"),
                     "id": fact_value(e, "container.id"),
                     "runtime": fact_value(e, "container.runtime"),
                     "rootless": fact_value(e, "container.rootless")}
    return {"pid": e.process.pid, "comm": _text(e.process.comm) or "", "uid": e.process.uid,
            "user": fact_value(e, "host.user_name"), "groups": None if e.process.groups is None else list(e.process.groups),
            "container": container, "count": 0}


@dataclass
class Aggregate:
    """What the report needs of one denial and its count updates."""
    reason: str
    pid: int
    first_time: float
    labels: tuple[str, ...]               # the metrics labels of its first event
    path: str
    errno: str
    sensor: str
    major: Optional[int]
    minor: Optional[int]
    process: dict[str, Any]               # the report's process entry
    verdict: Optional[dict[str, Any]]     # dropped once the aggregate entered the window
    count: int = 0
    baseline: int = 0                     # count reached before the window opened
    first_in_window: Optional[float] = None
    last_time: float = 0.0
    cause: Optional["Cause"] = None

    @property
    def in_window(self) -> int:
        return self.count - self.baseline


@dataclass
class Cause:
    reason: str
    verdict: dict[str, Any] = field(default_factory=dict)
    count: int = 0
    events: int = 0
    first_seen: Optional[float] = None
    last_seen: float = 0.0
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    nodes_not_shown: int = 0
    shown: list[Aggregate] = field(default_factory=list)
    fixes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def enter(self, agg: Aggregate) -> None:
        self.events += 1
        self.first_seen = min(self.first_seen or agg.first_in_window or 0.0,
                              agg.first_in_window or 0.0)
        if not self.verdict and agg.verdict:
            self.verdict = {k: agg.verdict.get(k) for k in ("summary", "confidence", "notes")}
        for fix in (agg.verdict or {}).get("fixes") or []:
            command = str(fix.get("command", ""))
            if command not in self.fixes and len(self.fixes) < MAX_FIXES_PER_CAUSE:
                self.fixes[command] = {k: fix[k] for k in FIX_KEYS if k in fix}
        if len(self.shown) < MAX_PROCESSES_PER_CAUSE:
            self.shown.append(agg)
        if agg.path not in self.nodes and len(self.nodes) >= MAX_NODES_PER_CAUSE:
            self.nodes_not_shown += 1
        else:
            self.nodes.setdefault(agg.path, {"path": agg.path, "errno": agg.errno, "count": 0})

    def add(self, agg: Aggregate, count: int, when: float) -> None:
        self.count += count
        self.last_seen = max(self.last_seen, when)
        node = self.nodes.get(agg.path)
        if node is not None:
            node["count"] += count

    def to_json(self) -> dict[str, Any]:
        shown = sorted(self.shown, key=lambda a: a.first_in_window or 0.0)
        return {
            "reason": self.reason,
            "summary": self.verdict.get("summary") or "No verdict was recorded for these denials.",
            "confidence": self.verdict.get("confidence"),
            "count": self.count,
            "events": self.events,
            "first_seen": iso(self.first_seen),
            "last_seen": iso(self.last_seen),
            "nodes": sorted(self.nodes.values(), key=lambda n: -n["count"]),
            "processes": [dict(a.process, count=a.in_window) for a in shown],
            "processes_not_shown": self.events - len(shown),
            "fixes": list(self.fixes.values()),
            "notes": list(self.verdict.get("notes") or []),
        }


class CauseBook:
    """Feed events in journal order; read causes, totals, timeline and uids after."""

    def __init__(self, since: Optional[float], max_open: int = MAX_OPEN_AGGREGATES) -> None:
        self.since = since
        self.counts: CountDeltas[Aggregate] = CountDeltas(max_open)
        self.causes: dict[str, Cause] = {}
        self.aggregates = 0                 # aggregates with denials inside the window
        self.uids: set[int] = set()
        self._timeline: list[tuple[float, int, dict[str, Any]]] = []
        self._seq = itertools.count()
        self.folded: Counter[str] = Counter()  # what a hostile journal could not make grow

    def feed(self, event: Event) -> Optional[Aggregate]:
        """Account one event; returns the aggregate it counted for, if any."""
        inside = self.since is None or event.time >= self.since
        if event.kind == "node":
            if inside:
                self._remember(event.time, _node_entry(event))
            return None
        advanced = None if event.kind == "denial" else self.counts.advance(event.key, event.count)
        agg = self.counts.payload(event.key) if advanced is not None else None
        added = advanced if advanced is not None else event.count
        if agg is None:
            agg = self._open(event)
        agg.count += added
        if not inside:
            agg.baseline = agg.count
            return agg
        if agg.first_in_window is None and agg.in_window > 0:
            self._enter(agg, event.time)
        if agg.cause is not None and added:
            agg.cause.add(agg, added, event.time)
        agg.last_time = max(agg.last_time, event.time)
        return agg

    def _open(self, event: Event) -> Aggregate:
        verdict = kept_verdict(event.verdict, self.folded)
        reason = (verdict or {}).get("reason") or "unknown"
        if reason not in REASONS:  # a cause per distinct string would grow without end
            self.folded["unknown_reason"] += 1
            reason = "unknown"
        agg = Aggregate(reason=reason, pid=event.process.pid,
                        first_time=event.time, labels=denial_labels(event),
                        path=_text(event.node.path) or f"dev {event.node.major}:{event.node.minor}",
                        errno=event.errno_name, sensor=event.sensor, major=event.node.major,
                        minor=event.node.minor, process=_process_entry(event),
                        verdict=verdict, last_time=event.time)
        if len(self.uids) < MAX_UIDS and event.process.uid is not None:
            self.uids.add(event.process.uid)
            user_uid = fact_value(event, "host.user_uid")
            if isinstance(user_uid, int):
                self.uids.add(user_uid)
        if event.key:
            self.counts.start(event.key, 0, agg)
            self.counts.advance(event.key, event.count)
        return agg

    def _enter(self, agg: Aggregate, when: float) -> None:
        agg.first_in_window = when
        cause = self.causes.setdefault(agg.reason, Cause(agg.reason))
        agg.cause = cause
        cause.enter(agg)
        self.aggregates += 1
        self._remember(when, {"time": iso(when), "what": f"first denial ({agg.errno})",
                              "path": agg.path, "sensor": agg.sensor, "major": agg.major,
                              "minor": agg.minor,
                              "pid": agg.pid, "reason": agg.reason})
        agg.verdict = None  # what the cause needed of it is taken

    def _remember(self, when: float, entry: dict[str, Any]) -> None:
        item = (when, next(self._seq), entry)
        if len(self._timeline) < TIMELINE_MAX:
            heapq.heappush(self._timeline, item)
        else:
            heapq.heappushpop(self._timeline, item)  # keeps the newest

    def timeline(self) -> list[dict[str, Any]]:
        return [entry for _, _, entry in sorted(self._timeline)]

    def sorted_causes(self) -> list[dict[str, Any]]:
        return sorted((c.to_json() for c in self.causes.values()), key=lambda c: -c["count"])


def _node_entry(event: Event) -> dict[str, Any]:
    return {"time": iso(event.time), "what": f"node {event.facts.get('node.change', '?')}",
            "path": _text(event.node.path), "sensor": event.sensor,
            "major": event.node.major, "minor": event.node.minor,
            "mode": event.facts.get("node.mode"), "uid": event.facts.get("node.uid"),
            "gid": event.facts.get("node.gid")}


def aggregates(events: Iterable[Event], since: Optional[float]) -> list[Aggregate]:
    """Every aggregate with denials inside the window (small journals and tests)."""
    book = CauseBook(since)
    seen: dict[int, Aggregate] = {}
    for event in events:
        agg = book.feed(event)
        if agg is not None:
            seen[id(agg)] = agg
    return [a for a in seen.values() if a.in_window > 0 and a.first_in_window is not None]


def stream(events: Iterable[Event], book: CauseBook) -> Iterator[Event]:
    for event in events:
        book.feed(event)
        yield event
