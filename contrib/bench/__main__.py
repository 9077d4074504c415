"""`make bench`: overhead of gputrace against no tracer and an empty probe."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile

from contrib.bench import overhead, tracers


def main() -> None:
    ap = argparse.ArgumentParser(prog="make bench")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--iterations", type=int, default=300_000)
    ap.add_argument("--out", default="bench-results/overhead.json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root (it loads BPF programs)")
    with tempfile.TemporaryDirectory(prefix="gtbench-") as work:
        exe = overhead.build_loop(work)
        target = os.path.join(work, "plain-file")
        open(target, "w").close()
        configs = [tracers.NoTracer(), tracers.EmptyProgram(), tracers.GputraceProbe()]
        try:
            series = overhead.interleaved(configs, exe, "open", target, args.iterations, args.rounds)
        finally:
            for c in configs:
                c.close()
    text, rows = overhead.table(series, f"open+close of a non-GPU file, {args.rounds} interleaved "
                                        f"rounds x {args.iterations} calls")
    gt, empty = rows[2]["ratio"], rows[1]["ratio"]
    text += f"\ngputrace vs empty program on the same hook: {gt / empty:.3f}x"
    print(text)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   "machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                               "arch": platform.machine()},
                   "open_close": rows, "gputrace_vs_empty": round(gt / empty, 3)}, f, indent=2)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
