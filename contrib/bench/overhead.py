"""Syscall-loop overhead of each configuration, interleaved round by round.

Timings on shared VMs drift; interleaving (A B C ... then ... C B A) and
comparing medians within one run keeps the ratios honest.  Each round starts
the tracer, runs every workload once under it, and stops it.  The figure
compared is the loop's own CPU time per call (a probe runs in the calling
task, so its cost is in it; time other processes hold the core is not); wall
time is kept in the JSON too.
"""

from __future__ import annotations

import glob
import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

from contrib.bench.machine import BenchHost


@dataclass(frozen=True)
class Workload:
    name: str
    mode: str      # syscall_loop mode, or "make" (the macro workload)
    path: str      # for "make": the source tree
    iterations: int  # for "make": files compiled (figures are per file)


MACRO_FILE = """#include <stdio.h>
#include <string.h>
static int table_{i}[64];
int unit_{i}(const char *s) {{
    for (int k = 0; k < 64; k++) table_{i}[k] = k * {i} + (int)strlen(s);
    return table_{i}[{i} % 64];
}}
"""


def macro_tree(workdir: str, files: int, uid: int, gid: int) -> str:
    """A project of `files` small C files and a Makefile, owned by the bench user."""
    root = os.path.join(workdir, "macro")
    os.makedirs(root, exist_ok=True)
    for i in range(files):
        with open(os.path.join(root, f"u{i}.c"), "w") as f:
            f.write(MACRO_FILE.format(i=i))
    with open(os.path.join(root, "Makefile"), "w") as f:
        f.write("SRC := $(wildcard u*.c)\nall: $(SRC:.c=.o)\n%.o: %.c\n\t$(CC) -O1 -c $< -o $@\n")
    for path in [root, *glob.glob(os.path.join(root, "*"))]:
        os.chown(path, uid, gid)
    return root


def run_make(host: BenchHost, work: Workload) -> tuple[float, float]:
    """(CPU ns per file, wall ns per file) of `make -j2` from clean, children included."""
    for obj in glob.glob(os.path.join(work.path, "*.o")):
        os.unlink(obj)
    t0 = time.monotonic()
    proc = subprocess.Popen(["make", "-s", "-j2", "-C", work.path], stdout=subprocess.DEVNULL,
                            **host.user_popen_kwargs())
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"make in {work.path} failed ({proc.returncode})")
    cpu = usage.ru_utime + usage.ru_stime
    return cpu * 1e9 / work.iterations, wall * 1e9 / work.iterations


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
    if work.mode == "make":
        return run_make(host, work)
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


def paired_ratio(mine: Series, ref: Series) -> float:
    """Median over rounds of mine/ref within the same round (neighbours in time:
    the interleaving runs them back to back), robust to drift across the run."""
    return statistics.median(a / b for a, b in zip(mine.ns_per_call, ref.ns_per_call))


def rows(series: list[Series]) -> list[dict]:
    """Per workload: median ns/call, ratio to no tracer, min-max ratio spread, and the
    paired (same-round) ratios to no tracer and to the floor."""
    base = {s.workload: s.median for s in series if s.config == "none"}
    none = {s.workload: s for s in series if s.config == "none"}
    floor = {s.workload: s for s in series if s.config.startswith("floor")}
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
                    "wall_samples_ns": [round(v, 1) for v in s.wall_ns_per_call],
                    "paired_vs_none": round(paired_ratio(s, none[s.workload]), 3),
                    "paired_vs_floor": (round(paired_ratio(s, floor[s.workload]), 3)
                                        if s.workload in floor else None)})
    return out
