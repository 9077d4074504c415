"""Bounds: a denial storm of random paths under a GPU prefix, from an
unprivileged process, cannot grow the watching process without limit.

What keeps it bounded, and the numbers: the kernel folds repeats into an
aggregation table of BpfConfig.aggregate_max (16384) keys and beyond that sends
events it cannot fold; the ring buffer (BpfConfig.ringbuf_pages, 4 MiB) drops
what does not fit, counted; the pipeline queue (Pipeline.queue_size, 10000
events) drops what the consumer cannot keep up with, counted.  Documented bound
checked here: one storm of 50,000 distinct denied paths grows the RSS of
`gputrace watch --json` by less than STORM_GROWTH_MIB, and a second identical
storm by less than REPEAT_GROWTH_MIB (measured on the 2-core VM, from a
167 MiB start: +54..65 MiB after the first storm, +25..49 MiB after the second,
while another benchmark was storming the same prefix)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests.fuzz.denial_storm import denied_dir, storm

pytestmark = pytest.mark.kernel
GPUTRACE = [sys.executable, "-m", "tracer"]
STORM_PATHS = 50_000
STORM_GROWTH_MIB = 256
REPEAT_GROWTH_MIB = 128  # not tighter: see the xfail test_sensor_forgets_keys_of_exited_processes


def rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS")


def wait_quiet(path: str, limit_s: float = 120.0) -> None:
    """Until the watcher's output stops growing (it has drained the storm)."""
    last, deadline = -1, time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(1.0)
        size = os.path.getsize(path)
        if size == last:
            return
        last = size


def test_denial_storm_keeps_watch_memory_bounded() -> None:
    with tempfile.NamedTemporaryFile(prefix="gttest-watch-") as out:
        watch = subprocess.Popen(GPUTRACE + ["watch", "--json"], stdout=out,
                                 stderr=subprocess.PIPE)
        try:
            assert watch.stderr is not None
            started = time.monotonic()
            while b"watching" not in watch.stderr.readline():
                assert watch.poll() is None and time.monotonic() - started < 60
            time.sleep(1.0)
            baseline = rss_mib(watch.pid)
            growth = []
            with denied_dir() as base:
                for _ in range(2):
                    result = storm(base, STORM_PATHS)
                    assert result.failures == {"EACCES": STORM_PATHS}
                    wait_quiet(out.name)
                    growth.append(rss_mib(watch.pid) - baseline - sum(growth))
        finally:
            watch.send_signal(signal.SIGINT)
            _, err = watch.communicate(timeout=300)
        summary = err.decode().strip().splitlines()[-1]
        print(f"\nwatch RSS {baseline} MiB at start, +{growth[0]} MiB after the first "
              f"{STORM_PATHS} denied paths, +{growth[1]} MiB after the second; {summary}")
        assert watch.returncode == 0, err
        assert os.path.getsize(out.name) > 0
        assert growth[0] < STORM_GROWTH_MIB
        assert growth[1] < REPEAT_GROWTH_MIB
        assert "dropped" in summary
