"""The configurations a benchmark compares, each attachable and detachable.

Every configuration runs the same workload in the same process tree; only what
is attached to the kernel differs.  `attach()` returns once the probe is live.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from typing import Optional

from tracer.sensors.bpf_sensor import BpfConfig, BpfSensor, bpf_source_dir


class NoTracer:
    name = "none"

    def attach(self) -> None:
        pass

    def detach(self) -> None:
        pass

    def close(self) -> None:
        pass


class EmptyProgram:
    """An empty BPF program on gputrace's hook: the floor for that hook."""

    name = "empty-sys_exit"

    def __init__(self) -> None:
        from bcc import BPF

        from tracer.sensors import kernel_headers, preflight

        preflight.require_tracefs()
        choice = kernel_headers.find_headers()
        if choice.source:
            os.environ["BCC_KERNEL_SOURCE"] = choice.source
        self.bpf = BPF(src_file=os.path.join(bpf_source_dir(), "bench_empty.bpf.c").encode())
        self.bpf.detach_raw_tracepoint(b"sys_exit")

    def attach(self) -> None:
        self.bpf.attach_raw_tracepoint(tp=b"sys_exit", fn_name=b"raw_tracepoint__sys_exit")

    def detach(self) -> None:
        self.bpf.detach_raw_tracepoint(b"sys_exit")

    def close(self) -> None:
        self.bpf.cleanup()


class GputraceProbe:
    """gputrace's own sensor, compiled once, its probe attached per round, with
    its userspace loop consuming events in a thread as `watch` does."""

    name = "gputrace"

    def __init__(self, config: Optional[BpfConfig] = None) -> None:
        self.sensor = BpfSensor(config or BpfConfig(), say=lambda m: None)
        self.sensor.start()
        self.fn = b"raw_tracepoint__sys_exit"
        if self.sensor.hook != "tracepoint":
            self.name = f"gputrace-{self.sensor.hook}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._consume, daemon=True)
        self._thread.start()
        self.detach()

    def _consume(self) -> None:
        for _ in self.sensor.events(self._stop):
            pass

    def attach(self) -> None:
        if self.sensor.hook == "tracepoint":
            self.sensor.bpf.attach_raw_tracepoint(tp=b"sys_exit", fn_name=self.fn)

    def detach(self) -> None:
        if self.sensor.hook == "tracepoint":
            self.sensor.bpf.detach_raw_tracepoint(b"sys_exit")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sensor.close()


class CommandTracer:
    """A tracer that runs as its own process (a peer tool or the gputrace daemon)."""

    def __init__(self, name: str, argv: list[str], ready: str, ready_on_stderr: bool = True,
                 settle_s: float = 0.0) -> None:
        self.name, self.argv, self.ready = name, argv, ready
        self.ready_on_stderr, self.settle_s = ready_on_stderr, settle_s
        self.proc: Optional[subprocess.Popen] = None

    def attach(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL if self.ready_on_stderr
                                     else subprocess.PIPE,
                                     stderr=subprocess.PIPE if self.ready_on_stderr else subprocess.DEVNULL,
                                     text=True)
        stream = self.proc.stderr if self.ready_on_stderr else self.proc.stdout
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = stream.readline()
            if self.ready in line:
                break
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited before it was ready")
        threading.Thread(target=lambda: stream.read(), daemon=True).start()  # keep pipes drained
        time.sleep(self.settle_s)

    def detach(self) -> None:
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def close(self) -> None:
        self.detach()
