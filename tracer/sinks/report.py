"""`gputrace report`: the journal's denials grouped by cause, plus a host snapshot.

Counting matches the daemon's other outputs exactly: each denial event opens an
aggregate, its updates raise the count, and a window (`--since`) counts only
the repeats that happened inside it.  The JSON follows
tracer/report_schema/report-v1.json; `render_markdown` is for bug trackers.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Iterable, Optional

from tracer import __version__
from tracer.enrichment.node import NodeStatter, stat_in_root
from tracer.errors import BadInput
from tracer.event import Event
from tracer.host import HostPaths
from tracer.sinks.journal import read_journal
from tracer.sinks.metrics import fact_value
from tracer.sinks.report_host import VersionProbe, host_snapshot, live_version

SCHEMA_ID = "https://gputrace.dev/schema/report-v1.json"
REPORT_VERSION = 1
MAX_PROCESSES_PER_CAUSE = 20
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """"90s", "15m", "2h", "7d", "1w", "1h30m" -> seconds."""
    text = text.strip().lower()
    parts = _DURATION.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise BadInput(f"--since {text!r}: use a duration such as 30m, 2h, 7d or 1h30m")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def report_schema() -> dict[str, Any]:
    text = resources.files("tracer").joinpath("report_schema/report-v1.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def iso(ts: Optional[float]) -> Optional[str]:
    if ts is None:
        return None
    return (_dt.datetime.fromtimestamp(ts, _dt.timezone.utc)
            .isoformat(timespec="seconds").replace("+00:00", "Z"))


@dataclass
class Aggregate:
    """One denial event and its count updates (one process, node, errno)."""
    first: Event
    count: int
    baseline: int = 0                 # count reached before the window opened
    first_in_window: Optional[float] = None
    last_time: float = 0.0

    @property
    def in_window(self) -> int:
        return self.count - self.baseline


def aggregates(events: Iterable[Event], since: Optional[float]) -> list[Aggregate]:
    out: list[Aggregate] = []
    open_by_key: dict[str, Aggregate] = {}
    for event in events:
        inside = since is None or event.time >= since
        if event.kind == "denial" or event.key not in open_by_key:
            agg = Aggregate(first=event, count=event.count, last_time=event.time)
            if not inside:
                agg.baseline = event.count
            else:
                agg.first_in_window = event.time
            out.append(agg)
            if event.key:
                open_by_key[event.key] = agg
            continue
        agg = open_by_key[event.key]
        agg.count = max(agg.count, event.count)
        if inside:
            agg.last_time = max(agg.last_time, event.time)
            agg.first_in_window = agg.first_in_window or event.time
        else:
            agg.baseline = agg.count
    return [a for a in out if a.in_window > 0 and a.first_in_window is not None]


def _text(raw: Optional[bytes]) -> Optional[str]:
    return None if raw is None else raw.decode("utf-8", "replace")


def _process_entry(agg: Aggregate) -> dict[str, Any]:
    e = agg.first
    engine = fact_value(e, "container.engine")
    container = None
    if engine or fact_value(e, "container.id") or fact_value(e, "container.name"):
        container = {"engine": engine, "name": fact_value(e, "container.name"),
                     "id": fact_value(e, "container.id"),
                     "runtime": fact_value(e, "container.runtime"),
                     "rootless": fact_value(e, "container.rootless")}
    return {"pid": e.process.pid, "comm": _text(e.process.comm) or "", "uid": e.process.uid,
            "user": fact_value(e, "host.user_name"), "groups": list(e.process.groups),
            "container": container, "count": agg.in_window}


def _cause(reason: str, aggs: list[Aggregate]) -> dict[str, Any]:
    aggs.sort(key=lambda a: a.first_in_window or 0.0)
    verdict = next((a.first.verdict for a in aggs if a.first.verdict), None) or {}
    fixes: list[dict[str, Any]] = []
    seen_commands: set[str] = set()
    for agg in aggs:
        for fix in (agg.first.verdict or {}).get("fixes") or []:
            command = str(fix.get("command", ""))
            if command not in seen_commands:
                seen_commands.add(command)
                fixes.append({k: fix[k] for k in ("summary", "command", "applies_to", "where",
                                                  "security_note") if k in fix})
    nodes: dict[str, dict[str, Any]] = {}
    for agg in aggs:
        path = _text(agg.first.node.path) or f"dev {agg.first.node.major}:{agg.first.node.minor}"
        entry = nodes.setdefault(path, {"path": path, "errno": agg.first.errno_name, "count": 0})
        entry["count"] += agg.in_window
    processes = [_process_entry(a) for a in aggs]
    return {
        "reason": reason,
        "summary": verdict.get("summary") or "No verdict was recorded for these denials.",
        "confidence": verdict.get("confidence"),
        "count": sum(a.in_window for a in aggs),
        "events": len(aggs),
        "first_seen": iso(min(a.first_in_window or 0.0 for a in aggs)),
        "last_seen": iso(max(a.last_time for a in aggs)),
        "nodes": sorted(nodes.values(), key=lambda n: -n["count"]),
        "processes": processes[:MAX_PROCESSES_PER_CAUSE],
        "processes_not_shown": max(len(processes) - MAX_PROCESSES_PER_CAUSE, 0),
        "fixes": fixes,
        "notes": list(verdict.get("notes") or []),
    }


@dataclass
class ReportInputs:
    journal_dir: str
    host: HostPaths = field(default_factory=HostPaths)
    statter: NodeStatter = stat_in_root
    versions: VersionProbe = live_version
    since_s: Optional[float] = None       # window length; None = the whole journal
    now: Optional[float] = None


TIMELINE_MAX = 500


def timeline(events: Iterable[Event], aggs: list[Aggregate], since: Optional[float]
             ) -> list[dict[str, Any]]:
    """Node lifecycle changes and first denials in time order, so that "the node
    appeared after the container started" can be read off (most recent kept)."""
    out: list[dict[str, Any]] = []
    for event in events:
        if event.kind != "node" or (since is not None and event.time < since):
            continue
        out.append({"time": iso(event.time), "what": f"node {event.facts.get('node.change', '?')}",
                    "path": _text(event.node.path), "sensor": event.sensor,
                    "major": event.node.major, "minor": event.node.minor,
                    "mode": event.facts.get("node.mode"), "uid": event.facts.get("node.uid"),
                    "gid": event.facts.get("node.gid")})
    for agg in aggs:
        e = agg.first
        out.append({"time": iso(agg.first_in_window), "what": f"first denial ({e.errno_name})",
                    "path": _text(e.node.path), "sensor": e.sensor, "major": e.node.major,
                    "minor": e.node.minor, "pid": e.process.pid,
                    "reason": (e.verdict or {}).get("reason")})
    out.sort(key=lambda entry: entry["time"] or "")
    return out[-TIMELINE_MAX:]


