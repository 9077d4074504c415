"""`make bench`: overhead, denial storm, latency and start-up of gputrace, side by side
with opensnoop and audit.  Run as root; prints Markdown tables and writes JSON.

Overhead: a getppid loop (a syscall gputrace does not watch), an open/close
loop, an ioctl loop and a macro workload (make -j2 of small C files), each
under no tracer, the floor (empty programs on gputrace's hooks), an empty
program on raw sys_exit, gputrace, the trace-bpfcc stand-in and audit rules,
interleaved round by round.  Churn: containers started back to back (runc
directly and docker), each refused /dev/nvidia0 once, with and without gputrace
interleaved, then 10,000 through one daemon for memory.

    python -m contrib.bench                    # everything (~9 minutes on 2 cores)
    python -m contrib.bench overhead storm     # some parts
    python -m contrib.bench --quick            # fewer rounds and shorter storms
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

PARTS = ("overhead", "storm", "latency", "startup", "churn")


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m contrib.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="*", metavar="PART",
                    help=f"any of {', '.join(PARTS)} (default: all)")
    ap.add_argument("--rounds", type=int, default=7, help="overhead rounds per configuration")
    ap.add_argument("--getppid-iterations", type=int, default=1_000_000)
    ap.add_argument("--open-iterations", type=int, default=200_000)
    ap.add_argument("--ioctl-iterations", type=int, default=500_000)
    ap.add_argument("--macro-files", type=int, default=120, help="C files make -j2 compiles")
    ap.add_argument("--candidate-paths", type=int, default=10_000,
                    help="distinct refused non-GPU paths in the candidate storm")
    ap.add_argument("--storm-procs", default="1,4", help="K values, comma-separated")
    ap.add_argument("--seconds", type=float, default=5.0, help="storm length T")
    ap.add_argument("--latency-samples", type=int, default=200)
    ap.add_argument("--latency-gap-ms", type=int, default=20)
    ap.add_argument("--latency-storm-procs", type=int, default=4)
    ap.add_argument("--startup-runs", type=int, default=3)
    ap.add_argument("--no-peer", action="store_true", help="skip opensnoop / its stand-in")
    ap.add_argument("--churn-engines", default="runc,docker", help="engines for the churn part")
    ap.add_argument("--churn-rounds", type=int, default=3, help="interleaved churn rounds")
    ap.add_argument("--churn-per-round", default="runc:150,docker:20",
                    help="containers per configuration per round, by engine")
    ap.add_argument("--churn-workers", type=int, default=2,
                    help="containers started at a time (2 saturates this VM's runc)")
    ap.add_argument("--churn-long", type=int, default=10_000,
                    help="containers through one daemon for memory (runc; 0: skip)")
    ap.add_argument("--churn-long-quiet", type=int, default=10_000,
                    help="...the same with containers refused nothing (starts alone; 0: skip)")
    ap.add_argument("--quick", action="store_true", help="3 rounds, 2 s storms, 60 samples")
    ap.add_argument("--out-dir", default="bench-results")
    args = ap.parse_args(argv)
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown part {unknown[0]!r} (choose from {', '.join(PARTS)})")
    if args.quick:
        args.rounds, args.seconds, args.latency_samples, args.startup_runs = 3, 2.0, 60, 1
        args.macro_files, args.getppid_iterations = 60, 300_000
        args.churn_rounds, args.churn_per_round, args.churn_long = 1, "runc:40,docker:5", 300
        args.churn_long_quiet = 300
    args.parts = args.parts or list(PARTS)
    return args


def fexit_status() -> dict:
    """Whether fexit loads here: the target '<= 1.03x where fentry loads' needs it."""
    from tracer.host import HostPaths
    from tracer.sensors import preflight
    from tracer.sensors.bpf_layout import current_arch
    from tracer.sensors.btf import KIND_FUNC, KernelBtf

    with KernelBtf(HostPaths().btf_vmlinux) as btf:
        target = btf.find(current_arch().syscall_prefix + "openat", KIND_FUNC) or 0
    ok, why = preflight.fexit_supported(target)
    return {"loads": ok, "why": why}


def run_overhead(host: Any, exe: str, kind: str, args: argparse.Namespace, peer: Any) -> dict:
    from contrib.bench import overhead, tables, tracers

    target = os.path.join(host.workdir, "plain-file")
    open(target, "w").close()
    os.chmod(target, 0o644)
    ioctl_path = overhead.ioctl_target()
    tree = overhead.macro_tree(host.workdir, args.macro_files, host.uid, host.gid)
    workloads = [overhead.Workload("getppid (not watched)", "getppid", "-", args.getppid_iterations),
                 overhead.Workload("open+close, non-GPU file", "open", target, args.open_iterations),
                 overhead.Workload(f"ioctl(FIONREAD) on {ioctl_path}", "ioctl", ioctl_path,
                                   args.ioctl_iterations),
                 overhead.Workload(f"make -j2, {args.macro_files} small C files", "make", tree,
                                   args.macro_files)]
    configs: list = [tracers.NoTracer(), tracers.EmptyProgram(), tracers.EmptyProgram(raw=True),
                     tracers.GputraceTracer(kind, host.workdir)]
    if peer is not None:
        configs.append(peer)
    configs += [tracers.PlainAuditRules(host.audit), tracers.AuditContextOnly()]
    try:
        series = overhead.interleaved(host, exe, configs, workloads, args.rounds, say)
    finally:
        for c in configs:
            c.close()
    rows = overhead.rows(series)
    notes = {c.name: c.note for c in configs}
    text = tables.overhead_table(rows, notes)
    ready = {c.name: c.ready_s for c in configs if isinstance(c, tracers.GputraceTracer)}
    return {"rows": rows, "notes": notes, "ready_s_per_round": ready, "text": text}


def run_storm(host: Any, exe: str, kind: str, args: argparse.Namespace, peer: Any) -> dict:
    from contrib.bench import storm, tables

    ks = [int(k) for k in args.storm_procs.split(",") if k.strip()]
    rows = [storm.gputrace_storm(host, exe, kind, k, args.seconds, say) for k in ks]
    peers = [storm.peer_storm(host, exe, peer, k, args.seconds, say) for k in ks] if peer else []
    candidates = [storm.candidate_storm(host, exe, kind, mode, args.seconds,
                                        args.candidate_paths, say) for mode in ("one", "distinct")]
    return {"rows": rows, "peers": peers, "candidates": candidates,
            "text": tables.storm_table(rows, peers) + "\n\nRefused opens of paths that are not GPU "
            "nodes (candidates):\n\n" + tables.candidate_table(candidates)}


def run_churn(host: Any, kind: str, args: argparse.Namespace) -> dict:
    from contrib.bench import churn, churn_engines, tables

    exe = churn_engines.build_open_once(host.workdir)
    per_round = dict(item.split(":") for item in args.churn_per_round.split(","))
    results = [churn.interleaved(host, kind, engine, args.churn_rounds,
                                 int(per_round.get(engine, 20)), args.churn_workers, exe, say)
               for engine in args.churn_engines.split(",") if engine]
    long = churn.long_run(host, kind, "runc", args.churn_long, args.churn_workers, exe, say) \
        if args.churn_long else None
    quiet = churn.long_run(host, kind, "runc", args.churn_long_quiet, args.churn_workers, exe,
                           say, refused=False) if args.churn_long_quiet else None
    return {"engines": results, "long": long, "quiet": quiet,
            "text": tables.churn_table(results, long, quiet)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: run as root (it loads BPF programs, adds audit rules and device nodes)",
              file=sys.stderr)
        return 2
    from contrib.bench import latency, machine, overhead, processes, tables, tracers

    started = time.monotonic()
    results: dict[str, Any] = {"machine": machine.machine_facts(), "command": " ".join(
        ["python -m contrib.bench", *(argv if argv is not None else sys.argv[1:])])}
    results["fexit"] = fexit_status()
    if not results["fexit"]["loads"]:
        say(f"fexit does not load here ({results['fexit']['why']}): gputrace runs on the syscall "
            "exit tracepoints; its floor is empty programs on those tracepoints")
    with machine.BenchHost() as host:
        exe = overhead.build_loop(host.workdir)
        kind, results["gputrace_process"] = processes.choose_bpf_process(host.workdir)
        say(f"gputrace process: {results['gputrace_process']}")
        peer = None
        if not args.no_peer and {"overhead", "storm"} & set(args.parts):
            peer = tracers.PeerTool(host.workdir)
            results["peer_tool"] = {"name": peer.name, "opensnoop_unavailable": peer.why_not_opensnoop}
            if peer.why_not_opensnoop:
                say(f"opensnoop-bpfcc -x cannot run here ({peer.why_not_opensnoop}); "
                    f"comparing with {' '.join(peer.argv)}")
        if "overhead" in args.parts:
            results["overhead"] = run_overhead(host, exe, kind, args, peer)
        if "storm" in args.parts:
            results["storm"] = run_storm(host, exe, kind, args, peer)
        if "latency" in args.parts:
            rows = latency.measure(host, exe, kind, args.latency_samples, args.latency_gap_ms,
                                   args.latency_storm_procs, say)
            results["latency"] = {"rows": rows, "text": tables.latency_table(rows)}
        if "churn" in args.parts:
            results["churn"] = run_churn(host, kind, args)
        if "startup" in args.parts:
            s = latency.startup(host, kind, args.startup_runs, 3.0, say)
            results["startup"] = {**s, "text": tables.startup_table(s)}
    results["elapsed_s"] = round(time.monotonic() - started)
    results["machine"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(report(results))
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "bench.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    say(f"written to {path} ({results['elapsed_s']} s)")
    return 0


def report(results: dict) -> str:
    m = results["machine"]
    parts = [f"gputrace bench, {m['date']}: {m['nproc']} CPUs ({m['cpu']}), kernel {m['kernel']}, "
             f"{m['mem_gib']} GiB, load average {m['loadavg_1m_at_start']} at start"]
    parts.append(f"gputrace process: {results.get('gputrace_process', '?')}")
    fexit = results.get("fexit", {})
    if fexit and not fexit["loads"]:
        parts.append(f"fexit: {fexit['why']} -- gputrace uses the syscall exit tracepoints; "
                     "its floor is empty programs on those tracepoints")
    if results.get("peer_tool", {}).get("opensnoop_unavailable"):
        parts.append(f"opensnoop-bpfcc -x could not run: {results['peer_tool']['opensnoop_unavailable']}; "
                     f"its stand-in is {results['peer_tool']['name']}")
    titles = {"overhead": "Overhead", "storm": "Denial storm", "latency":
              "Latency, denied open returns -> event on the daemon socket", "startup": "Start-up",
              "churn": "Container churn"}
    for key, title in titles.items():
        if key in results:
            parts.append(f"## {title}\n\n{results[key]['text']}")
    return "\n\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
