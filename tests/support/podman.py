"""Real podman for the scenarios: a busybox root filesystem, rootless or rootful
invocations (runc, or crun inside a private cgroup2 mount), the container's host pid,
and removal of everything a run leaves (container, rootless pause process).

No image registry is reachable from CI, so every container runs from a directory
(`--rootfs`) holding busybox-static and the gtprobe binary.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Sequence

BUSYBOX = "/bin/busybox"
BUSYBOX_APPLETS = ("sh", "sleep", "cat", "id", "ls", "echo", "stat", "ps")
COMMAND_TIMEOUT_S = 30.0


class PodmanFailed(RuntimeError):
    """A podman command failed; the message carries podman's own words."""


@dataclass(frozen=True)
class RootfsFiles:
    """The identity files a container's root filesystem carries."""

    passwd: Sequence[str] = ("root:x:0:0:root:/:/bin/sh",)
    group: Sequence[str] = ("root:x:0:",)


def build_rootfs(directory: str, probe_binary: str, files: RootfsFiles,
                 owner: "tuple[int, int] | None" = None) -> str:
    """Lay out a minimal root filesystem in `directory`: busybox with its applets,
    /gtprobe, /etc/passwd and /etc/group.  `owner` (uid, gid) makes it belong to a
    rootless user, whose podman must be able to create mount points in it."""
    if not os.path.exists(BUSYBOX):
        raise PodmanFailed(f"{BUSYBOX} is missing: install busybox-static")
    for sub in ("bin", "etc", "dev", "proc", "sys", "tmp", "run"):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
    shutil.copy2(BUSYBOX, os.path.join(directory, "bin/busybox"))
    for applet in BUSYBOX_APPLETS:
        os.symlink("busybox", os.path.join(directory, "bin", applet))
    shutil.copy2(probe_binary, os.path.join(directory, "gtprobe"))
    os.chmod(os.path.join(directory, "gtprobe"), 0o755)
    # podman creates this symlink itself, which fails in a directory it does not own.
    os.symlink("/proc/mounts", os.path.join(directory, "etc/mtab"))
    for name, lines in (("passwd", files.passwd), ("group", files.group)):
        with open(os.path.join(directory, "etc", name), "w", encoding="ascii") as out:
            out.write("".join(line + "\n" for line in lines))
    os.chmod(directory, 0o755)
    if owner is not None:
        for root, dirs, names in os.walk(directory):
            for entry in [root] + [os.path.join(root, n) for n in dirs + names]:
                os.lchown(entry, *owner)
    return directory


@dataclass(frozen=True)
class Podman:
    """How to invoke podman for one scenario.

    `user` None means rootful.  `private_cgroup2` runs podman inside `unshare -m`
    with a pure cgroup2 hierarchy mounted on /sys/fs/cgroup: crun refuses rootless
    containers on this host's hybrid v1+v2 layout."""

    runtime: str = "runc"
    user: "pwd.struct_passwd | None" = None
    private_cgroup2: bool = False
    global_options: Sequence[str] = field(default_factory=tuple)

    @property
    def rootless(self) -> bool:
        return self.user is not None

    @property
    def runtime_dir(self) -> "str | None":
        return f"/run/user/{self.user.pw_uid}" if self.user is not None else None

    def argv(self, *args: str) -> list[str]:
        command = ["podman", "--runtime", self.runtime, *self.global_options, *args]
        if self.user is not None:
            command = ["setpriv", f"--reuid={self.user.pw_uid}", f"--regid={self.user.pw_gid}",
                       "--init-groups", "--", *command]
        if self.private_cgroup2:
            command = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                       'mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec "$0" "$@"', *command]
        return command

    def env(self) -> dict[str, str]:
        if self.user is None:
            return dict(os.environ)
        return {"HOME": self.user.pw_dir, "USER": self.user.pw_name,
                "LOGNAME": self.user.pw_name, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                "XDG_RUNTIME_DIR": self.runtime_dir or ""}

    def prepare_user_runtime_dir(self) -> None:
        """Create /run/user/UID as logind would, so rootless state lands where tools look
        (and the pause process's pid file: XDG_RUNTIME_DIR/libpod/tmp/pause.pid)."""
        if self.user is None or self.runtime_dir is None:
            return
        os.makedirs("/run/user", mode=0o755, exist_ok=True)
        os.makedirs(self.runtime_dir, mode=0o700, exist_ok=True)
        os.chown(self.runtime_dir, self.user.pw_uid, self.user.pw_gid)

    def run(self, *args: str, timeout: float = COMMAND_TIMEOUT_S) -> str:
        """Run a podman command to completion; return its stdout."""
        try:
            done = subprocess.run(self.argv(*args), env=self.env(), cwd="/", capture_output=True,
                                  text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise PodmanFailed(f"podman {' '.join(args[:2])} took over {timeout:.0f}s") from exc
        if done.returncode != 0:
            raise PodmanFailed(f"podman {' '.join(args[:2])} failed: {done.stderr.strip()[-400:]}")
        return done.stdout

    def container_identity(self, name: str) -> tuple[int, str]:
        """(host pid of the container's first process, full container id)."""
        pid, container_id = self.run("inspect", "--format", "{{.State.Pid}} {{.Id}}", name).split()
        return int(pid), container_id

    def remove(self, name: str) -> None:
        self.run("rm", "--force", "--ignore", "--time", "0", name)


def video_rootfs(workdir: str, probe_binary: str, owner: "tuple[int, int]", video_gid: int) -> str:
    """`build_rootfs` in WORKDIR/rootfs for a rootless user (uid, gid): an image whose
    /etc/group has only root and the host's video gid (the rootless GPU scenarios)."""
    return build_rootfs(os.path.join(workdir, "rootfs"), probe_binary,
                        RootfsFiles(group=("root:x:0:", f"video:x:{video_gid}:")), owner=owner)


def kill_processes_of_uid(uid: int) -> list[int]:
    """Kill, by pid, every process whose real uid is `uid` (a throwaway test user)."""
    killed = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _process_uid(int(entry)) == uid:
            kill_and_wait(int(entry))
            killed.append(int(entry))
    return killed


def _process_uid(pid: int) -> "int | None":
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def kill_and_wait(pid: int, timeout_s: float = 5.0) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    # Not our child, so we cannot wait(); watch /proc until it is gone or a zombie.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except OSError:
            return
        time.sleep(0.02)
