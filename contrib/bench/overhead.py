"""Syscall-loop overhead of each configuration, interleaved round by round.

Timings on shared VMs drift; interleaving (A B C A B C ...) and comparing
medians within one run keeps the ratios honest.
"""

from __future__ import annotations

import os
import statistics
import subprocess
from dataclasses import dataclass, field


@dataclass
class Series:
    name: str
    ns_per_call: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.ns_per_call)


def build_loop(workdir: str) -> str:
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "syscall_loop.c")
    exe = os.path.join(workdir, "syscall_loop")
    subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
    return exe


def run_loop(exe: str, mode: str, path: str, iterations: int) -> float:
    out = subprocess.run([exe, mode, path, str(iterations)], check=True, capture_output=True,
                         text=True).stdout.split()
    return float(out[0])


def interleaved(tracers: list, exe: str, mode: str, path: str, iterations: int,
                rounds: int) -> list[Series]:
    series = [Series(t.name) for t in tracers]
    for r in range(rounds):
        order = list(range(len(tracers)))
        if r % 2:
            order.reverse()  # alternate order so drift hits every configuration alike
        for i in order:
            tracers[i].attach()
            try:
                series[i].ns_per_call.append(run_loop(exe, mode, path, iterations))
            finally:
                tracers[i].detach()
    return series


def table(series: list[Series], title: str) -> tuple[str, list[dict]]:
    base = series[0].median
    rows, lines = [], [title, f"{'configuration':<22}{'ns/call':>10}{'ratio':>9}{'min-max ratio':>18}"]
    for s in series:
        lo, hi = min(s.ns_per_call) / base, max(s.ns_per_call) / base
        rows.append({"configuration": s.name, "median_ns": round(s.median, 1),
                     "ratio": round(s.median / base, 3), "min_ratio": round(lo, 3),
                     "max_ratio": round(hi, 3), "samples": len(s.ns_per_call)})
        lines.append(f"{s.name:<22}{s.median:>10.1f}{s.median / base:>8.3f}x{lo:>9.3f}-{hi:.3f}x")
    return "\n".join(lines), rows
