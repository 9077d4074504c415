"""What the bench changes on the machine, and puts back: a user, device nodes, audit state.

Everything is named `gtbench*`.  `BenchHost` is a context manager; leaving it
(normally, on an error or on Ctrl-C) removes the nodes, the user and every
audit rule the bench added, and restores audit's `enabled` flag.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Optional

BENCH_USER = "gtbench"
NODE_PREFIX = "/dev/nvidia-gtbench-"
NVIDIA_MAJOR = 195
FIRST_MINOR = 200  # well above real GPUs' minors; the node has no driver either way
CLK_TCK = os.sysconf("SC_CLK_TCK")


def run_quiet(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True)


@dataclass
class AuditControl:
    """auditctl, remembering what the bench added so that exactly that is removed."""

    initial_enabled: Optional[int] = None
    added: list[list[str]] = field(default_factory=list)

    def status(self) -> dict[str, str]:
        out = run_quiet(["auditctl", "-s"]).stdout
        return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)

    def snapshot(self) -> None:
        self.initial_enabled = int(self.status().get("enabled", "0"))

    def set_enabled(self, value: int) -> None:
        run_quiet(["auditctl", "-e", str(value)])

    def restore_enabled(self) -> None:
        if self.initial_enabled is not None and int(self.status().get("enabled", "0")) != self.initial_enabled:
            self.set_enabled(self.initial_enabled)

    def add(self, rule: list[str]) -> None:
        done = run_quiet(["auditctl", "-a", *rule])
        if done.returncode != 0:
            raise RuntimeError(f"auditctl -a {' '.join(rule)}: {done.stderr.strip()}")
        self.added.append(rule)

    def delete(self, rule: list[str]) -> None:
        run_quiet(["auditctl", "-d", *rule])
        if rule in self.added:
            self.added.remove(rule)

    def remove_all_added(self) -> None:
        for rule in list(reversed(self.added)):
            self.delete(rule)


class BenchHost:
    """The bench user, its fast-path audit rule, the GPU-like nodes and a work dir."""

    def __init__(self) -> None:
        self.audit = AuditControl()
        self.uid = self.gid = -1
        self.created_user = False
        self.nodes: list[str] = []
        self.workdir = ""
        self.fastpath_rule: list[str] = []

    def __enter__(self) -> "BenchHost":
        try:
            self.workdir = tempfile.mkdtemp(prefix="gtbench-")
            os.chmod(self.workdir, 0o755)
            self._ensure_user()
            self.audit.snapshot()
            # A task created while audit has ever been enabled since boot carries an audit
            # context, which alone puts every syscall on the slow path.  This rule keeps
            # tasks forked by the bench user off it, so "no tracer" means no tracer.
            self.fastpath_rule = ["never,task", "-F", f"uid={self.uid}"]
            self.audit.add(self.fastpath_rule)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _ensure_user(self) -> None:
        try:
            pw = pwd.getpwnam(BENCH_USER)
        except KeyError:
            done = run_quiet(["useradd", "--system", "--no-create-home", "--user-group",
                              "--shell", "/usr/sbin/nologin", BENCH_USER])
            if done.returncode != 0:
                raise RuntimeError(f"useradd {BENCH_USER}: {done.stderr.strip()}")
            self.created_user = True
            pw = pwd.getpwnam(BENCH_USER)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid

    def audit_context_for_loops(self, wanted: bool) -> None:
        """Let the bench user's new tasks carry an audit context (audit configs) or not."""
        present = self.fastpath_rule in self.audit.added
        if wanted and present:
            self.audit.delete(self.fastpath_rule)
        elif not wanted and not present:
            self.audit.add(self.fastpath_rule)

    def make_node(self, name: str) -> str:
        """A driverless char node with the NVIDIA major, mode 0600 root: the bench user gets EACCES."""
        path = NODE_PREFIX + name
        minor = FIRST_MINOR + len(self.nodes)
        if os.path.lexists(path):
            os.unlink(path)
        os.mknod(path, 0o600 | 0o020000, os.makedev(NVIDIA_MAJOR, minor))
        os.chmod(path, 0o600)
        self.nodes.append(path)
        return path

    def user_popen_kwargs(self) -> dict:
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def __exit__(self, *exc: object) -> None:
        for path in self.nodes:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.nodes.clear()
        self.audit.remove_all_added()
        self.audit.restore_enabled()
        if self.created_user:
            run_quiet(["userdel", BENCH_USER])
            self.created_user = False
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


# -- /proc readings ------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (utime + stime) of the process's threads, summed by thread name."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def memory_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:", "RssShmem:")):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0])
    return out


def machine_facts() -> dict:
    import datetime
    import platform

    return {"loadavg_1m_at_start": round(os.getloadavg()[0], 2),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "kernel": platform.release(), "nproc": os.cpu_count(), "arch": platform.machine(),
            "cpu": _cpu_model(), "mem_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                  * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"
