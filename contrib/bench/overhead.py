"""Syscall-loop overhead of each configuration, interleaved round by round.

Timings on shared VMs drift; interleaving (A B C ... then ... C B A) and
comparing medians within one run keeps the ratios honest.  Each round starts
the tracer, runs every workload once under it, and stops it.  The figure
compared is the loop's own CPU time per call (a probe runs in the calling
task, so its cost is in it; time other processes hold the core is not); wall
time is kept in the JSON too.
"""

from __future__ import annotations

import os
import statistics
import subprocess
from dataclasses import dataclass, field
from typing import Callable

from contrib.bench.machine import BenchHost


@dataclass(frozen=True)
class Workload:
    name: str
    mode: str      # syscall_loop mode
    path: str
    iterations: int


@dataclass
class Series:
    config: str
    workload: str
    ns_per_call: list[float] = field(default_factory=list)   # CPU time of the loop
    wall_ns_per_call: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.ns_per_call)


def build_loop(workdir: str) -> str:
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "syscall_loop.c")
    exe = os.path.join(workdir, "syscall_loop")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", exe, src], check=True)
    os.chmod(exe, 0o755)
    return exe


def ioctl_target() -> str:
    """A device with a driver that answers FIONREAD: a fresh pty master, else /dev/null."""
    try:
        fd = os.open("/dev/ptmx", os.O_RDONLY | os.O_NOCTTY)
        os.close(fd)
        return "/dev/ptmx"
    except OSError:
        return "/dev/null"


def run_loop(host: BenchHost, exe: str, work: Workload) -> tuple[float, float]:
    """(CPU ns per call, wall ns per call)."""
    done = subprocess.run([exe, work.mode, work.path, str(work.iterations)], capture_output=True,
                          text=True, check=True, **host.user_popen_kwargs())
    cpu, wall, _failures = done.stdout.split()
    return float(cpu), float(wall)


def interleaved(host: BenchHost, exe: str, configs: list, workloads: list[Workload], rounds: int,
                say: Callable[[str], None]) -> list[Series]:
    series = {(c.name, w.name): Series(c.name, w.name) for c in configs for w in workloads}
    for r in range(rounds):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        say(f"overhead round {r + 1}/{rounds}")
        for config in order:
            host.audit_context_for_loops(config.audit_context)
            config.attach()
            try:
                for work in workloads:
                    cpu, wall = run_loop(host, exe, work)
                    series[(config.name, work.name)].ns_per_call.append(cpu)
                    series[(config.name, work.name)].wall_ns_per_call.append(wall)
            finally:
                config.detach()
    host.audit_context_for_loops(False)
    return list(series.values())


def rows(series: list[Series]) -> list[dict]:
    """Per workload: median ns/call, ratio to no tracer, min-max ratio spread."""
    base = {s.workload: s.median for s in series if s.config == "none"}
    wall_base = {s.workload: statistics.median(s.wall_ns_per_call) for s in series
                 if s.config == "none"}
    out = []
    for s in series:
        b = base[s.workload]
        out.append({"workload": s.workload, "configuration": s.config,
                    "median_ns": round(s.median, 1), "ratio": round(s.median / b, 3),
                    "min_ratio": round(min(s.ns_per_call) / b, 3),
                    "max_ratio": round(max(s.ns_per_call) / b, 3),
                    "samples_ns": [round(v, 1) for v in s.ns_per_call],
                    "wall_median_ns": round(statistics.median(s.wall_ns_per_call), 1),
                    "wall_ratio": round(statistics.median(s.wall_ns_per_call)
                                        / wall_base[s.workload], 3),
                    "wall_samples_ns": [round(v, 1) for v in s.wall_ns_per_call]})
    return out
