"""Markdown tables of the bench results (printed, and pasted into BENCHMARKS.md)."""

from __future__ import annotations

from typing import Any, Optional


def markdown(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def overhead_table(rows: list[dict], notes: dict[str, str]) -> str:
    out = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in rows if r["workload"] == workload]
        floor = next((r for r in mine if r["configuration"].startswith("floor")), None)
        body = []
        for r in mine:
            vs_floor = f"{r['median_ns'] / floor['median_ns']:.3f}x" if floor else ""
            paired = (f"{r['paired_vs_none']:.3f}x / {r['paired_vs_floor']:.3f}x"
                      if r.get("paired_vs_floor") is not None else "")
            body.append([r["configuration"], f"{r['median_ns']:.0f}", f"{r['ratio']:.3f}x",
                         f"{r['min_ratio']:.2f}-{r['max_ratio']:.2f}x", vs_floor, paired,
                         f"{r['wall_ratio']:.3f}x", notes.get(r["configuration"], "")])
        unit = "CPU ns/file" if workload.startswith("make") else "CPU ns/call"
        out.append(f"**{workload}** ({len(mine[0]['samples_ns'])} interleaved rounds)\n\n"
                   + markdown(["configuration", unit, "vs none", "min-max", "vs floor",
                               "same-round vs none / floor", "wall vs none", "note"], body))
    return "\n\n".join(out)


def candidate_table(rows: list[dict]) -> str:
    body = [[r["mode"], f"{r['refused']:,}", f"{r['per_s']:,}", f"{r['kernel_candidates']:,}",
             "yes" if r["exact"] else "**no**", f"{r['resolved_not_gpu']:,}",
             f"{r['kernel_known_not_gpu']:,}", f"{r['kernel_rate_limited']:,}",
             f"{r['buffer_full']:,}", r["events_delivered"], r["cache_entries"],
             f"{r['daemon_cpu_s']} s ({r['daemon_cpu_percent']}%)", f"{r['daemon_peak_rss_mib']} MiB"]
            for r in rows]
    return markdown(["paths", "refused opens", "per s", "counted (candidates)", "exact",
                     "looked up by userspace", "dropped in kernel (known not GPU)",
                     "rate-limited (counted)", "buffer full", "events", "cache entries",
                     "daemon CPU", "daemon peak RSS"], body)


def storm_table(rows: list[dict], peers: list[dict]) -> str:
    body = []
    for r in rows:
        lost = ", ".join(f"{k} {v}" for k, v in r["discarded"].items()) or "0"
        body.append([r["procs"], f"{r['attempts_eacces']:,}", f"{r['denials_per_s']:,}",
                     f"{r['counted_by_gputrace']:,}", "yes" if r["exact"] else "**no**",
                     f"{r['events_delivered']} ({r['events_from_other_processes']})", lost, f"{r['daemon_cpu_percent']}%",
                     f"{r['daemon_peak_rss_mib']} MiB"])
    text = markdown(["K", "denials attempted", "per s", "counted by gputrace", "exact",
                     "events delivered (others')", "discarded (reason)", "daemon CPU", "peak RSS"], body)
    if peers:
        pbody = [[p["tracer"], p["procs"], f"{p['attempts_eacces']:,}", f"{p['denials_per_s']:,}",
                  f"{p['events_printed']:,}", f"{p['missing']:,} ({p['loss_percent']}%)",
                  p["lost_reported_by_tool"], f"{p['tool_cpu_percent']}%"]
                 for p in peers]
        text += "\n\n" + markdown(["peer tool", "K", "denials attempted", "per s",
                                   "events printed", "missing", "tool says lost", "tool CPU"],
                                  pbody)
    return text


def latency_table(rows: list[dict]) -> str:
    return markdown(["condition", "p50", "p99", "max", "received", "storm denials/s"],
                    [[r["condition"], f"{r['p50_ms']} ms", f"{r['p99_ms']} ms", f"{r['max_ms']} ms",
                      f"{r['received']}/{r['samples']}", f"{r['storm_denials_per_s']:,}"]
                     for r in rows])


def startup_table(s: dict) -> str:
    text = markdown(["runs", "ready (median)", "ready (max)", "idle RSS", "of which anon / file",
                     "peak RSS"],
                    [[s["runs"], f"{s['ready_median_s']} s", f"{s['ready_max_s']} s",
                      f"{s['idle_rss_mib']} MiB",
                      f"{s['idle_rss_anon_mib']} / {s['idle_rss_file_mib']} MiB",
                      f"{s['peak_rss_mib']} MiB"]])
    phases = [p for p in s.get("phases", []) if "seconds" in p]
    if phases:
        text += "\n\nWhere it goes (one fresh process, phase by phase):\n\n" + markdown(
            ["phase", "seconds", "RSS after", "anon", "file-backed"],
            [[p["phase"], p["seconds"], f"{p['rss_mib']} MiB", f"{p['anon_mib']} MiB",
              f"{p['file_mib']} MiB"] for p in phases])
    return text


