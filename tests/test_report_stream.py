"""The report streams the journal: memory stays bounded however long the journal,
and the counts stay exact (tracer.sinks.report_causes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support.daemon_proc import REPO, write_config
from tests.support.sample_events import denial, update
from tracer.sinks.journal import JournalSink
from tracer.sinks.report_causes import (MAX_NODES_PER_CAUSE, MAX_PROCESSES_PER_CAUSE,
                                        TIMELINE_MAX, CauseBook)

T0 = 1_800_000_000.0
# the CLI in a fresh interpreter that prints its own peak RSS (KiB) when done
MEASURED = """
import json, sys
from tracer.cli import main
sys.argv = json.loads(sys.argv[1])
try:
    main()
except SystemExit as exc:
    if exc.code:
        raise
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across execve, so a child forked
# from a large pytest process would report the parent's peak, not its own
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def test_the_book_stays_bounded_and_exact_over_many_aggregates():
    book = CauseBook(since=None, max_open=100)
    for n in range(5000):
        first = denial(10_000 + n, path=f"/dev/nvidia-gttest-{n}", at=T0 + n)
        book.feed(first)
        book.feed(update(first, 4, T0 + n + 0.5))
    assert len(book.counts) == 100 and book.counts.forgotten == 4900
    [cause] = book.sorted_causes()
    assert cause["count"] == 5000 * 4 and cause["events"] == 5000 == book.aggregates
    assert len(cause["processes"]) == MAX_PROCESSES_PER_CAUSE
    assert cause["processes_not_shown"] == 5000 - MAX_PROCESSES_PER_CAUSE
    assert len(cause["nodes"]) == MAX_NODES_PER_CAUSE
    timeline = book.timeline()
    assert len(timeline) == TIMELINE_MAX
    assert timeline[-1]["path"] == "/dev/nvidia-gttest-4999"  # the newest are kept


def test_report_on_a_large_journal_uses_bounded_memory(tmp_path):
    """A 40 MB journal (8,000 aggregates, real-sized lines): the report process stays
    under 120 MiB (reading it whole took about 6.5 KiB of memory per KiB of journal)."""
    journal = tmp_path / "state" / "journal"
    sink = JournalSink(str(journal), max_file_bytes=1 << 40)
    filler = "x" * 4000  # a verdict with evidence is a few KiB per denial
    n = 0
    while sink.size < 40 << 20:
        first = denial(20_000 + n, path=f"/dev/nvidia-gttest-{n % 3000}", at=T0 + n,
                       note=filler)
        sink.consume(first)
        for count in (3, 7):
            sink.consume(update(first, count, T0 + n + 0.5))
        n += 1
    sink.close()
    cfg = write_config(str(tmp_path), {"state_dir": str(tmp_path / "state"),
                                       "runtime_dir": str(tmp_path / "run")})
    out = tmp_path / "report.json"
    args = ["gputrace", "report", "--config", cfg, "--format", "json", "-o", str(out)]
    done = subprocess.run([sys.executable, "-c", MEASURED, json.dumps(args)], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    peak_mib = int(done.stdout.split()[-1]) / 1024
    report = json.loads(out.read_text())
    assert report["totals"]["denials"] == n * 7 and report["totals"]["aggregates"] == n
    print(f"report over {os.path.getsize(journal / 'current.jsonl') >> 20} MiB: "
          f"peak RSS {peak_mib:.0f} MiB")
    assert peak_mib < 120
