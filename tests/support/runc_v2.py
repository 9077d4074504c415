"""A rootful runc container on a pure cgroup2 mount (issue 17's v2 cases).

This host is hybrid: cgroup2 is at /sys/fs/cgroup/unified.  runc manages v2
only when /sys/fs/cgroup is a cgroup2 mount, so every runc call runs in a
private mount namespace with cgroup2 mounted there (the same hierarchy).
runc then attaches a BPF_CGROUP_DEVICE program instead of writing
devices.allow.  State lives under its own --root, which the test's container
tracker is given as an extra root."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
from typing import Optional, Sequence

from tests.support.nodes import unique
from tests.support.podman import BUSYBOX

UNIFIED = "/sys/fs/cgroup/unified"


class RuncV2:
    def __init__(self, args: Sequence[str] = ("sleep", "600"),
                 extra_gids: Sequence[int] = ()) -> None:
        self.id = unique("gtv2")
        self.base = tempfile.mkdtemp(prefix="gttest-runcv2-", dir="/tmp")
        os.chmod(self.base, 0o755)
        self.root = os.path.join(self.base, "state")
        self.bundle = os.path.join(self.base, "bundle")
        self.cgroup = f"/{self.id}"
        self.args = list(args)
        self.extra_gids = list(extra_gids)
        self.pid = 0

    def runc(self, *args: str, check: bool = True) -> "subprocess.CompletedProcess[str]":
        inner = "mount -t cgroup2 none /sys/fs/cgroup && exec " + shlex.join(
            ["runc", "--root", self.root, *args])
        if args[:1] == ("run",):  # the container keeps runc's stdio: give it a file, not a pipe
            inner += " >" + shlex.quote(os.path.join(self.base, "container.log")) + " 2>&1"
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", inner],
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise AssertionError(f"runc {' '.join(args[:2])}: {done.stderr.strip()[-600:]}")
        return done

    def start(self) -> "RuncV2":
        rootfs = os.path.join(self.bundle, "rootfs")
        for sub in ("bin", "dev", "proc", "etc"):
            os.makedirs(os.path.join(rootfs, sub))
        shutil.copy2(BUSYBOX, os.path.join(rootfs, "bin/busybox"))
        subprocess.run(["runc", "spec", "--bundle", self.bundle], check=True)
        with open(os.path.join(self.bundle, "config.json"), encoding="utf-8") as handle:
            spec = json.load(handle)
        spec["process"].update(terminal=False, args=["/bin/busybox", *self.args])
        spec["process"]["user"]["additionalGids"] = self.extra_gids
        spec["root"]["readonly"] = False
        spec["linux"]["cgroupsPath"] = self.cgroup
        with open(os.path.join(self.bundle, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(spec, handle)
        self.runc("run", "-d", "--bundle", self.bundle, self.id)
        self.pid = int(json.loads(self.runc("state", self.id).stdout)["pid"])
        return self

    @property
    def cgroup_dir(self) -> str:
        return UNIFIED + self.cgroup

    def exec(self, *argv: str) -> "subprocess.CompletedProcess[str]":
        return self.runc("exec", self.id, "/bin/busybox", *argv, check=False)

    def remove(self) -> None:
        self.runc("kill", self.id, "KILL", check=False)
        self.runc("delete", "-f", self.id, check=False)
        shutil.rmtree(self.base, ignore_errors=True)


def make_container_node(pid: int, path: str, major: int, minor: int,
                        mode: int = 0o666, gid: Optional[int] = None) -> None:
    """A node inside the container's /dev, made after it started (as a hook does)."""
    target = f"/proc/{pid}/root{path}"
    os.mknod(target, mode | 0o020000, os.makedev(major, minor))
    os.chmod(target, mode)
    if gid is not None:
        os.chown(target, 0, gid)
