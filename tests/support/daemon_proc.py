"""`gputrace daemon` / `gputrace report` as real subprocesses, for service tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPUTRACE = [sys.executable, "-m", "tracer"]
READY = re.compile(r"daemon ready: .*metrics http://[^:]+:(\d+)/metrics")


def write_config(directory: str, data: dict[str, Any], name: str = "config.yaml") -> str:
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(data, handle, sort_keys=False)
    return path


def service_config(base: str, **sections: Any) -> dict[str, Any]:
    """A config whose state and runtime dirs live under `base`, metrics on a free port."""
    cfg: dict[str, Any] = {"state_dir": os.path.join(base, "state"),
                           "runtime_dir": os.path.join(base, "run"),
                           "metrics": {"listen": "127.0.0.1", "port": 0},
                           "sensor": {"aggregate_interval_s": 0.5, "sweep_interval_s": 0.5}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(GPUTRACE + list(args), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@dataclass
class DaemonProcess:
    config_path: str
    proc: Optional[subprocess.Popen] = None
    stderr_lines: list[str] = field(default_factory=list)
    metrics_port: Optional[int] = None
    prefix: list[str] = field(default_factory=list)  # e.g. setpriv with fewer capabilities

    def start(self, timeout: float = 90) -> "DaemonProcess":
        self.stderr_lines = []
        self.proc = subprocess.Popen(self.prefix + GPUTRACE + ["daemon", "--config", self.config_path],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, cwd=REPO)
        ready = threading.Event()
        threading.Thread(target=self._read_stderr, args=(ready,), daemon=True).start()
        if not ready.wait(timeout) or self.metrics_port is None:
            self.kill()
            raise AssertionError("daemon did not start: " + "".join(self.stderr_lines))
        return self

    def _read_stderr(self, ready: threading.Event) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line)
            found = READY.search(line)
            if found:
                self.metrics_port = int(found.group(1))
                ready.set()
        ready.set()  # exited before ready

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def wait_stderr(self, needle: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.stderr:
                return self.stderr
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in daemon stderr: {self.stderr}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        time.sleep(0.05)  # let the reader thread take the last lines
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()
