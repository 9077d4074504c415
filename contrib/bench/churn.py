"""Container churn: containers started back to back, each refused /dev/nvidia0
once (EPERM from its device cgroup) and gone a few milliseconds later.

Interleaved, round by round, with the same engine: no gputrace; the gputrace
daemon (denials caught, how many carry their container's id and name, gputrace
CPU per container); the daemon again with containers that open nothing refused
(CPU per container start alone).  Then one daemon through a long run (10,000
containers by default) for memory: RSS before and after.

A denial is matched to its container by the process's own comm (the container's
token, set by open_once), never by gputrace's attribution, which is measured.
"""

from __future__ import annotations

import json
import queue
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from contrib.bench.churn_engines import CONTAINER_PATH, ENGINES, Engine, Started
from contrib.bench.machine import BenchHost, cpu_seconds, memory_kib, thread_cpu
from contrib.bench.processes import EventTap, Gputrace
from contrib.bench.tracers import settle

DELIVERY_TIMEOUT_S = 60.0   # after the last container: the daemon explains what is queued
QUIET_PATH = "/open_once"   # opened read-write: ETXTBSY, an errno gputrace does not watch


class ChurnTap(EventTap):
    """Keeps, per denial, only the process's comm and the container facts it carries:
    10,000 explained events would otherwise hold ~100 MB in the bench."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, tuple[Optional[str], Optional[str]]] = {}

    def add_line(self, arrived: float, line: str) -> None:
        if '"kind": "denial"' not in line and '"kind":"denial"' not in line:
            return
        try:
            event = json.loads(line)
        except ValueError:
            return
        comm = str((event.get("process") or {}).get("comm"))
        facts = event.get("facts") or {}

        def value(name: str) -> Optional[str]:
            fact = facts.get(name)
            return fact.get("value") if isinstance(fact, dict) else None
        with self.lock:
            self.seen.setdefault(comm, (value("container.id"), value("container.name")))


@dataclass
class Batch:
    started: list[Started] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.started) / self.seconds if self.seconds else 0.0

    def median_ms(self) -> float:
        return 1000 * statistics.median(s.wall_s for s in self.started) if self.started else 0.0


def run_batch(engine: Engine, tokens: list[str], workers: int) -> Batch:
    """`workers` threads, each starting containers one after the other."""
    todo: "queue.Queue[str]" = queue.Queue()
    for token in tokens:
        todo.put(token)
    out = Batch()
    lock = threading.Lock()

    def work(index: int) -> None:
        while True:
            try:
                token = todo.get_nowait()
            except queue.Empty:
                return
            one = engine.run(index, token)
            with lock:
                out.started.append(one)
    t0 = time.monotonic()
    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.seconds = time.monotonic() - t0
    return out


def judge(batch: Batch, tap: ChurnTap) -> dict:
    refused = [s for s in batch.started if s.refused]
    with tap.lock:
        seen = dict(tap.seen)
    caught = [s for s in refused if s.token in seen]
    with_id = [s for s in caught if seen[s.token][0] == s.expected_id]
    with_name = [s for s in with_id if seen[s.token][1] == s.expected_name]
    return {"refused": len(refused), "caught": len(caught), "with_id": len(with_id),
            "with_id_and_name": len(with_name),
            "missed": [s.token for s in refused if s.token not in seen][:5],
            "without_id": [(s.token, seen[s.token][0]) for s in caught if s not in with_id][:5],
            "without_name": [(s.token, seen[s.token][1]) for s in with_id
                             if s not in with_name][:5],
            "errors": sorted({s.error for s in batch.started if not s.refused and s.error})[:3]}


def wait_delivered(tap: ChurnTap, batch: Batch) -> float:
    """Until every refused container's denial arrived (or the timeout); returns the wait."""
    want = {s.token for s in batch.started if s.refused}
    t0 = time.monotonic()
    while time.monotonic() - t0 < DELIVERY_TIMEOUT_S:
        with tap.lock:
            if want <= tap.seen.keys():
                break
        time.sleep(0.2)
    return time.monotonic() - t0


def daemon_batch(host: BenchHost, kind: str, engine: Engine, tokens: list[str],
                 workers: int, tag: str) -> tuple[Batch, dict, float, dict[str, float]]:
    """A fresh daemon (settled), one batch, the daemon's CPU over the batch and
    over delivering its events; returns (batch, judged, cpu seconds, cpu seconds by
    thread name)."""
    gt = Gputrace(kind, host.workdir, tag=tag)
    gt.start()
    gt.tap = tap = ChurnTap()
    try:
        tap.connect(gt.socket_path)
        settle(gt.pid)
        cpu0, threads0 = cpu_seconds(gt.pid), thread_cpu(gt.pid)
        batch = run_batch(engine, tokens, workers)
        wait_delivered(tap, batch)
        settle(gt.pid)
        cpu = cpu_seconds(gt.pid) - cpu0
        threads = {name: spent - threads0.get(name, 0.0)
                   for name, spent in thread_cpu(gt.pid).items()}
        judged = judge(batch, tap)
    finally:
        gt.stop()
    return batch, judged, cpu, threads


