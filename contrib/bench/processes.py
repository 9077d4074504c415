"""Tracers that run as their own process, and taps on what gputrace delivers.

`TracerProcess` starts a command, waits for its readiness line (probes
attached) and records how long that took; `EventTap` collects the JSON events
gputrace delivers (daemon socket, or `watch --json` stdout) with their arrival
time, so storm counts and latency are measured where a user would read them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
READY_TIMEOUT_S = 120


class TracerFailed(RuntimeError):
    """The tracer exited or never became ready; the message says why, in one line."""


@dataclass
class TracerProcess:
    name: str
    argv: list[str]
    ready: str                     # regex on stderr (or stdout) that means "attached"
    ready_on_stdout: bool = False
    stdout_path: Optional[str] = None   # keep stdout in a file (peer tools' events)
    on_stdout_line: Optional[Callable[[float, str], None]] = None
    env: Optional[dict] = None
    proc: Optional[subprocess.Popen] = None
    ready_s: float = 0.0
    ready_match: Optional[re.Match] = None
    stderr_lines: list[str] = field(default_factory=list)

    def start(self) -> None:
        sink = open(self.stdout_path, "w") if self.stdout_path else None
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=sink or subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=REPO, env=self.env,
                                     start_new_session=True)
        if sink:
            sink.close()
        self.stderr_lines = []
        ready = threading.Event()
        pattern = re.compile(self.ready)
        threading.Thread(target=self._read, args=(self.proc.stderr, not self.ready_on_stdout,
                                                  pattern, ready), daemon=True).start()
        if self.proc.stdout is not None:
            threading.Thread(target=self._read, args=(self.proc.stdout, self.ready_on_stdout,
                                                      pattern, ready), daemon=True).start()
        if self.stdout_path and self.ready_on_stdout:
            threading.Thread(target=self._watch_file, args=(pattern, ready), daemon=True).start()
        if not ready.wait(READY_TIMEOUT_S) or self.ready_match is None:
            self.stop()
            tail = [line.strip() for line in self.stderr_lines if line.strip()]
            raise TracerFailed(f"{self.name} did not become ready: "
                               f"{tail[-1] if tail else 'no output'}")
        self.ready_s = time.monotonic() - t0

    def _read(self, stream, check: bool, pattern: re.Pattern, ready: threading.Event) -> None:
        is_stderr = stream is (self.proc.stderr if self.proc else None)
        for line in stream:
            now = time.time()
            if is_stderr:
                self.stderr_lines.append(line)
            elif self.on_stdout_line:
                self.on_stdout_line(now, line)
            if check and not ready.is_set():
                found = pattern.search(line)
                if found:
                    self.ready_match = found
                    ready.set()
        if check:
            ready.set()  # exited before ready

    def _watch_file(self, pattern: re.Pattern, ready: threading.Event) -> None:
        while not ready.is_set() and self.proc and self.proc.poll() is None:
            with open(self.stdout_path) as f:  # type: ignore[arg-type]
                found = pattern.search(f.read(65536))
            if found:
                self.ready_match = found
                ready.set()
                return
            time.sleep(0.05)
        ready.set()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 30) -> Optional[int]:
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # every tracer here prints its summary on SIGINT
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        time.sleep(0.05)  # let reader threads take the last lines
        return proc.returncode


# -- gputrace itself ------------------------------------------------------------------
def daemon_argv(config_path: str) -> tuple[list[str], str]:
    """`python -m tracer daemon` with its configuration, and how to label it.  Started
    through `run_named`, so that each of its threads can be measured on its own."""
    code = "import sys; from contrib.bench.processes import run_named; run_named(sys.argv[1:])"
    return [sys.executable, "-c", code, "daemon", "--config", config_path], "gputrace daemon"


def run_named(argv: list[str]) -> None:
    """gputrace's CLI, each Python thread carrying its name as its OS thread's name
    (prctl PR_SET_NAME, 15 bytes), so /proc/PID/task/TID/comm tells the container
    tracker's CPU from the sensor's (machine.thread_cpu).  Nothing else differs."""
    import ctypes

    libc = ctypes.CDLL(None)
    plain_run = threading.Thread.run

    def named_run(self: threading.Thread) -> None:
        libc.prctl(15, self.name[:15].encode(), 0, 0, 0)  # PR_SET_NAME
        plain_run(self)
    threading.Thread.run = named_run  # type: ignore[method-assign]
    from tracer.cli import main
    main(argv)


def write_daemon_config(workdir: str, tag: str) -> tuple[str, str]:
    """A config whose state and socket live under `workdir`; returns (path, socket path)."""
    import yaml

    base = os.path.join(workdir, f"daemon-{tag}")
    os.makedirs(base, exist_ok=True)
    cfg = {"state_dir": os.path.join(base, "state"), "runtime_dir": os.path.join(base, "run"),
           "metrics": {"listen": "127.0.0.1", "port": 0}}
    path = os.path.join(base, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path, os.path.join(base, "run", "events.sock")


@dataclass
class Gputrace:
    """gputrace as its own process: the daemon (preferred) or `watch --json`."""

    kind: str          # "daemon" | "watch-bpf" | "watch-audit"
    workdir: str
    tag: str = "x"
    label: str = ""
    process: Optional[TracerProcess] = None
    socket_path: str = ""
    tap: Optional["EventTap"] = None

    def start(self, tap: bool = False) -> None:
        self.tap = EventTap() if tap else None
        if self.kind == "daemon":
            config, self.socket_path = write_daemon_config(self.workdir, self.tag)
            argv, self.label = daemon_argv(config)
            self.process = TracerProcess("gputrace-daemon", argv, r"daemon ready: .*metrics "
                                         r"http://[^:]+:(\d+)/metrics")
        else:
            sensor = "audit" if self.kind == "watch-audit" else "bpf"
            argv = [sys.executable, "-m", "tracer", "watch", "--sensor", sensor, "--json"]
            self.label = f"gputrace watch --sensor {sensor} --json"
            self.process = TracerProcess(f"gputrace-{self.kind}", argv, r"gputrace: watching",
                                         on_stdout_line=self.tap.add_line if self.tap else None)
            if not self.tap:
                self.process.stdout_path = os.devnull
        self.process.start()
        if self.tap and self.kind == "daemon":
            self.tap.connect(self.socket_path)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def metrics_url(self) -> Optional[str]:
        if self.process and self.process.ready_match and self.kind == "daemon":
            return f"http://127.0.0.1:{self.process.ready_match.group(1)}/metrics"
        return None

    def scrape(self) -> dict[str, float]:
        """Prometheus samples as {'name{labels}': value}."""
        url = self.metrics_url
        if not url:
            return {}
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def stop(self) -> str:
        """Stop; returns gputrace's last stderr line (its summary)."""
        if self.process is None:
            return ""
        self.process.stop()
        if self.tap:
            self.tap.close()
        lines = [line.strip() for line in self.process.stderr_lines if line.strip()]
        return lines[-1] if lines else ""


