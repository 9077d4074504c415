"""systemd as PID 1 in a privileged rootful podman container, for the real unit test.

The container's root is an overlay over the host's own root (`--rootfs /:O`), so
everything the project's set-up installed on the host (python3-bpfcc, the venv,
kernel headers, systemd itself) is there, and writes stay in the overlay.  The
checkout is bind-mounted at its own path, so the files the README installs are
the ones of this checkout even while they change on the host.  Choices, each
for a reason found on the CI VM:

* runc: crun refuses cgroup v1 hybrid hosts;
* ulimits set to values we may set: without CAP_SYS_RESOURCE the runtime cannot
  raise them;
* fresh tmpfs on /tmp, /run, /run/lock without copy-up: the host's /tmp holds
  sockets the runtime cannot copy;
* host network: Linux audit only answers in the initial network namespace;
* a minimal boot target (journald only), and auditd and journald's audit
  socket masked, so the host's enabled units (auditd, dockerd, timers...)
  do not start in the container and the kernel's audit state stays ours.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tempfile
import time
import uuid
from typing import Optional

BOOT_TARGET = """[Unit]
Description=gputrace systemd test (minimal boot)
Wants=systemd-journald.socket systemd-journald.service
AllowIsolate=yes
"""
MASKED = ("auditd.service", "systemd-journald-audit.socket")


def readme_blocks(repo: str) -> list[list[str]]:
    """The shell blocks of the README's "Running as a service" section, as commands."""
    with open(os.path.join(repo, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    section = text.split("## Running as a service", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    return [[line.split("  #")[0].replace("sudo ", "").strip()
             for line in block.splitlines() if line.strip() and "gputrace report" not in line]
            for block in blocks]


def under_private_tmp(path: str) -> bool:
    return any(os.path.realpath(path).startswith(top) for top in ("/tmp/", "/var/tmp/"))


class SystemdContainer:
    def __init__(self, repo: str) -> None:
        self.repo = repo
        self.name = f"gttest-systemd-{uuid.uuid4().hex[:8]}"
        self.scratch = tempfile.mkdtemp(prefix="gttest-systemd-")
        self.started = False

    @staticmethod
    def remove_stale() -> None:
        """Containers a killed earlier run left (the test runs under the exclusive lock)."""
        listed = subprocess.run(["podman", "ps", "-a", "-q", "--filter", "name=^gttest-systemd-"],
                                capture_output=True, text=True, timeout=60).stdout.split()
        if listed:
            subprocess.run(["podman", "rm", "-f", "-t", "5", *listed], capture_output=True,
                           timeout=120)

    def start(self, timeout: float = 120) -> "SystemdContainer":
        self.remove_stale()
        target = os.path.join(self.scratch, "gttest.target")
        with open(target, "w", encoding="utf-8") as handle:
            handle.write(BOOT_TARGET)
        masks: list[str] = []
        for unit in MASKED:
            masks += ["-v", f"/dev/null:/etc/systemd/system/{unit}:ro"]
        run = subprocess.run(
            ["podman", "run", "-d", "--name", self.name, "--privileged", "--runtime", "runc",
             "--network=host", "--systemd=always", "--cgroupns=private",
             "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096",
             "--tmpfs", "/tmp:rw,notmpcopyup", "--tmpfs", "/run:rw,exec,notmpcopyup",
             "--tmpfs", "/run/lock:rw,notmpcopyup",
             "-v", f"{self.repo}:{self.repo}", "-v", f"{target}:/etc/systemd/system/gttest.target:ro",
             *masks, "--rootfs", "/:O", "/lib/systemd/systemd", "--unit=gttest.target"],
            capture_output=True, text=True, timeout=timeout)
        if run.returncode != 0:
            raise AssertionError(f"podman could not start systemd: {run.stderr.strip()}")
        self.started = True
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.sh("systemctl is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return self
            time.sleep(0.5)
        raise AssertionError(f"systemd in the container did not come up (state {state!r}): "
                             + self.logs())

    def sh(self, command: str, check: bool = True, timeout: float = 300,
           workdir: Optional[str] = None) -> subprocess.CompletedProcess:
        """Run `command` with bash in the container (as root, in the checkout)."""
        done = subprocess.run(["podman", "exec", "-w", workdir or self.repo, self.name,
                               "bash", "-c", command], capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"in the container: {command!r} exited {done.returncode}: "
                                 f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return done

    def show(self, unit: str, *props: str) -> dict[str, str]:
        args = " ".join(f"-p {shlex.quote(p)}" for p in props)
        out = self.sh(f"systemctl show {shlex.quote(unit)} {args}").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        return self.sh(f"journalctl -u {shlex.quote(unit)} --no-pager -o cat", check=False).stdout

    def logs(self) -> str:
        return subprocess.run(["podman", "logs", self.name], capture_output=True,
                              text=True).stderr[-3000:]

    def install_gputrace(self, metrics_port: int) -> None:
        """The README's service install commands, run as written (less `sudo`), with a
        configuration that only moves /metrics to `metrics_port` (the container shares
        the host's network); a checkout under /tmp gets the README's drop-in."""
        self.sh(f"mkdir -p /etc/gputrace && printf 'metrics:\\n  port: {metrics_port}\\n' "
                "> /etc/gputrace/config.yaml")
        for command in readme_blocks(self.repo)[0]:
            if "systemctl daemon-reload" in command and under_private_tmp(self.repo):
                # README: the unit's PrivateTmp=yes hides a checkout under /tmp; its drop-in
                self.sh("mkdir -p /etc/systemd/system/gputrace.service.d && printf "
                        f"'[Service]\\nBindReadOnlyPaths={self.repo}\\n' "
                        "> /etc/systemd/system/gputrace.service.d/checkout.conf")
            self.sh(command, timeout=600)

    def remove(self) -> None:
        if self.started:
            subprocess.run(["podman", "rm", "-f", "-t", "5", self.name], capture_output=True,
                           timeout=120)
            self.started = False
        subprocess.run(["rm", "-rf", self.scratch])
