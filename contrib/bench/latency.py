"""Latency from a denied open's return to its event on the daemon socket; start-up cost.

The probe (syscall_loop probe) forks one short-lived process per sample, so
every sample is a new (process, node) key that gputrace reports at once
instead of folding it into an aggregate; each child prints CLOCK_REALTIME
right after its open fails.  The subscriber stamps each line on arrival.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

from contrib.bench.machine import BenchHost, memory_kib
from contrib.bench.processes import REPO, Gputrace
from contrib.bench.storm import Storm


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[rank]


def probe_samples(host: BenchHost, exe: str, node: str, samples: int, gap_ms: int) -> dict[int, float]:
    done = subprocess.run([exe, "probe", node, str(samples), str(gap_ms)], capture_output=True,
                          text=True, check=True, **host.user_popen_kwargs())
    out = {}
    for line in done.stdout.splitlines():
        pid, stamp = line.split()
        if stamp != "error":
            out[int(pid)] = float(stamp)
    return out


def measure(host: BenchHost, exe: str, kind: str, samples: int, gap_ms: int, storm_procs: int,
            say: Callable[[str], None]) -> list[dict]:
    gt = Gputrace(kind, host.workdir, tag="latency")
    gt.start(tap=True)
    results = []
    try:
        node = host.make_node("latency")
        for condition, procs in (("idle", 0), (f"storm K={storm_procs}", storm_procs)):
            storm: Optional[Storm] = None
            if procs:
                seconds = samples * gap_ms / 1000 + 3
                storm = Storm(host, exe, procs, seconds)
                storm.start()
                time.sleep(0.5)
            sent = probe_samples(host, exe, node, samples, gap_ms)
            time.sleep(1.0)
            storm_rate = storm.wait().rate if storm else 0.0
            assert gt.tap is not None
            arrived = {}
            for when, event in gt.tap.snapshot():
                pid = event.get("process", {}).get("pid")
                if event.get("kind") == "denial" and pid in sent and pid not in arrived:
                    arrived[pid] = when
            lat_ms = [(arrived[pid] - t) * 1000 for pid, t in sent.items() if pid in arrived]
            row = {"condition": condition, "samples": len(sent), "received": len(lat_ms),
                   "p50_ms": round(percentile(lat_ms, 50), 2),
                   "p99_ms": round(percentile(lat_ms, 99), 2),
                   "max_ms": round(max(lat_ms), 2) if lat_ms else None,
                   "mean_ms": round(statistics.fmean(lat_ms), 2) if lat_ms else None,
                   "storm_denials_per_s": round(storm_rate)}
            say(f"latency {condition}: p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms "
                f"({row['received']}/{row['samples']})")
            results.append(row)
    finally:
        gt.stop()
    return results


def startup(host: BenchHost, kind: str, runs: int, idle_s: float,
            say: Callable[[str], None]) -> dict:
    """Time from starting the daemon to its readiness line (probe attached); idle RSS."""
    ready: list[float] = []
    rss: list[float] = []
    anon: list[float] = []
    file_backed: list[float] = []
    hwm: list[float] = []
    label, hook_notes = "", set[str]()
    for i in range(runs):
        gt = Gputrace(kind, host.workdir, tag=f"startup{i}")
        gt.start()
        try:
            assert gt.process is not None
            ready.append(gt.process.ready_s)
            label = gt.label
            hook_notes.update(line.strip().removeprefix("gputrace: ")
                              for line in gt.process.stderr_lines if "fexit" in line)
            time.sleep(idle_s)
            memory = memory_kib(gt.pid)
            rss.append(memory.get("VmRSS", 0) / 1024)
            anon.append(memory.get("RssAnon", 0) / 1024)
            file_backed.append(memory.get("RssFile", 0) / 1024)
            hwm.append(memory.get("VmHWM", 0) / 1024)
        finally:
            gt.stop()
        say(f"start-up {i + 1}/{runs}: ready in {ready[-1]:.2f} s, idle RSS {rss[-1]:.0f} MiB")
    return {"tracer": label, "runs": runs, "ready_s": [round(v, 2) for v in ready],
            "ready_median_s": round(statistics.median(ready), 2),
            "ready_max_s": round(max(ready), 2),
            "idle_rss_mib": round(statistics.median(rss), 1),
            "idle_rss_anon_mib": round(statistics.median(anon), 1),
            "idle_rss_file_mib": round(statistics.median(file_backed), 1),
            "peak_rss_mib": round(max(hwm), 1), "idle_wait_s": idle_s,
            "hook_notes": sorted(hook_notes), "phases": startup_phases()}


def startup_phases() -> list[dict]:
    """contrib.bench.startup_cost in a fresh interpreter: where time and memory go."""
    done = subprocess.run([sys.executable, "-m", "contrib.bench.startup_cost"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        return [{"phase": "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1]}]
    return json.loads(done.stdout)["phases"]