def churn_table(results: list[dict], long: Optional[dict], quiet: Optional[dict] = None) -> str:
    """Markdown: one block per engine (interleaved rounds), then the long run."""
    lines = ["| engine | configuration | containers | per s | start ms (median) | CPU ms per container "
             "| denials caught | with id | with id and name |", "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for row in res["rows"]:
            cpu = row.get("cpu_ms_per_container")
            refused = row.get("refused")
            caught = (f"{row['caught']}/{refused}", f"{row['with_id']}/{refused}",
                      f"{row['with_id_and_name']}/{refused}") if refused else ("-", "-", "-")
            lines.append(f"| {res['engine']} ({res['workers']} at a time) | {row['configuration']} "
                         f"| {row['containers']} | {row['per_s']} | {row['start_ms_median']} "
                         f"| {'-' if cpu is None else cpu} | {' | '.join(caught)} |")
    notes = [f"{r['engine']}: start time with gputrace / without, same-round median "
             f"{r['start_ratio_same_round']}x; without gputrace the per-round medians spread "
             f"{r['none_start_ms_spread'][0]}-{r['none_start_ms_spread'][1]} ms" for r in results]
    text = "\n".join(lines) + "\n\n" + "\n".join(f"* {n}" for n in notes)
    text += "\n\nWhere gputrace's CPU goes (ms per container, by the daemon's threads):\n\n" + \
        cpu_parts_table([(f"{r['engine']}, {row['configuration']}", row.get("cpu_ms_by_part", {}))
                         for r in results for row in r["rows"] if row.get("cpu_ms_by_part")]
                        + [(f"long run, {run['engine']}, {'each refused once' if run['refused_once'] else 'refused nothing'}",
                            run.get("cpu_ms_by_part", {})) for run in (long, quiet) if run])
    if long:
        samples = ", ".join(f"{n}: {m}" for n, m in long["rss_mib_samples"][::max(1, len(long["rss_mib_samples"]) // 6)])
        text += (f"\n\nOne daemon through {long['containers']:,} {long['engine']} containers "
                 f"({long['per_s']}/s): RSS {long['rss_mib_before']} MiB before, "
                 f"{long['rss_mib_after_1000']} MiB after the first 1,000, "
                 f"{long['rss_mib_after']} MiB after all (+{round(long['rss_mib_after'] - long['rss_mib_before'], 1)} MiB "
                 f"from the start, {round(long['rss_mib_after'] - (long['rss_mib_after_1000'] or 0), 1):+} MiB "
                 f"after the first 1,000; "
                 f"samples by containers started: {samples}); caught {long['caught']}/{long['refused']}, "
                 f"with id {long['with_id']}, with id and name {long['with_id_and_name']}; "
                 f"CPU {long['cpu_ms_per_container']} ms per container (each refused once). "
                 + rss_parts_text(long))
    if quiet:
        text += (f"\n\nThe same through {quiet['containers']:,} containers refused nothing (what "
                 f"starts alone cost): RSS {quiet['rss_mib_before']} MiB before, "
                 f"{quiet['rss_mib_after_1000']} MiB after the first 1,000, {quiet['rss_mib_after']} MiB "
                 f"after all; CPU {quiet['cpu_ms_per_container']} ms per container start. "
                 + rss_parts_text(quiet))
    return text


CPU_PARTS = ("container tracker", "sensor", "access-change probe", "explaining (main thread)", "other")


def cpu_parts_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    return markdown(["run", *CPU_PARTS, "total"],
                    [[name, *(parts.get(p, 0.0) for p in CPU_PARTS),
                      round(sum(parts.values()), 2)] for name, parts in rows])


def rss_parts_text(run: Optional[dict]) -> str:
    """Growth by kind: anonymous (the heap) and shared (BPF ring buffer pages)."""
    parts = (run or {}).get("rss_parts_mib") or {}
    before, warm, after = parts.get("before"), parts.get("after_1000"), parts.get("after")
    if not before or not after:
        return ""

    def grew(a: dict, b: dict) -> str:
        return ", ".join(f"{k} {b[k] - a[k]:+.1f}" for k in ("anon", "shmem", "file"))
    text = f"RSS growth by kind, MiB: from the start {grew(before, after)}"
    if warm:
        text += f"; after the first 1,000 {grew(warm, after)}"
    return text + "."
