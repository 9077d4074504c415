"""The daemon as a service: real denials while `gputrace daemon` runs as a subprocess,
seen with the same counts in the journal, the socket stream, /metrics and the report.

One daemon serves the whole module (each start compiles the BPF program).  Other
tests on this machine may cause denials of their own while it runs, so exact
checks are made per actor pid, and whole-daemon totals are compared once they
stop moving.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
import time
from collections import Counter

import jsonschema
import pytest

from tests.support import actor
from tests.support.daemon_proc import DaemonProcess, run_cli, service_config, write_config
from tests.support.nodes import NodeSpec, make_node, throwaway_group, unique
from tracer.event import Event
from tracer.sinks.journal import read_journal
from tracer.sinks.metrics import denial_labels
from tracer.sinks.report import aggregates, report_schema
from tracer.subscribe import attach

pytestmark = pytest.mark.kernel
DENIED_UID = 1790


def exact_total(events: list[Event], pid: int | None = None, since: float = 0.0) -> int:
    """Denials counted exactly (repeats included), of one pid or of aggregates that
    began at or after `since`."""
    return sum(a.in_window for a in aggregates(events, None)
               if (pid is None or a.pid == pid) and a.first_time >= since)


def metric_samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


class Stream:
    """A subscriber collecting the daemon's stream in a thread."""

    def __init__(self, socket_path: str) -> None:
        sub = attach(socket_path)
        assert sub is not None, "the daemon's socket did not answer"
        self.sub = sub
        self.attached_at = time.time()  # every denial after this reaches the stream
        self.events: list[Event] = []
        self.ended = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for event in self.sub.events(self.stop):
            self.events.append(event)
        self.ended.set()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("gttest-daemon"))
    with throwaway_group() as (group_name, gid):
        cfg = service_config(base, socket={"group": group_name},
                             journal={"fsync_interval_s": 0})
        path = write_config(base, cfg)
        daemon = DaemonProcess(path).start()
        node = f"/dev/nvidia-{unique()}"
        make_node(node, NodeSpec(major=195, minor=77, mode=0o600))
        stream = Stream(os.path.join(base, "run", "events.sock"))
        try:
            yield {"daemon": daemon, "base": base, "cfg": cfg, "config_path": path,
                   "node": node, "stream": stream, "group": (group_name, gid)}
        finally:
            stream.stop.set()
            daemon.kill()
            os.unlink(node)


def journal_events(service) -> list[Event]:
    return read_journal(os.path.join(service["base"], "state", "journal")).events


def wait_until(check, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what} not reached in {timeout}s (last: {last!r})")


def deny(service, count: int) -> int:
    """`count` denied opens by a process that stays alive until the journal has them
    (so enrichment sees it live: the node class comes from its stat, 195:77)."""
    held = actor.start({"uid": DENIED_UID, "gid": DENIED_UID, "groups": [], "hold": True,
                        "actions": [{"op": "open_loop", "path": service["node"], "count": count}]})
    try:
        res = held.wait().check()
        assert res.results[0]["failures"] == {"EACCES": count}
        wait_until(lambda: exact_total(journal_events(service), res.pid) == count,
                   what=f"journal count {count}")
    finally:
        held.release()
    return res.pid


def test_socket_is_root_and_group_0660(service):
    st = os.stat(os.path.join(service["base"], "run", "events.sock"))
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (0, service["group"][1])
    assert "(0660)" in service["daemon"].stderr


