"""The configurations the overhead benchmark compares, each attachable and detachable.

Every configuration runs the same workload as the same user; only what is
attached to the kernel differs.  `attach()` returns once the probe is live.
`audit_context` says whether the workload's tasks must carry an audit context
(the audit configurations: audit only sees tasks that have one).
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Optional

from contrib.bench.machine import AuditControl
from contrib.bench.processes import Gputrace, TracerFailed, TracerProcess

PLAIN_AUDIT_KEY = "gtbench"
OPENSNOOP = "opensnoop-bpfcc"
TRACE = "trace-bpfcc"


class Unavailable(RuntimeError):
    """This configuration cannot run on this machine; the message says why."""


def settle(pid: int, quiet_s: float = 0.5, timeout_s: float = 10.0) -> float:
    """Wait until the tracer process is idle (no CPU time used for `quiet_s`), so
    loops measure its steady state, not its start-up work; returns the wait."""
    from contrib.bench.machine import cpu_seconds

    t0 = time.monotonic()
    last = cpu_seconds(pid)
    while time.monotonic() - t0 < timeout_s:
        time.sleep(quiet_s)
        now = cpu_seconds(pid)
        if now - last < 0.02:
            break
        last = now
    return time.monotonic() - t0


class NoTracer:
    name = "none"
    audit_context = False
    note = ""

    def attach(self) -> None:
        pass

    def detach(self) -> None:
        pass

    def close(self) -> None:
        pass


class AuditContextOnly(NoTracer):
    """No tracer, but the workload's tasks carry an audit context, as every task does
    once audit has been enabled since boot (auditd running, or any audit rule ever)."""

    name = "none, audit context"
    audit_context = True
    note = "slow-path floor: syscall work flag set, no probe, no rule"


def bcc_environment() -> dict:
    """BCC_KERNEL_SOURCE pointing at headers BCC can compile with (as gputrace finds them)."""
    from tracer.sensors import kernel_headers

    env = dict(os.environ)
    choice = kernel_headers.find_headers()
    if choice.source:
        env["BCC_KERNEL_SOURCE"] = choice.source
    return env


SYSCALL_EXIT_TRACEPOINTS = ("open", "creat", "openat", "openat2", "ioctl")


class EmptyProgram(NoTracer):
    """Empty BPF programs on gputrace's hooks, the syscall exit tracepoints: the floor
    any tracer on those hooks pays.  `raw=True`: one empty program on the raw
    sys_exit tracepoint instead (every syscall runs it; gputrace's hook before)."""

    def __init__(self, raw: bool = False) -> None:
        from bcc import BPF

        from tracer.sensors import preflight
        from tracer.sensors.bpf_sensor import bpf_source_dir

        preflight.require_tracefs()
        source = bcc_environment().get("BCC_KERNEL_SOURCE")
        if source:
            os.environ["BCC_KERNEL_SOURCE"] = source
        self.raw = raw
        self.name = "empty, raw sys_exit" if raw else "floor: empty, syscall exit tracepoints"
        self.note = ("one empty program on raw_syscalls:sys_exit (every syscall runs it)" if raw
                     else "empty programs on syscalls:sys_exit_{open,creat,openat,openat2,ioctl}")
        self.bpf = BPF(src_file=os.path.join(bpf_source_dir(), "bench_empty.bpf.c").encode(),
                       cflags=["-DRAW_SYS_EXIT=1"] if raw else [])
        self.detach()

    def attach(self) -> None:
        if self.raw:
            self.bpf.attach_raw_tracepoint(tp=b"sys_exit", fn_name=b"raw_tracepoint__sys_exit")
            return
        for name in SYSCALL_EXIT_TRACEPOINTS:
            self.bpf.attach_tracepoint(tp=f"syscalls:sys_exit_{name}".encode(),
                                       fn_name=f"tracepoint__syscalls__sys_exit_{name}".encode())

    def detach(self) -> None:
        if self.raw:
            self.bpf.detach_raw_tracepoint(b"sys_exit")
            return
        for name in SYSCALL_EXIT_TRACEPOINTS:
            self.bpf.detach_tracepoint(f"syscalls:sys_exit_{name}".encode())

    def close(self) -> None:
        self.bpf.cleanup()


class GputraceTracer(NoTracer):
    """gputrace started as its own process for each round, stopped after it."""

    def __init__(self, kind: str, workdir: str) -> None:
        self.gputrace = Gputrace(kind, workdir, tag=f"overhead-{kind}")
        self.audit_context = kind == "watch-audit"
        self.name = {"daemon": "gputrace daemon (BPF)", "watch-bpf": "gputrace watch (BPF)",
                     "watch-audit": "gputrace audit sensor"}[kind]
        self.ready_s: list[float] = []

    def attach(self) -> None:
        self.gputrace.start()
        assert self.gputrace.process is not None
        self.ready_s.append(self.gputrace.process.ready_s)
        settle(self.gputrace.pid)
        self.note = ("gputrace watch --sensor audit, own process" if self.gputrace.kind == "watch-audit"
                     else "own process, default configuration")

    def detach(self) -> None:
        self.gputrace.stop()


def why_bcc_tool_failed(stderr_lines: list[str]) -> str:
    """A one-line reason from a BCC tool's traceback, and whether its kprobe fallback exists."""
    text = "".join(stderr_lines)
    reasons = []
    if "kretfunc" in text or "kfunc" in text:
        refused = "Operation not permitted" in text
        reasons.append("its fentry/fexit programs do not load"
                       + (" (bpf: Operation not permitted)" if refused else ""))
    if not os.path.exists("/sys/kernel/tracing/kprobe_events"):
        reasons.append("kprobes, its other mode, are unavailable (no "
                       "/sys/kernel/tracing/kprobe_events)")
    return "; ".join(reasons)


def opensnoop_argv() -> list[str]:
    return [OPENSNOOP, "-x"]


def trace_standin_argv() -> list[str]:
    """The stock BCC tool that does load here: every failed openat, one line each."""
    return [TRACE, "-T", "t:syscalls:sys_exit_openat (args->ret < 0) \"ret=%d\", args->ret"]


class PeerTool(NoTracer):
    """opensnoop-bpfcc -x, or where it cannot load, trace-bpfcc on the syscall tracepoint."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.env = bcc_environment()
        self.why_not_opensnoop = ""
        self.argv, self.name = opensnoop_argv(), "opensnoop-bpfcc -x"
        self.note = ""
        try:
            self._probe_once()
        except (Unavailable, TracerFailed) as exc:
            self.why_not_opensnoop = str(exc)
            self.argv = trace_standin_argv()
            self.name = "trace-bpfcc (stand-in)"
            self.note = "every failed openat, one line each (opensnoop-bpfcc cannot load here)"
            self._probe_once()
        self.process: Optional[TracerProcess] = None

    def _probe_once(self) -> None:
        if shutil.which(self.argv[0]) is None:
            raise Unavailable(f"{self.argv[0]} is not installed (Debian package bpfcc-tools)")
        proc = self.make_process(os.path.join(self.workdir, "peer-probe.out"))
        try:
            proc.start()
        except TracerFailed as exc:
            raise Unavailable(why_bcc_tool_failed(proc.stderr_lines) or str(exc)) from None
        finally:
            proc.stop()

    def make_process(self, stdout_path: str) -> TracerProcess:
        return TracerProcess(self.name, self.argv, r"PID", ready_on_stdout=True,
                             stdout_path=stdout_path, env=self.env)

    def attach(self) -> None:
        self.process = self.make_process(os.path.join(self.workdir, "peer.out"))
        self.process.start()
        settle(self.process.pid)

    def detach(self) -> None:
        if self.process:
            self.process.stop()
            self.process = None


def plain_audit_rules() -> list[list[str]]:
    """The audit rules equivalent to gputrace's audit sensor, as an admin would type them."""
    syscalls = "openat,open,openat2,creat,ioctl"
    return [["exit,always", "-F", "arch=b64", "-S", syscalls, "-F", f"exit=-{err}",
             "-k", PLAIN_AUDIT_KEY] for err in ("EACCES", "EPERM")]


class PlainAuditRules(NoTracer):
    """auditctl rules for denied opens and ioctls; no audit daemon (records go to printk)."""

    name = "audit rules (auditctl)"
    audit_context = True
    note = "exit=-EACCES/-EPERM on open*,creat,ioctl; no auditd"

    def __init__(self, audit: AuditControl) -> None:
        self.audit = audit
        self.enabled_by_us = False

    def attach(self) -> None:
        if int(self.audit.status().get("enabled", "0")) == 0:
            self.audit.set_enabled(1)
            self.enabled_by_us = True
        for rule in plain_audit_rules():
            self.audit.add(rule)

    def detach(self) -> None:
        for rule in plain_audit_rules():
            self.audit.delete(rule)
        if self.enabled_by_us:
            self.audit.set_enabled(0)
            self.enabled_by_us = False