def interleaved(host: BenchHost, kind: str, engine_name: str, rounds: int, per_round: int,
                workers: int, open_once: str, say: Callable[[str], None]) -> dict:
    node = host.make_node(f"churn-{engine_name}")
    engine = ENGINES[engine_name](host.workdir, node, open_once, workers)
    series: dict[str, list] = {"none": [], "gputrace": [], "gputrace, no denial": []}
    try:
        for r in range(rounds):
            tokens = [f"{engine_name[0]}{r}n{i:05d}" for i in range(per_round)]
            batch = run_batch(engine, tokens, workers)
            series["none"].append({"batch": batch, "judged": judge(batch, ChurnTap())})
            tokens = [f"{engine_name[0]}{r}g{i:05d}" for i in range(per_round)]
            batch, judged, cpu, threads = daemon_batch(host, kind, engine, tokens, workers,
                                                       f"churn-{engine_name}-{r}")
            series["gputrace"].append({"batch": batch, "judged": judged, "cpu_s": cpu,
                                       "threads": threads})
            tokens = [f"{engine_name[0]}{r}q{i:05d}" for i in range(per_round)]
            with engine_path(engine, QUIET_PATH):
                batch, judged, cpu, threads = daemon_batch(host, kind, engine, tokens, workers,
                                                           f"churn-{engine_name}-{r}q")
            series["gputrace, no denial"].append({"batch": batch, "judged": judged, "cpu_s": cpu,
                                                  "threads": threads})
            g = series["gputrace"][-1]
            say(f"churn {engine_name} round {r + 1}/{rounds}: none {series['none'][-1]['batch'].rate:.1f}/s, "
                f"gputrace {g['batch'].rate:.1f}/s, caught {g['judged']['caught']}/"
                f"{g['judged']['refused']}, with id {g['judged']['with_id']}, "
                f"with name {g['judged']['with_id_and_name']}")
    finally:
        engine.close()
    return summarise(engine_name, workers, series)


class engine_path:
    """Containers of this block open `path` instead of /dev/nvidia0 (no denial)."""

    def __init__(self, engine: Engine, path: str) -> None:
        self.engine, self.path = engine, path

    def __enter__(self) -> None:
        self.engine.open_path = self.path

    def __exit__(self, *exc: object) -> None:
        self.engine.open_path = CONTAINER_PATH


# the daemon's threads, by the names they carry (processes.run_named), as parts of gputrace
THREAD_PARTS = {"container-track": "container tracker", "sensor": "sensor",
                "access-changes": "access-change probe", "python": "explaining (main thread)"}


def cpu_by_part(runs: list[dict], started: int) -> dict[str, float]:
    """ms of CPU per container, by part of gputrace; `other`: every other thread,
    and threads that ended during the batch (the process's total minus the named)."""
    if not started:
        return {}
    parts: dict[str, float] = {}
    for run in runs:
        for name, spent in run.get("threads", {}).items():
            part = THREAD_PARTS.get(name, "other")
            parts[part] = parts.get(part, 0.0) + spent
    parts["other"] = parts.get("other", 0.0) + max(0.0, sum(r["cpu_s"] for r in runs)
                                                   - sum(parts.values()))
    return {part: round(1000 * spent / started, 2) for part, spent in parts.items()}


def summarise(engine_name: str, workers: int, series: dict[str, list]) -> dict:
    def rows(name: str) -> dict:
        runs = series[name]
        started = sum(len(r["batch"].started) for r in runs)
        out = {"configuration": name, "containers": started,
               "per_s": round(statistics.median(r["batch"].rate for r in runs), 1),
               "start_ms_median": round(statistics.median(r["batch"].median_ms() for r in runs), 1),
               "start_ms_rounds": [round(r["batch"].median_ms(), 1) for r in runs]}
        if name != "none":
            cpu = sum(r["cpu_s"] for r in runs)
            out["cpu_ms_per_container"] = round(1000 * cpu / started, 2) if started else None
            out["cpu_ms_by_part"] = cpu_by_part(runs, started)
        if name == "gputrace":
            for key in ("refused", "caught", "with_id", "with_id_and_name"):
                out[key] = sum(r["judged"][key] for r in runs)
            out["examples"] = {k: [x for r in runs for x in r["judged"][k]][:5]
                               for k in ("missed", "without_id", "without_name", "errors")}
        return out
    table = [rows(name) for name in series]
    none = table[0]
    same_round = [g["batch"].median_ms() / n["batch"].median_ms()
                  for g, n in zip(series["gputrace"], series["none"]) if n["batch"].median_ms()]
    return {"engine": engine_name, "workers": workers, "rows": table,
            "start_ratio_same_round": round(statistics.median(same_round), 3) if same_round else None,
            "none_start_ms_spread": [min(none["start_ms_rounds"]), max(none["start_ms_rounds"])]}


