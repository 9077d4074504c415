"""Where gputrace's start-up time and memory go, phase by phase, in a fresh process.

    python -m contrib.bench.startup_cost    # prints one JSON object

Phases: importing the daemon's Python modules, importing BCC (libbcc carries
LLVM and clang), compiling an empty BPF program, then starting gputrace's own
sensor (compile, load, attach).  After each: elapsed seconds and RSS split into
anonymous and file-backed (shared library) pages.
"""

from __future__ import annotations

import json
import os
import sys
import time


def rss_kib() -> dict[str, int]:
    from contrib.bench.machine import memory_kib  # ~3 MiB, counted in the first phase

    return memory_kib(os.getpid())


def main() -> None:
    phases = []
    t = time.monotonic()

    def mark(name: str) -> None:
        nonlocal t
        now = time.monotonic()
        mem = rss_kib()
        phases.append({"phase": name, "seconds": round(now - t, 2),
                       "rss_mib": round(mem["VmRSS"] / 1024, 1),
                       "anon_mib": round(mem["RssAnon"] / 1024, 1),
                       "file_mib": round(mem["RssFile"] / 1024, 1)})
        t = time.monotonic()

    mark("python started")
    import tracer.daemon  # noqa: F401  (the daemon's modules: click, yaml, prometheus_client)
    mark("daemon modules imported")
    from bcc import BPF
    mark("bcc imported")
    from tracer.sensors import kernel_headers
    from tracer.sensors.bpf_sensor import BpfConfig, BpfSensor, bpf_source_dir

    choice = kernel_headers.find_headers()
    if choice.source:
        os.environ["BCC_KERNEL_SOURCE"] = choice.source
    saved = os.dup(2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # BCC's compiler chatter
    try:
        empty = BPF(src_file=os.path.join(bpf_source_dir(), "bench_empty.bpf.c").encode())
        mark("empty BPF program compiled and loaded")
        empty.cleanup()
        sensor = BpfSensor(BpfConfig(), say=lambda m: None)
        sensor.start()
        mark(f"gputrace sensor started ({sensor.hook}, {sensor.transport})")
        sensor.close()
    finally:
        os.dup2(saved, 2)
    json.dump({"phases": phases}, sys.stdout)


if __name__ == "__main__":
    main()
