"""Denial storm: K processes hammer denied opens of a GPU node for T seconds.

The processes count their own attempts; gputrace's count is read where a user
reads it (events on the daemon socket: the highest `count` per key, summed)
and must equal them.  The peer tool is run on the same storm and its printed
lines are compared with the attempts.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Optional

from contrib.bench.machine import BenchHost, cpu_seconds, memory_kib
from contrib.bench.processes import Gputrace
from contrib.bench.tracers import PeerTool

SETTLE_TIMEOUT_S = 6.0   # aggregation interval + sweep interval, with margin


@dataclass
class StormResult:
    attempts: int
    eacces: int
    other_failures: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.attempts / self.seconds if self.seconds else 0.0


class Storm:
    """K deny loops as the bench user, one node each, started together."""

    def __init__(self, host: BenchHost, exe: str, procs: int, seconds: float) -> None:
        self.host, self.exe, self.procs, self.seconds = host, exe, procs, seconds
        self.nodes = [host.make_node(f"storm{procs}-{i}") for i in range(procs)]
        self.running: list[subprocess.Popen] = []
        self.t0 = 0.0

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.running = [subprocess.Popen([self.exe, "deny", node, str(self.seconds)],
                                         stdout=subprocess.PIPE, text=True,
                                         **self.host.user_popen_kwargs())
                        for node in self.nodes]

    def wait(self) -> StormResult:
        totals = [0, 0, 0]
        for proc in self.running:
            out, _ = proc.communicate()
            attempts, eacces, other, _opened = (int(v) for v in out.split())
            for i, v in enumerate((attempts, eacces, other)):
                totals[i] += v
        return StormResult(totals[0], totals[1], totals[2], time.monotonic() - self.t0)


def storm_pids(events: list[tuple[float, dict]], nodes: list[str]) -> set[int]:
    """The loops run in children of the processes we start (see syscall_loop.c), so
    their pids are taken from the events on the storm's own nodes."""
    wanted = set(nodes)
    return {e["process"]["pid"] for _, e in events
            if (e.get("node") or {}).get("path") in wanted and "process" in e}