def rss_parts(pid: int) -> dict[str, float]:
    """RSS in MiB by kind: anonymous (Python's heap), file-backed, and shared memory
    (the BPF ring buffers' pages, the kernel's since load, counted once we read them)."""
    kib = memory_kib(pid)
    return {name: round(kib.get(key, 0) / 1024, 1)
            for name, key in (("rss", "VmRSS"), ("anon", "RssAnon"), ("file", "RssFile"),
                              ("shmem", "RssShmem"))}


def long_run(host: BenchHost, kind: str, engine_name: str, total: int, workers: int,
             open_once: str, say: Callable[[str], None], chunk: int = 500,
             refused: bool = True) -> dict:
    """One daemon through `total` containers: RSS before and after, and everything
    the interleaved rounds count, over the whole run.  `refused=False`: containers
    that are refused nothing, so what grows is what container starts cost alone."""
    node = host.make_node(f"churn-long-{engine_name}{'' if refused else '-quiet'}")
    engine = ENGINES[engine_name](host.workdir, node, open_once, workers)
    if not refused:
        engine.open_path = QUIET_PATH
    gt = Gputrace(kind, host.workdir, tag=f"churn-long-{engine_name}")
    tap = ChurnTap()
    totals = {"refused": 0, "caught": 0, "with_id": 0, "with_id_and_name": 0}
    rss: list[tuple[int, float]] = []
    warm: Optional[float] = None
    seconds = 0.0
    try:
        gt.start()
        gt.tap = tap
        tap.connect(gt.socket_path)
        settle(gt.pid)
        rss.append((0, memory_kib(gt.pid)["VmRSS"] / 1024))
        parts = {"before": rss_parts(gt.pid)}
        cpu0, threads0 = cpu_seconds(gt.pid), thread_cpu(gt.pid)
        done = 0
        while done < total:
            n = min(chunk, total - done)
            batch = run_batch(engine, [f"{engine_name[0]}L{done + i:06d}" for i in range(n)],
                              workers)
            seconds += batch.seconds
            wait_delivered(tap, batch)
            judged = judge(batch, tap)
            for key in totals:
                totals[key] += judged[key]
            with tap.lock:
                tap.seen.clear()
            done += n
            rss.append((done, memory_kib(gt.pid)["VmRSS"] / 1024))
            if warm is None and done >= min(1000, total):
                warm = rss[-1][1]  # the bounded stores and the ring buffer's pages are in use now
                parts["after_1000"] = rss_parts(gt.pid)
            say(f"churn long {engine_name}: {done}/{total}, rss {rss[-1][1]:.1f} MiB, "
                f"caught {totals['caught']}/{totals['refused']}, with id {totals['with_id']}")
        settle(gt.pid)
        cpu = cpu_seconds(gt.pid) - cpu0
        threads = {name: spent - threads0.get(name, 0.0)
                   for name, spent in thread_cpu(gt.pid).items()}
        rss.append((done, memory_kib(gt.pid)["VmRSS"] / 1024))
        parts["after"] = rss_parts(gt.pid)
        metrics = gt.scrape()
    finally:
        gt.stop()
        engine.close()
    return {"engine": engine_name, "refused_once": refused, "containers": total,
            "per_s": round(total / seconds, 1),
            **totals, "cpu_ms_per_container": round(1000 * cpu / total, 2),
            "cpu_ms_by_part": cpu_by_part([{"cpu_s": cpu, "threads": threads}], total),
            "rss_parts_mib": parts,
            "rss_mib_before": round(rss[0][1], 1), "rss_mib_after": round(rss[-1][1], 1),
            "rss_mib_after_1000": round(warm, 1) if warm is not None else None,
            "rss_mib_samples": [(n, round(m, 1)) for n, m in rss],
            "tracker": {k.split('"')[1]: int(v) for k, v in metrics.items()
                        if k.startswith("gputrace_container_tracker_total{")}}