def build_report(inputs: ReportInputs) -> dict[str, Any]:
    now = inputs.now if inputs.now is not None else time.time()
    since = now - inputs.since_s if inputs.since_s is not None else None
    if not os.path.isdir(inputs.journal_dir):
        raise BadInput(f"no journal at {inputs.journal_dir} (is the daemon configured with "
                       "this state_dir?)")
    journal = read_journal(inputs.journal_dir)
    aggs = aggregates(journal.events, since)
    by_reason: dict[str, list[Aggregate]] = {}
    for agg in aggs:
        reason = str((agg.first.verdict or {}).get("reason") or "unknown")
        by_reason.setdefault(reason, []).append(agg)
    causes = sorted((_cause(r, a) for r, a in by_reason.items()), key=lambda c: -c["count"])
    uids = frozenset(a.first.process.uid for a in aggs) | frozenset(
        int(u) for a in aggs for u in [fact_value(a.first, "host.user_uid")] if isinstance(u, int))
    return {
        "$schema": SCHEMA_ID,
        "report_version": REPORT_VERSION,
        "generated_at": iso(now),
        "gputrace_version": __version__,
        "window": {"since": iso(since), "until": iso(now)},
        "redacted": False,
        "journal": {"directory": inputs.journal_dir, "files": journal.files,
                    "events_read": len(journal.events), "lost_lines": journal.lost_total,
                    "lost_by_reason": dict(journal.lost)},
        "totals": {"denials": sum(c["count"] for c in causes), "aggregates": len(aggs),
                   "causes": len(causes)},
        "causes": causes,
        "timeline": timeline(journal.events, aggs, since),
        "host": host_snapshot(inputs.host, inputs.statter, inputs.versions, uids),
    }


def render_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=False) + "\n"