def labels_of(sample: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', sample.partition("{")[2]))


def discards(metrics: dict[str, float]) -> dict[str, int]:
    """Events discarded, by reason ("(intentional)" marks designed aggregation)."""
    out = {}
    for name, value in metrics.items():
        if name.startswith("gputrace_events_discarded_total{") and value:
            labels = labels_of(name)
            tag = " (intentional)" if labels.get("intentional") == "true" else ""
            out[labels.get("reason", "?") + tag] = int(value)
    return out


def sensor_counter(metrics: dict[str, float], counter: str) -> int:
    return int(sum(v for k, v in metrics.items()
                   if k.startswith("gputrace_sensor_counter_total{")
                   and labels_of(k).get("counter") == counter))


def gputrace_storm(host: BenchHost, exe: str, kind: str, procs: int, seconds: float,
                   say: Callable[[str], None]) -> dict:
    gt = Gputrace(kind, host.workdir, tag=f"storm{procs}")
    gt.start(tap=True)
    try:
        storm = Storm(host, exe, procs, seconds)
        before = gt.scrape()
        cpu0, w0 = cpu_seconds(gt.pid), time.monotonic()
        storm.start()
        result = storm.wait()
        cpu1, w1 = cpu_seconds(gt.pid), time.monotonic()
        assert gt.tap is not None
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while time.monotonic() < deadline:  # final counts arrive with the next sweep
            pids = storm_pids(gt.tap.snapshot(), storm.nodes)
            if gt.tap.counted_for(pids) >= result.eacces:
                break
            time.sleep(0.2)
        after = gt.scrape()
        memory = memory_kib(gt.pid)
    finally:
        summary = gt.stop()
    events = gt.tap.snapshot() if gt.tap else []
    pids = storm_pids(events, storm.nodes)
    counted = gt.tap.counted_for(pids) if gt.tap else 0
    delivered = sum(1 for _, e in events if e.get("process", {}).get("pid") in pids)
    others = len(events) - delivered  # denials of other processes on this host meanwhile
    say(f"storm K={procs} gputrace: {result.attempts} attempts, {counted} counted")
    return {
        "tracer": gt.label, "procs": procs, "seconds": round(result.seconds, 2),
        "attempts": result.attempts, "attempts_eacces": result.eacces,
        "attempts_other_errors": result.other_failures,
        "denials_per_s": round(result.rate), "counted_by_gputrace": counted,
        "exact": counted == result.eacces,
        "events_delivered": delivered, "events_from_other_processes": others,
        "kernel_denials_counter": sensor_counter(after, "denials") - sensor_counter(before, "denials"),
        "kernel_events_emitted": sensor_counter(after, "emitted") - sensor_counter(before, "emitted"),
        "kernel_count_updates": sensor_counter(after, "updates") - sensor_counter(before, "updates"),
        "discarded": {k: v - discards(before).get(k, 0) for k, v in discards(after).items()
                      if v - discards(before).get(k, 0)},
        "daemon_cpu_percent": round(100 * (cpu1 - cpu0) / (w1 - w0), 1),
        "daemon_peak_rss_mib": round(memory.get("VmHWM", 0) / 1024, 1),
        "summary": summary,
    }


def peer_storm(host: BenchHost, exe: str, peer: PeerTool, procs: int, seconds: float,
               say: Callable[[str], None]) -> dict:
    out_path = f"{host.workdir}/peer-storm{procs}.out"
    proc = peer.make_process(out_path)
    proc.start()
    try:
        storm = Storm(host, exe, procs, seconds)
        cpu0, w0 = cpu_seconds(proc.pid), time.monotonic()
        storm.start()
        result = storm.wait()
        cpu1, w1 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(2.0)  # let it print what it still holds
        memory = memory_kib(proc.pid)
    finally:
        proc.stop()
    printed, lost = count_peer_lines(out_path, "".join(proc.stderr_lines))
    say(f"storm K={procs} {peer.name}: {result.attempts} attempts, {printed} printed")
    return {"tracer": peer.name, "procs": procs, "seconds": round(result.seconds, 2),
            "attempts": result.attempts, "attempts_eacces": result.eacces,
            "denials_per_s": round(result.rate), "events_printed": printed,
            "lost_reported_by_tool": lost, "missing": result.eacces - printed,
            "loss_percent": round(100 * (result.eacces - printed) / max(result.eacces, 1), 1),
            "tool_cpu_percent": round(100 * (cpu1 - cpu0) / (w1 - w0), 1),
            "tool_peak_rss_mib": round(memory.get("VmHWM", 0) / 1024, 1)}


def count_peer_lines(out_path: str, stderr: str, command: Optional[str] = "syscall_loop") -> tuple[int, int]:
    """Lines the peer tool printed for the storm's processes (-13 = EACCES), and its lost count."""
    printed = lost = 0
    with open(out_path, errors="replace") as f:
        text = f.read()
    for line in text.splitlines():
        if command and command[:15] not in line:
            continue
        if "ret=-13" in line or re.search(r"\s-1\s+13\s", line) or " 13 " in line:
            printed += 1
    for found in re.finditer(r"[Ll]ost (\d+) (?:samples|events)", text + stderr):
        lost += int(found.group(1))
    return printed, lost


def candidate_storm(host: BenchHost, exe: str, kind: str, mode: str, seconds: float,
                    distinct: int, say: Callable[[str], None]) -> dict:
    """Refused opens of paths that are not GPU nodes (outside the GPU prefixes): what
    they cost the daemon.  mode "one": one path hammered for `seconds`; "distinct":
    `distinct` different paths, each once."""
    locked = os.path.join(host.workdir, f"locked-{mode}")
    os.makedirs(locked, mode=0o700, exist_ok=True)
    os.chmod(locked, 0o700)  # root's: the bench user is refused at the directory
    gt = Gputrace(kind, host.workdir, tag=f"candidates-{mode}")
    gt.start(tap=True)
    try:
        before = gt.scrape()
        cpu0, w0 = cpu_seconds(gt.pid), time.monotonic()
        argv = ([exe, "deny", os.path.join(locked, "f"), str(seconds)] if mode == "one"
                else [exe, "denyn", locked, str(distinct)])
        out = subprocess.run(argv, capture_output=True, text=True, check=True,
                             **host.user_popen_kwargs()).stdout
        storm_s = time.monotonic() - w0
        attempts, eacces, _other, _opened = (int(v) for v in out.split())
        time.sleep(SETTLE_TIMEOUT_S / 2)  # the daemon finishes what the storm queued
        cpu1, w1 = cpu_seconds(gt.pid), time.monotonic()
        after = gt.scrape()
        memory = memory_kib(gt.pid)
    finally:
        gt.stop()
    events = gt.tap.snapshot() if gt.tap else []
    mine = sum(1 for _, e in events if str((e.get("node") or {}).get("path", "")).startswith(locked))

    def delta(counter: str) -> int:
        return sensor_counter(after, counter) - sensor_counter(before, counter)
    say(f"candidate storm ({mode}): {eacces} refused, {delta('candidates')} counted")
    return {
        "mode": mode, "attempts": attempts, "refused": eacces, "seconds": round(storm_s, 2),
        "per_s": round(attempts / storm_s) if storm_s else 0,
        "kernel_candidates": delta("candidates"),
        "kernel_known_not_gpu": delta("candidates_known"),
        "kernel_rate_limited": delta("candidates_rate_limited"),
        "resolved_not_gpu": delta("candidates_not_gpu"),
        "resolved_unresolved": delta("candidates_unresolved"),
        "buffer_full": delta("dropped_buffer_full"),
        "cache_entries": sensor_counter(after, "candidate_cache_entries"),
        "events_delivered": mine,
        "exact": delta("candidates") == eacces,
        "daemon_cpu_s": round(cpu1 - cpu0, 2),
        "daemon_cpu_percent": round(100 * (cpu1 - cpu0) / (w1 - w0), 1),
        "daemon_peak_rss_mib": round(memory.get("VmHWM", 0) / 1024, 1),
    }
