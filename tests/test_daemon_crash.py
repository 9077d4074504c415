"""kill -9 in the middle of a burst: the journal reads back whole but for at most the
line being written, that loss is counted, and a restarted daemon carries on."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from tests.support import actor
from tests.support.daemon_proc import DaemonProcess, run_cli, service_config, write_config
from tests.support.nodes import unique
from tracer.sinks.journal import iter_lines, journal_files, read_journal

pytestmark = pytest.mark.kernel
BURST = 1800  # the plan is one argv string: at most 128 KiB


@pytest.fixture
def locked_dir():
    """/dev/nvidia-gttest-*/ that uid 1791 may not search: every open under it is a
    distinct EACCES denial (one journal line each), no node needed."""
    path = f"/dev/nvidia-{unique()}"
    os.mkdir(path, 0o700)
    yield path
    shutil.rmtree(path)


def lines_in(path: str) -> int:
    with open(path, "rb") as handle:
        return handle.read().count(b"\n")


def test_kill_9_mid_burst_loses_at_most_one_counted_line(tmp_path, locked_dir):
    base = str(tmp_path)
    config = write_config(base, service_config(base, socket={"group": f"gt{unique()}"},
                                               journal={"fsync_interval_s": 0}))
    journal_dir = os.path.join(base, "state", "journal")
    current = os.path.join(journal_dir, "current.jsonl")
    daemon = DaemonProcess(config).start()
    try:
        assert "root-only (0600)" in daemon.stderr  # that group does not exist
        burst = actor.start({"uid": 1791, "gid": 1791, "groups": [], "await_go": True,
                             "actions": [{"op": "open", "path": f"{locked_dir}/n{i}"}
                                         for i in range(BURST)]}, timeout=120)
        try:
            burst.truth()
            burst.go()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if os.path.exists(current) and lines_in(current) > 60:
                    break  # (in lines: an explained event's line size keeps growing)
                time.sleep(0.005)
            daemon.kill()  # SIGKILL while lines are being written
            result = burst.wait()
        finally:
            burst.release()
    finally:
        daemon.kill()
    assert result.check().errnos()[:5] == [13] * 5

    lines = list(iter_lines(journal_dir))
    before = read_journal(journal_dir)
    assert len(before.events) > 50, "the kill came before the burst reached the journal"
    assert before.lost_total <= 1
    assert len(before.events) + before.lost_total == len(lines)
    for _path, _number, raw, complete in lines[:-1]:
        assert complete and json.loads(raw)  # every earlier line is whole
    paths = [e.node.path for e in before.events if e.process.pid == burst.pid]
    assert len(paths) == len(set(paths)) and paths == sorted(paths, key=lambda p: int(p.rsplit(b"n", 1)[1]))

    restarted = DaemonProcess(config).start()  # stale lock and socket left by the kill
    try:
        after_pid = actor.spawn({"uid": 1791, "gid": 1791, "groups": [],
                                 "actions": [{"op": "open", "path": f"{locked_dir}/after"}]}).check().pid
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if any(e.process.pid == after_pid for e in read_journal(journal_dir).events):
                break
            time.sleep(0.1)
        report = run_cli("report", "--config", config, "--format", "json")
    finally:
        assert restarted.stop() == 0
    after = read_journal(journal_dir)
    assert after.lost_total == before.lost_total
    assert [e.node.path for e in after.events[:len(before.events)]] == \
        [e.node.path for e in before.events]
    assert any(e.process.pid == after_pid for e in after.events)
    assert journal_files(journal_dir) == [current]
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["journal"]["lost_lines"] == before.lost_total
