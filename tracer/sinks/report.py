"""`gputrace report`: the journal's denials grouped by cause, plus a host snapshot.

Counting matches the daemon's other outputs exactly: each denial event opens an
aggregate, its updates raise the count, and a window (`--since`) counts only
the repeats that happened inside it.  The journal is streamed once, in bounded
memory (tracer.sinks.report_causes).  The JSON follows
tracer/report_schema/report-v1.json; `render_markdown` is for bug trackers.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Optional

from tracer import __version__
from tracer.enrichment.node import NodeStatter, stat_in_root
from tracer.errors import BadInput
from tracer.host import HostPaths
from tracer.sinks.journal import JournalStream
from tracer.sinks.report_causes import Aggregate, CauseBook, aggregates, iso
from tracer.enrichment.host_snapshot import VersionProbe, host_snapshot, live_version

SCHEMA_ID = "https://gputrace.dev/schema/report-v1.json"
REPORT_VERSION = 1
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


@dataclass
class ReportInputs:
    journal_dir: str
    host: HostPaths = field(default_factory=HostPaths)
    statter: NodeStatter = stat_in_root
    versions: VersionProbe = live_version
    since_s: Optional[float] = None       # window length; None = the whole journal
    now: Optional[float] = None


def build_report(inputs: ReportInputs) -> dict[str, Any]:
    """The report, with the journal streamed once through a `CauseBook`."""
    now = inputs.now if inputs.now is not None else time.time()
    since = now - inputs.since_s if inputs.since_s is not None else None
    if not os.path.isdir(inputs.journal_dir):
        raise BadInput(f"no journal at {inputs.journal_dir} (is the daemon configured with "
                       "this state_dir?)")
    journal = JournalStream(inputs.journal_dir)
    book = CauseBook(since)
    for event in journal:
        book.feed(event)
    causes = book.sorted_causes()
    return {
        "$schema": SCHEMA_ID,
        "report_version": REPORT_VERSION,
        "generated_at": iso(now),
        "gputrace_version": __version__,
        "window": {"since": iso(since), "until": iso(now)},
        "redacted": False,
        "journal": {"directory": inputs.journal_dir, "files": journal.files,
                    "events_read": journal.read, "lost_lines": journal.lost_total,
                    "lost_by_reason": dict(journal.lost)},
        "totals": {"denials": sum(c["count"] for c in causes), "aggregates": book.aggregates,
                   "causes": len(causes), "folded": dict(book.folded)},
        "causes": causes,
        "timeline": book.timeline(),
        "host": host_snapshot(inputs.host, inputs.statter, inputs.versions, frozenset(book.uids)),
    }


def render_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=False) + "\n"


__all__ = ["Aggregate", "ReportInputs", "aggregates", "build_report", "parse_duration",
           "render_json", "report_schema"]