def choose_bpf_process(workdir: str) -> tuple[str, str]:
    """The daemon when it starts here, else `gputrace watch`; returns (kind, why)."""
    trial = Gputrace("daemon", workdir, tag="trial")
    try:
        trial.start()
    except (TracerFailed, OSError) as exc:
        return "watch-bpf", f"the daemon did not start ({exc}); using gputrace watch --json"
    finally:
        trial.stop()
    return "daemon", trial.label


class EventTap:
    """Arrival time and content of every JSON event gputrace delivers."""

    def __init__(self) -> None:
        self.events: list[tuple[float, dict]] = []
        self.lock = threading.Lock()
        self.conn: Optional[socket.socket] = None
        self.thread: Optional[threading.Thread] = None

    def add_line(self, arrived: float, line: str) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return
        if isinstance(message, dict) and "gputrace" not in message:
            with self.lock:
                self.events.append((arrived, message))

    def connect(self, path: str) -> None:
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn.connect(path)
        self.thread = threading.Thread(target=self._read_socket, daemon=True)
        self.thread.start()

    def _read_socket(self) -> None:
        assert self.conn is not None
        buffer = b""
        while True:
            try:
                chunk = self.conn.recv(1 << 16)
            except OSError:
                return
            if not chunk:
                return
            arrived = time.time()
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                self.add_line(arrived, line.decode("utf-8", "replace"))

    def snapshot(self) -> list[tuple[float, dict]]:
        with self.lock:
            return list(self.events)

    def counted_for(self, pids: set[int]) -> int:
        """Denials of `pids` as gputrace reports them: the highest `count` per key, summed."""
        best: dict[str, int] = {}
        for _, event in self.snapshot():
            if event.get("process", {}).get("pid") in pids:
                key = event.get("key") or f"{event['process']['pid']}-{id(event)}"
                best[key] = max(best.get(key, 0), int(event.get("count", 1)))
        return sum(best.values())

    def close(self) -> None:
        if self.thread is not None:
            self.thread.join(10)  # the daemon closes the stream after its final drain
        if self.conn is not None:
            self.conn.close()
