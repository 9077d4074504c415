"""`gputrace report` of a journal someone else wrote: a cause per distinct
`verdict.reason` string, a verdict of megabytes, or a line of gigabytes must not
make the report grow.  Unknown reasons are counted under `unknown`, verdicts
are cut to bounded sizes, over-long lines are skipped; each is counted."""

from __future__ import annotations

import json
import os

import jsonschema

from tests.support.sample_events import denial
from tests.test_report import T0, report_of
from tracer.sinks.journal import CURRENT, JournalSink
from tracer.sinks.report import report_schema
from tracer.sinks.report_causes import MAX_TEXT, CauseBook
from tracer.verdict.reasons import REASONS


def test_a_cause_per_distinct_reason_string_is_folded_into_unknown() -> None:
    book = CauseBook(None)
    n = 50_000
    for i in range(n):
        event = denial(10_000 + i, at=T0 + i)
        assert event.verdict is not None
        event.verdict["reason"] = f"reason_{i:06d}"  # each distinct, none a known code
        book.feed(event)
    assert set(book.causes) == {"unknown"} and book.causes["unknown"].events == n
    assert book.folded == {"unknown_reason": n}


def test_known_reasons_are_kept_as_they_are() -> None:
    book = CauseBook(None)
    for i, reason in enumerate(REASONS):
        book.feed(denial(20_000 + i, reason=reason, at=T0 + i))
    assert set(book.causes) == set(REASONS) and not book.folded


def test_a_huge_recorded_verdict_is_cut_and_counted(tmp_path) -> None:
    event = denial(30_000, at=T0)
    assert event.verdict is not None
    # under the journal's 4 MiB line cap, far over what a report keeps of one verdict
    event.verdict.update(summary="S" * (1 << 20), notes=["n" * 100] * 10_000,
                         fixes=[{"summary": "f", "command": "c" * (20 << 10),
                                 "applies_to": "host"}] * 100)
    sink = JournalSink(str(tmp_path))
    sink.consume(event)
    sink.close()
    report = report_of(str(tmp_path))
    jsonschema.validate(report, report_schema())
    [cause] = report["causes"]
    assert len(cause["summary"]) <= MAX_TEXT + 3 and len(cause["notes"]) <= 32
    assert len(cause["fixes"]) == 1 and len(cause["fixes"][0]["command"]) <= MAX_TEXT + 3
    assert report["totals"]["folded"] == {"verdict_trimmed": 1}


def test_a_line_longer_than_any_journal_line_is_skipped_and_counted(tmp_path) -> None:
    sink = JournalSink(str(tmp_path))
    sink.consume(denial(40_000, at=T0))
    sink.close()
    with open(os.path.join(str(tmp_path), CURRENT), "ab") as handle:
        handle.write(b'{"schema":1,"pad":"' + b"x" * (5 << 20) + b'"}\n')
        handle.write((json.dumps(denial(40_001, at=T0 + 1).to_json()) + "\n").encode())
    report = report_of(str(tmp_path))
    jsonschema.validate(report, report_schema())
    assert report["journal"]["lost_by_reason"] == {"line_too_long": 1}
    assert report["totals"]["denials"] == 2
