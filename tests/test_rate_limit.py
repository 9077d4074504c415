"""Per-container limit on distinct denial events: bounded, and every drop counted."""

from __future__ import annotations

import json
import os
import threading

import pytest

from tracer.event import Event, Node, Process, UserNs
from tracer.pipeline import Pipeline
from tracer.rate_limit import RateLimiter, bucket_key


def denial(pid: int, cgroup_id: int = 0, uid: int = 1000, userns: int = 0, level: int = 0) -> Event:
    return Event(time=0.0, sensor="test", syscall="openat", errno=13, key=f"{pid}",
                 process=Process(pid=pid, tid=pid, uid=uid, cgroup_id=cgroup_id,
                                 userns=UserNs(userns, level, 0)),
                 node=Node(path=f"/dev/nvidia-{pid}".encode()))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_bucket_is_the_cgroup_else_the_userns_else_the_uid():
    assert bucket_key(denial(1, cgroup_id=77)) == ("cgroup", 77)
    assert bucket_key(denial(1, cgroup_id=1, userns=4026532000, level=1)) == ("userns", 4026532000)
    assert bucket_key(denial(1, cgroup_id=1, uid=5)) == ("uid", 5)


def test_burst_then_rate_per_container():
    clock = Clock()
    limiter = RateLimiter(per_second=10, burst=5, clock=clock)
    noisy = [limiter.allow(denial(i, cgroup_id=50)) for i in range(20)]
    assert noisy.count(True) == 5
    assert limiter.allow(denial(99, cgroup_id=51))  # another container is not affected
    clock.now = 1.0  # ten more tokens, capped at the burst of five
    assert [limiter.allow(denial(i, cgroup_id=50)) for i in range(20)].count(True) == 5
    clock.now = 1.1
    assert [limiter.allow(denial(i, cgroup_id=50)) for i in range(20)].count(True) == 1


def test_buckets_are_bounded():
    limiter = RateLimiter(per_second=1, burst=1, max_buckets=100)
    for cg in range(1000):
        limiter.allow(denial(cg, cgroup_id=cg + 2))
    assert len(limiter._buckets) == 100


class ListSensor:
    """Recorded events as a sensor: the subject here is our pipeline, not the kernel."""

    def __init__(self, events: list[Event]) -> None:
        self._events = events

    def start(self) -> None:
        pass

    def events(self, stop: threading.Event):
        yield from self._events

    def stats(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


class Collect:
    def __init__(self) -> None:
        self.seen: list[Event] = []

    def consume(self, event: Event) -> None:
        self.seen.append(event)


def test_pipeline_counts_what_the_limit_drops():
    events = [denial(i, cgroup_id=60) for i in range(300)] + [denial(1000, cgroup_id=61)]
    sink = Collect()
    summary = Pipeline(ListSensor(events), [], [sink],
                       rate_limiter=RateLimiter(per_second=0.001, burst=100)).run(threading.Event())
    assert len(sink.seen) == 101  # 100 of the burst, plus the other container
    assert summary.sensor_stats["dropped_rate_limited"] == 200
    assert summary.dropped == 200 and "rate limited 200" in summary.line()


@pytest.mark.kernel
def test_watch_applies_the_configured_limit(tmp_path):
    from tests.support.daemon_proc import write_config
    from tests.support.nodes import NodeSpec, make_node, unique
    from tests.test_watch_cli import start_watch, stop_watch
    import subprocess
    import time

    config = write_config(str(tmp_path), {"pipeline": {"rate_limit_per_cgroup": 1,
                                                       "rate_limit_burst": 20}})
    base = f"/dev/nvidia-{unique()}"
    nodes = [f"{base}-{i}" for i in range(120)]
    for i, node in enumerate(nodes):
        make_node(node, NodeSpec(major=195, minor=i, mode=0o600))
    proc = start_watch("--json", "--no-explain", "--no-nodes", "--standalone", "--config", config)
    try:
        code = "import os,sys\nfor p in sys.argv[1:]:\n  try: os.open(p, 0)\n  except OSError: pass"
        subprocess.run(["setpriv", "--reuid=1830", "--regid=1830", "--clear-groups",
                        "/usr/bin/python3", "-c", code, *nodes], check=True)
        time.sleep(2.0)
    finally:
        out, err = stop_watch(proc)
        for node in nodes:
            os.unlink(node)
    mine = [json.loads(l) for l in out.splitlines() if base in l]
    denials = [e for e in mine if e["kind"] == "denial"]
    assert 20 <= len(denials) <= 25, len(denials)
    limited = int(err.split("rate limited ")[1].split(";")[0])
    assert limited + len(denials) == 120, err
