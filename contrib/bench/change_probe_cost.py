"""What the access-change probes (bpf/access_changes.bpf.c) cost, in one interleaved run.

    sudo .venv/bin/python -m contrib.bench.change_probe_cost [--rounds 7] [--json OUT]

Configurations, started and stopped in every round, in alternating order:
none; the change probes alone; gputrace's denial sensor alone; both.
Workloads (contrib/bench/syscall_loop.c, run as root):

* getppid: a syscall neither program watches (what every other syscall pays);
* bpf: bpf(BPF_PROG_GET_NEXT_ID), a bpf() command the probe sees at entry and
  drops (its exit then does one hash lookup);
* setgroups: setgroups() with the caller's own groups, recorded on every call
  (two credential reads and one ring buffer record per call).

The figure is the loop's own CPU time per call (the probe runs in the calling
task); medians over the rounds, and each configuration's ratio to none.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Callable, Optional

WORKLOADS = {"getppid": 400_000, "bpf": 100_000, "setgroups": 100_000}
CONFIGS = ("none", "changes", "denial", "denial+changes")


def build(workdir: str) -> str:
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "syscall_loop.c")
    exe = os.path.join(workdir, "syscall_loop")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", exe, src], check=True)
    return exe


def start(config: str) -> Callable[[], None]:
    """Start the configuration's probes; returns what stops them."""
    from tracer.sensors.access_change_sensor import AccessChangeSensor
    from tracer.sensors.bpf_sensor import BpfSensor

    running: list[Any] = []
    if "denial" in config:
        sensor = BpfSensor(say=lambda _msg: None)
        sensor.start()
        running.append(sensor)
    if "changes" in config:
        running.append(AccessChangeSensor(lambda _record: None, say=lambda _msg: None).start())

    def stop() -> None:
        for probe in running:
            probe.close()
    return stop


def run_loop(exe: str, mode: str, n: int) -> float:
    out = subprocess.run([exe, mode, "-", str(n)], check=True, capture_output=True, text=True)
    return float(out.stdout.split()[0])


def measure(rounds: int, exe: str) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {c: {w: [] for w in WORKLOADS} for c in CONFIGS}
    for r in range(rounds):
        order = CONFIGS if r % 2 == 0 else tuple(reversed(CONFIGS))
        for config in order:
            stop = start(config)
            try:
                for mode, n in WORKLOADS.items():
                    results[config][mode].append(run_loop(exe, mode, n))
            finally:
                stop()
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    return results


def table(results: dict[str, dict[str, list[float]]]) -> str:
    lines = ["| workload | " + " | ".join(CONFIGS) + " |", "|---" * (len(CONFIGS) + 1) + "|"]
    for mode in WORKLOADS:
        base = statistics.median(results["none"][mode])
        cells = []
        for config in CONFIGS:
            med = statistics.median(results[config][mode])
            cells.append(f"{med:.0f} ns" + ("" if config == "none" else f" ({med / base:.2f}x)"))
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", default=None, help="also write the raw samples here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gputrace-bench-changes-") as workdir:
        exe = build(workdir)
        results = measure(args.rounds, exe)
    print(table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
