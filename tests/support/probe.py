"""gtprobe, the process every scenario runs: building it, starting it (directly or
through `podman run`), reading the one line it reports, and holding it alive.

gtprobe's source is tests/fixtures/rootfs/gtprobe.c; it is compiled static once per
test process, so it runs inside a busybox root filesystem and as any user.
"""

from __future__ import annotations

import atexit
import errno as errno_codes
import functools
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.support.podman import Podman

SOURCE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "rootfs", "gtprobe.c")
OWNER_FILE = "owner"            # in each gttest- directory: "pid starttime" of its test process
REPORT_TIMEOUT_S = 20.0
FINISH_TIMEOUT_S = 15.0


class ProbeFailed(RuntimeError):
    """gtprobe did not report; the message carries what its launcher printed."""


@functools.lru_cache(maxsize=1)
def probe_binary() -> str:
    """Compile gtprobe (gcc and the static libc of libc6-dev) into a private directory
    that is removed when the test process exits."""
    directory = tempfile.mkdtemp(prefix="gttest-probe-", dir="/tmp")
    atexit.register(shutil.rmtree, directory, True)
    os.chmod(directory, 0o755)
    with open(os.path.join(directory, OWNER_FILE), "w", encoding="ascii") as owner:
        owner.write(process_identity(os.getpid()))  # lets a sweep remove it after a crash
    binary = os.path.join(directory, "gtprobe")
    try:
        subprocess.run(["gcc", "-static", "-Os", "-Wall", "-o", binary, SOURCE], check=True,
                       capture_output=True, text=True, timeout=60)
    except FileNotFoundError as exc:
        raise ProbeFailed("gcc is not installed (needed to build gtprobe)") from exc
    except subprocess.CalledProcessError as exc:
        raise ProbeFailed(f"cannot build gtprobe: {exc.stderr.strip()[-300:]}") from exc
    return binary


def process_identity(pid: int) -> str:
    """pid and start time: a pid alone may have been reused."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat_file:
        return f"{pid} {stat_file.read().rsplit(')', 1)[1].split()[19]}"


@dataclass(frozen=True)
class ProbeReport:
    """What gtprobe saw from inside its namespaces."""

    token: str
    pid: int            # in the probe's own pid namespace
    errno: int          # 0: the open succeeded
    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def parse(cls, line: str) -> "ProbeReport":
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        groups = tuple(int(g) for g in fields["groups"].split(",") if g)
        return cls(fields["token"], int(fields["pid"]), int(fields["errno"]),
                   int(fields["uid"]), int(fields["gid"]), groups)


@dataclass
class ProbeHolder:
    """The launched command (gtprobe itself, or the `podman run` attached to it)."""

    process: subprocess.Popen
    stderr_path: str

    @classmethod
    def start(cls, argv: list[str], env: dict[str, str], stderr_path: str,
              **credentials: object) -> "ProbeHolder":
        with open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(argv, env=env, cwd="/", stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=stderr,
                                       **credentials)  # type: ignore[call-overload]
        return cls(process, stderr_path)

    def stderr_tail(self) -> str:
        try:
            with open(self.stderr_path, encoding="utf-8", errors="replace") as source:
                return source.read().strip()[-400:]
        except OSError:
            return ""

    def finish(self) -> None:
        """Wait for the launcher to end (gtprobe was released or its hold ran out);
        kill it if it does not."""
        try:
            self.process.wait(timeout=FINISH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=FINISH_TIMEOUT_S)
        if self.process.stdout is not None:
            self.process.stdout.close()


def read_report(holder: ProbeHolder, token: str, timeout_s: float = REPORT_TIMEOUT_S) -> ProbeReport:
    """Read gtprobe's line from the launcher's stdout, within `timeout_s`."""
    assert holder.process.stdout is not None
    fd = holder.process.stdout.fileno()
    received = b""
    deadline = time.monotonic() + timeout_s
    while True:
        for line in received.decode("utf-8", "replace").splitlines(keepends=True):
            if line.startswith("gtprobe ") and line.endswith("\n"):
                report = ProbeReport.parse(line)
                if report.token != token:
                    raise ProbeFailed(f"gtprobe reported token {report.token}, expected {token}")
                return report
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProbeFailed(f"no report from gtprobe within {timeout_s:.0f}s: {holder.stderr_tail()}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                holder.process.wait(timeout=FINISH_TIMEOUT_S)
                raise ProbeFailed(f"gtprobe's launcher exited ({holder.process.returncode}) "
                                  f"before reporting: {holder.stderr_tail()}")
            received += chunk


@dataclass(frozen=True)
class Node:
    """A device node a scenario created on the host."""

    path: str
    major: int
    minor: int
    mode: int
    gid: int


@dataclass
class Attempt:
    """One open of a device node by gtprobe, and who did it.

    `host_pid` stays alive (gtprobe holds) until `release()` or the end of the
    scenario, so /proc/host_pid can be read."""

    scenario: str
    token: str
    node: Node              # as created on the host
    opened_path: str        # the path the process opened, inside its mount namespace
    report: ProbeReport
    host_pid: int
    holder: ProbeHolder = field(repr=False)
    setup_s: float = 0.0
    user: "str | None" = None            # host user who ran the process (or root)
    container_id: "str | None" = None
    container_name: "str | None" = None
    engine: "Podman | None" = field(default=None, repr=False)  # to run podman as the scenario did
    details: dict[str, object] = field(default_factory=dict)

    @property
    def node_path(self) -> str:
        return self.node.path

    @property
    def runtime(self) -> "str | None":
        return self.engine.runtime if self.engine else None

    @property
    def rootless(self) -> bool:
        return self.engine.rootless if self.engine else False

    @property
    def errno(self) -> int:
        return self.report.errno

    @property
    def errno_name(self) -> str:
        return errno_codes.errorcode.get(self.errno, str(self.errno)) if self.errno else "OK"

    def alive(self) -> bool:
        """True while host_pid is still this attempt's gtprobe."""
        try:
            with open(f"/proc/{self.host_pid}/cmdline", "rb") as cmdline:
                return self.token.encode() in cmdline.read().split(b"\0")
        except OSError:
            return False

    def release(self) -> None:
        """End the hold now (gtprobe exits on SIGTERM, even as a container's PID 1)."""
        if self.alive():
            try:
                os.kill(self.host_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.holder.finish()
