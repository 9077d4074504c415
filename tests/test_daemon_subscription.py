"""The event socket: permissions (root + group, 0660; root-only without the group),
attach() when no daemon runs, slow subscribers bounded with their drops counted."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from tests.support.daemon_proc import REPO
from tests.support.nodes import throwaway_group, throwaway_user
from tests.support.sample_events import denial
from tracer.errors import BadInput
from tracer.sinks.subscription import SubscriptionSink
from tracer.subscribe import attach


def test_attach_without_a_daemon_is_none(tmp_path):
    assert attach(str(tmp_path / "events.sock")) is None
    (tmp_path / "plain").write_text("")
    assert attach(str(tmp_path / "plain")) is None  # not a socket: connection refused


def test_socket_that_is_not_gputrace_is_a_clear_error(tmp_path):
    import socket
    path = str(tmp_path / "other.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    def answer():
        conn, _ = server.accept()
        conn.sendall(b"HTTP/1.0 200 OK\n")
        conn.close()
    threading.Thread(target=answer, daemon=True).start()
    with pytest.raises(BadInput, match="not a gputrace daemon socket"):
        attach(path)
    server.close()


def test_missing_group_means_root_only(tmp_path):
    said = []
    sink = SubscriptionSink(str(tmp_path / "e.sock"), group="gtnosuchgroup0", say=said.append)
    try:
        assert stat.S_IMODE(os.stat(sink.path).st_mode) == 0o600 and sink.mode == 0o600
        assert said == [f"group 'gtnosuchgroup0' does not exist: socket {sink.path} is root-only (0600)"]
    finally:
        sink.close()


ATTACH_AS = ("import sys; sys.path.insert(0, {repo!r}); from tracer.subscribe import attach; "
             "from tracer.errors import GputraceError\n"
             "try:\n    sub = attach({path!r}); print('attached', sub.daemon_pid)\n"
             "except GputraceError as e:\n    print('refused', e)")


def attach_as(uid: int, gid: int, groups: list[int], path: str) -> str:
    def drop() -> None:
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    done = subprocess.run([sys.executable, "-c", ATTACH_AS.format(repo=REPO, path=path)],
                          capture_output=True, text=True, preexec_fn=drop, timeout=30, cwd="/")
    return done.stdout.strip() or done.stderr.strip()


@pytest.mark.kernel
def test_group_members_may_subscribe_others_may_not():
    public = tempfile.mkdtemp(prefix="gttest-sock-")  # searchable by everyone, unlike tmp_path
    os.chmod(public, 0o755)
    with throwaway_group() as (name, gid), throwaway_user(groups=(name,)) as member, \
            throwaway_user() as outsider:
        sink = SubscriptionSink(os.path.join(public, "e.sock"), group=name)
        try:
            st = os.stat(sink.path)
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, gid)
            assert attach_as(member.uid, member.gid, [gid], sink.path) == f"attached {os.getpid()}"
            refused = attach_as(outsider.uid, outsider.gid, [], sink.path)
            assert refused.startswith("refused a gputrace daemon is running but")
            assert f"join group {name}, or run as root" in refused
        finally:
            sink.close()
            shutil.rmtree(public)


def test_slow_subscriber_is_bounded_and_its_drops_counted(tmp_path):
    drops = []
    sink = SubscriptionSink(str(tmp_path / "e.sock"), subscriber_buffer=8, on_drop=drops.append)
    sub = attach(sink.path)
    assert sub is not None
    while sink.subscriber_count == 0:
        time.sleep(0.01)
    big = denial(1, comm=b"x" * 15, **{"padding": "p" * 8000})
    sent = 3000
    started = time.monotonic()
    for i in range(sent):  # the subscriber reads nothing meanwhile
        big.count = i + 1
        sink.consume(big)
    assert time.monotonic() - started < 5, "a slow subscriber stalled the pipeline"
    assert sum(drops) > 0
    stop = threading.Event()
    received = []
    reader = threading.Thread(target=lambda: received.extend(sub.events(stop)), daemon=True)
    reader.start()
    time.sleep(0.5)
    sink.close()  # flushes what was queued, then ends the stream
    reader.join(10)
    assert not reader.is_alive()
    assert len(received) + sub.dropped == sent and sub.dropped == sum(drops)
    counts = [e.count for e in received]
    assert counts == sorted(counts) and counts[0] == 1  # order kept, nothing duplicated
