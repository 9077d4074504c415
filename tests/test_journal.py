"""The journal sink: round trip, a cut last line, real SIGKILLs of a writer,
rotation and retention, and a really full disk (a tiny tmpfs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.support.daemon_proc import REPO
from tests.support.nodes import unique
from tests.support.sample_events import denial, update
from tracer.sinks.journal import CURRENT, JournalSink, iter_lines, journal_files, read_journal


def test_round_trip_keeps_verdict_and_facts(tmp_path):
    sink = JournalSink(str(tmp_path))
    first = denial(10, engine="podman")
    sink.consume(first)
    sink.consume(update(first, 5, first.time + 1))
    sink.close()
    read = read_journal(str(tmp_path))
    assert read.lost_total == 0 and [e.to_json() for e in read.events] == \
        [first.to_json(), update(first, 5, first.time + 1).to_json()]
    assert read.events[0].verdict["reason"] == "not_in_group"
    assert read_journal(str(tmp_path), since=first.time + 0.5).events[0].count == 5


def test_cut_line_is_counted_and_kept_apart_from_the_next(tmp_path):
    sink = JournalSink(str(tmp_path))
    for pid in (1, 2, 3):
        sink.consume(denial(pid))
    sink.close()
    path = os.path.join(str(tmp_path), CURRENT)
    size = os.path.getsize(path)
    os.truncate(path, size - 40)  # what a kill in the middle of write() leaves
    read = read_journal(str(tmp_path))
    assert [e.process.pid for e in read.events] == [1, 2] and dict(read.lost) == {"unterminated_line": 1}

    sink = JournalSink(str(tmp_path))  # the restarted daemon
    sink.consume(denial(4))
    sink.close()
    read = read_journal(str(tmp_path))
    assert [e.process.pid for e in read.events] == [1, 2, 4] and dict(read.lost) == {"unreadable_line": 1}


WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from tests.support.sample_events import denial
    from tracer.sinks.journal import JournalSink
    sink = JournalSink({directory!r}, fsync_interval_s=3600)
    print("ready", flush=True)
    pid = {start}
    while True:
        sink.consume(denial(pid, path="/dev/nvidia" + str(pid % 8), comm=b"x" * 15))
        pid += 1
""")


def test_sigkill_of_a_writer_loses_at_most_the_line_in_flight(tmp_path):
    kills = 6
    for round_ in range(kills):
        code = WRITER.format(repo=REPO, directory=str(tmp_path), start=round_ * 1_000_000)
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.03 * round_)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    read = read_journal(str(tmp_path))
    lines = list(iter_lines(str(tmp_path)))
    assert read.lost_total <= kills and len(read.events) + read.lost_total == len(lines)
    assert len(read.events) > 100
    for round_ in range(kills):  # within one writer's life nothing is missing
        pids = sorted(e.process.pid for e in read.events if e.process.pid // 1_000_000 == round_)
        assert pids == list(range(pids[0], pids[0] + len(pids)))


def test_rotation_and_retention(tmp_path):
    clock = [time.time()]
    sink = JournalSink(str(tmp_path), max_file_bytes=4096, max_files=3, max_age_days=1,
                       clock=lambda: clock[0])
    for pid in range(60):
        sink.consume(denial(pid))
        clock[0] += 1
    files = journal_files(str(tmp_path))
    assert len(files) == 4 and os.path.basename(files[-1]) == CURRENT
    assert all(os.path.getsize(f) <= 4096 for f in files)
    pids = [e.process.pid for e in read_journal(str(tmp_path)).events]
    assert pids == list(range(pids[0], 60))  # oldest dropped, order kept
    old = files[0]
    os.utime(old, (time.time() - 3 * 86400,) * 2)
    clock[0] = time.time()
    sink.apply_retention()
    assert not os.path.exists(old) and len(journal_files(str(tmp_path))) == 3
    sink.close()


@pytest.mark.kernel
def test_disk_full_discards_counted_then_recovers(tmp_path):
    where = str(tmp_path / "fs")
    os.mkdir(where)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", f"gttest-{unique()}", where],
                   check=True)
    try:
        filler = os.path.join(where, "filler")
        with open(filler, "wb") as handle:
            handle.write(b"\0" * 200 * 1024)
        reasons = []
        sink = JournalSink(os.path.join(where, "journal"), on_discard=reasons.append)
        for pid in range(200):
            sink.consume(denial(pid))
        assert sink.discarded["disk_full"] > 0 and set(reasons) == {"disk_full"}
        assert sink.lines_written + sink.discarded["disk_full"] == 200
        os.unlink(filler)
        for pid in range(200, 210):
            sink.consume(denial(pid))
        sink.close()
        read = read_journal(os.path.join(where, "journal"))
        got = [e.process.pid for e in read.events]
        assert got[-10:] == list(range(200, 210))
        assert len(got) == sink.lines_written and read.lost_total <= 1
    finally:
        subprocess.run(["umount", "-l", where], check=False)