def test_journal_stream_metrics_and_report_agree(service):
    daemon, stream = service["daemon"], service["stream"]
    permitted = actor.spawn({"actions": [{"op": "open_loop", "path": service["node"], "count": 3}]})
    assert permitted.check().results[0]["failures"] == {"ENXIO": 3}  # no driver: not a denial
    pid = deny(service, 7)
    wait_until(lambda: exact_total(stream.events, pid) == 7, what="stream count 7")
    mine = [e for e in journal_events(service) if e.process.pid == pid and e.kind == "denial"]
    assert len(mine) == 1 and mine[0].errno_name == "EACCES" and mine[0].process.uid == DENIED_UID
    assert mine[0].verdict and mine[0].verdict["reason"] and mine[0].verdict["fixes"]
    assert permitted.pid not in {e.process.pid for e in journal_events(service)}
    streamed = next(e for e in stream.events if e.process.pid == pid and e.kind == "denial")
    assert streamed.verdict == mine[0].verdict  # the socket carries the verdict too

    labels = denial_labels(mine[0])
    assert labels[0] == "nvidia-gpu" and labels[1] == "EACCES" and labels[3] == "none"
    key = tuple(sorted(zip(("node_class", "errno", "reason", "container_engine"), labels)))

    def settled():  # whole-daemon totals, once no event is in flight between the reads
        before = metric_samples(daemon.scrape(), "gputrace_denials_total")
        events = journal_events(service)
        streamed = exact_total(stream.events, since=stream.attached_at)
        after = metric_samples(daemon.scrape(), "gputrace_denials_total")
        if before == after and sum(after.values()) == exact_total(events) and \
                streamed == exact_total(events, since=stream.attached_at):
            return after, exact_total(events)
        return None
    # other tests on this machine may be causing denials too: wait for a quiet moment
    samples, total = wait_until(settled, timeout=90, what="metrics, journal and stream agreeing")
    assert samples[key] >= 7
    by_labels = Counter()
    for agg in aggregates(journal_events(service), None):
        by_labels[tuple(sorted(zip(("node_class", "errno", "reason", "container_engine"),
                                   agg.labels)))] += agg.in_window
    assert dict(by_labels) == {k: v for k, v in samples.items()}

    metrics = daemon.scrape()
    assert 'gputrace_probe_attached{hook="tracepoint",sensor="bpf",transport="ringbuf"} 1.0' in metrics
    assert metric_samples(metrics, "gputrace_subscribers")[()] == 1
    assert metric_samples(metrics, "gputrace_last_denial_timestamp_seconds")[()] >= mine[0].time
    assert metric_samples(metrics, "gputrace_build_info")
    kernel = metric_samples(metrics, "gputrace_sensor_counter_total")
    assert kernel[(("counter", "denials"), ("sensor", "bpf"))] >= 7
    discarded = metric_samples(metrics, "gputrace_events_discarded_total")
    assert discarded[(("intentional", "true"), ("reason", "rate_aggregated"))] >= 6
    assert discarded[(("intentional", "false"), ("reason", "queue_full"))] == 0
    assert discarded[(("intentional", "false"), ("reason", "subscriber_queue_full"))] == 0
    for line in metrics.splitlines():
        assert "pid=" not in line and "path=" not in line and "container_id" not in line

    done = run_cli("report", "--config", service["config_path"], "--format", "json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    jsonschema.validate(report, report_schema())
    assert report["totals"]["denials"] >= total
    cause = next(c for c in report["causes"] if c["reason"] == labels[2])
    proc = next(p for p in cause["processes"] if p["pid"] == pid)
    assert proc["count"] == 7 and proc["uid"] == DENIED_UID and proc["container"] is None
    assert any(n["path"] == service["node"] for n in cause["nodes"])
    assert cause["fixes"] and cause["fixes"][0]["command"] == mine[0].verdict["fixes"][0]["command"]
    md = run_cli("report", "--config", service["config_path"], "--format", "markdown",
                 "--since", "10m")
    assert md.returncode == 0, md.stderr
    assert f"`{labels[2]}`" in md.stdout and f"| {pid} |" in md.stdout
    assert service["node"] in md.stdout


def test_second_daemon_is_refused_with_one_line(service):
    done = run_cli("daemon", "--config", service["config_path"], timeout=60)
    assert done.returncode == 6, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "already running" in lines[0] and str(service["daemon"].proc.pid) in lines[0]


def test_metrics_port_in_use_is_one_line(service, tmp_path):
    cfg = service_config(str(tmp_path), metrics={"port": service["daemon"].metrics_port})
    done = run_cli("daemon", "--config", write_config(str(tmp_path), cfg), timeout=60)
    assert done.returncode == 4, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("gputrace: error: ") and "already in use" in lines[-1]
    assert "Traceback" not in done.stderr


def test_sighup_reloads_and_bad_config_is_refused(service):
    daemon = service["daemon"]
    with open(service["config_path"], "a", encoding="utf-8") as handle:
        handle.write("bogus_key: 1\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_stderr("reload refused")
    assert "bogus_key" in daemon.stderr and daemon.proc.poll() is None

    cfg = dict(service["cfg"], journal={"fsync_interval_s": 0, "max_file_bytes": 4096,
                                        "max_files": 2})
    write_config(service["base"], cfg)
    daemon.signal(signal.SIGHUP)
    daemon.wait_stderr("configuration reloaded")
    assert "reloading the probe" not in daemon.stderr  # sensor unchanged: no recompile
    pid = deny(service, 2)
    assert service["stream"].sub.dropped == 0
    wait_until(lambda: exact_total(service["stream"].events, pid) == 2, what="stream after reload")
    for _ in range(6):  # enough lines to pass 4 KiB several times
        deny(service, 1)
    journal_dir = os.path.join(service["base"], "state", "journal")
    names = wait_until(lambda: [n for n in os.listdir(journal_dir) if n.startswith("journal-")]
                       or None, what="a rotated journal file")
    wait_until(lambda: len(os.listdir(journal_dir)) <= 3, what="retention of 2 rotated files")
    assert names

    cfg["sensor"] = dict(cfg["sensor"], errnos=["EACCES", "EPERM", "ENXIO"])
    write_config(service["base"], cfg)
    daemon.signal(signal.SIGHUP)
    daemon.wait_stderr("reloading the probe")
    wait_until(lambda: daemon.stderr.count("configuration reloaded") == 2, what="second reload")
    permitted = actor.spawn({"actions": [{"op": "open", "path": service["node"]}]}).check()
    assert permitted.errnos() == [6]  # ENXIO: allowed, no driver; now recorded too
    found = wait_until(lambda: [e for e in journal_events(service) if e.process.pid == permitted.pid],
                       what="the ENXIO open in the journal")
    assert found[0].errno_name == "ENXIO"


def test_sigterm_drains_and_flushes(service):
    daemon, stream = service["daemon"], service["stream"]
    burst = actor.start({"uid": DENIED_UID, "gid": DENIED_UID, "groups": [], "hold": True,
                         "actions": [{"op": "open_loop", "path": service["node"], "count": 500}]})
    result = burst.wait()
    daemon.signal(signal.SIGTERM)  # while the burst's repeats are still only in the kernel map
    assert daemon.stop() == 0
    burst.release()
    assert result.results[0]["failures"] == {"EACCES": 500}
    assert exact_total(journal_events(service), burst.pid) == 500
    assert stream.ended.wait(10), "the stream did not end when the daemon stopped"
    assert exact_total(stream.events, burst.pid) == 500
    assert "stopped:" in daemon.stderr
    assert not os.path.exists(os.path.join(service["base"], "run", "events.sock"))

