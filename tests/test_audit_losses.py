"""Audit losses are counted by reason, for real: a daemon on the audit sensor, the
kernel's backlog limit lowered to 1 with no wait, a burst of real denials.  The
records the kernel dropped (AUDIT_GET `lost`) must show in
gputrace_events_discarded_total{reason="audit_kernel_lost"} and in the daemon's
summary line, exactly as the kernel counted them; the kernel's audit settings
are given back afterwards (and checked).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from typing import Iterator

import pytest

from tests.support.daemon_proc import DaemonProcess, service_config, write_config
from tests.support.nodes import NodeSpec, make_node, unique
from tests.test_daemon_service import metric_samples
from tracer.sensors.audit_marshal import AuditSocket
from tracer.sinks.journal import read_journal

pytestmark = pytest.mark.kernel

AUDIT_STATUS_BACKLOG_LIMIT = 0x0010
AUDIT_STATUS_BACKLOG_WAIT_TIME = 0x0020
DENIED_UID = 1797
OPENER = ("import sys\nfor _ in range(int(sys.argv[2])):\n    try:\n        open(sys.argv[1])\n"
          "    except OSError:\n        pass\n")
LOCK = os.path.join(os.path.dirname(__file__), "test_audit_live.py")  # shared with those tests


def status() -> dict[str, int]:
    with AuditSocket() as sock:
        return sock.get_status()


def set_backlog(limit: int, wait: int) -> None:
    with AuditSocket() as sock:
        sock.set_status(AUDIT_STATUS_BACKLOG_LIMIT, backlog_limit=limit)
        sock.set_status(AUDIT_STATUS_BACKLOG_WAIT_TIME, backlog_wait_time=wait)


@contextlib.contextmanager
def tiny_backlog() -> Iterator[None]:
    """backlog_limit=1 and no waiting: the kernel drops what kauditd has not sent yet."""
    before = status()
    set_backlog(1, 0)
    try:
        yield
    finally:
        set_backlog(before["backlog_limit"], before["backlog_wait_time"])
        after = status()
        assert (after["backlog_limit"], after["backlog_wait_time"]) == \
            (before["backlog_limit"], before["backlog_wait_time"])


@pytest.fixture
def exclusive_audit() -> Iterator[dict[str, int]]:
    with open(LOCK) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = status()
        yield before
        after = status()
        assert (after["enabled"], after["pid"], after["backlog_limit"],
                after["backlog_wait_time"]) == (before["enabled"], before["pid"],
                                                before["backlog_limit"], before["backlog_wait_time"])


def burst(node: str, processes: int, opens: int) -> None:
    children = [subprocess.Popen(["setpriv", f"--reuid={DENIED_UID}", f"--regid={DENIED_UID}",
                                  "--clear-groups", sys.executable, "-c", OPENER, node, str(opens)])
                for _ in range(processes)]
    for child in children:
        assert child.wait(60) == 0


def journaled(base: str, node: str) -> list:
    return [e for e in read_journal(os.path.join(base, "state", "journal")).events
            if e.kind == "denial" and e.node.path == node.encode()]


def discarded(daemon: DaemonProcess, reason: str) -> float:
    samples = metric_samples(daemon.scrape(), "gputrace_events_discarded_total")
    return samples[(("intentional", "false"), ("reason", reason))]


def test_forced_kernel_loss_is_counted_in_metrics_and_summary(tmp_path, exclusive_audit) -> None:
    base = str(tmp_path)
    cfg = write_config(base, service_config(base, sensor={"kind": "audit", "watch_nodes": False},
                                            journal={"fsync_interval_s": 0}))
    node = f"/dev/nvidia-{unique()}"
    make_node(node, NodeSpec(major=195, minor=79, mode=0o600))
    daemon = DaemonProcess(cfg)
    try:
        daemon.start()
        assert "sensor audit" in daemon.stderr
        time.sleep(0.5)  # the reader registers as the audit consumer
        assert discarded(daemon, "audit_kernel_lost") == 0
        lost_before = status()["lost"]
        with tiny_backlog():
            burst(node, processes=4, opens=400)
        lost = status()["lost"] - lost_before
        assert lost > 0, "the burst never overflowed the backlog: the test proves nothing"
        deadline = time.monotonic() + 20  # the sensor re-reads `lost` every 5 s
        while discarded(daemon, "audit_kernel_lost") < lost and time.monotonic() < deadline:
            time.sleep(0.5)
        assert discarded(daemon, "audit_kernel_lost") == lost
        counters = metric_samples(daemon.scrape(), "gputrace_sensor_counter_total")
        parse_errors = counters.get((("counter", "parse_errors"), ("sensor", "audit")), 0)
        print({k[0][1]: v for k, v in counters.items()})
        assert discarded(daemon, "audit_parse_error") == parse_errors
        # with the backlog restored, the sensor that lost records still sees a new denial
        # (how many of the burst got through under backlog 1 is the scheduler's choice)
        before = {e.process.pid for e in journaled(base, node)}
        burst(node, processes=1, opens=1)
        deadline = time.monotonic() + 20
        while not {e.process.pid for e in journaled(base, node)} - before \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        assert {e.process.pid for e in journaled(base, node)} - before, "no denial after the loss"
        assert daemon.stop() == 0
        summary = [line for line in daemon.stderr_lines if "stopped:" in line][-1]
        assert f"audit records lost by the kernel {lost}," in summary, summary
        assert f"parse errors {int(parse_errors)}," in summary, summary
        seen = journaled(base, node)
        print(f"burst of 1600 denied opens: kernel lost {lost} records, "
              f"parse errors {parse_errors}, denials journaled {len(seen)}; {summary.strip()}")
        assert len(seen) < 1600  # not all got through
    finally:
        daemon.kill()
        os.unlink(node)


def test_socket_overflow_is_counted(exclusive_audit) -> None:
    """A reader that falls behind with a small socket buffer: the kernel cannot queue
    the multicast copies, the socket reports ENOBUFS, `socket_overflows` counts it
    (pyroute2 alone would swallow it) and the sensor keeps reading: a denial after
    the overflow still arrives (it used to end the sensor with "ENOBUFS")."""
    import threading

    from tracer.sensors.audit_pipeline import AuditConfig
    from tracer.sensors.audit_sensor import AuditSensor

    node = f"/dev/nvidia-{unique()}"
    make_node(node, NodeSpec(major=195, minor=80, mode=0o600))
    sensor = AuditSensor(AuditConfig(read_mode="multicast", rcvbuf_bytes=4096))
    stop = threading.Event()
    reading = threading.Event()
    slow = threading.Event()
    events = []

    def read() -> None:
        for event in sensor.events(stop):
            events.append(event)
            reading.set()
            slow.wait()  # stop reading until the burst is over: the socket fills up

    try:
        sensor.start()
        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.5)
        burst(node, processes=1, opens=1)
        assert reading.wait(10), "the first denial never arrived"
        burst(node, processes=4, opens=200)
        slow.set()
        time.sleep(1.0)
        seen = len(events)
        after = subprocess.Popen(["setpriv", f"--reuid={DENIED_UID}", f"--regid={DENIED_UID}",
                                  "--clear-groups", sys.executable, "-c", OPENER, node, "1"])
        after.wait(30)
        deadline = time.monotonic() + 10
        while not any(e.process.pid == after.pid for e in events[seen:]) and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        assert any(e.process.pid == after.pid for e in events), "the sensor stopped reading"
        stop.set()
        reader.join(20)
        stats = sensor.stats()
    finally:
        stop.set()
        slow.set()
        sensor.close()
        os.unlink(node)
    print(f"multicast reader with a 4 KiB buffer, 800 denied opens: {stats}")
    assert stats["socket_overflows"] >= 1
