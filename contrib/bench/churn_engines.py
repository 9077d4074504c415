"""The container engines the churn benchmark starts containers with.

Every container runs `open_once TOKEN /dev/nvidia0`: its comm is TOKEN, so a
denial is matched to its container by what the process itself said, not by
gputrace's attribution (which is what is measured).  /dev/nvidia0 is a bind
mount of a driverless host node the container's device cgroup does not allow:
the open fails with EPERM, as a `-v /dev/nvidia0` without `--device` does.

`RuncEngine` drives runc directly (the fastest starts: no daemon in the way),
`DockerEngine` a private dockerd (own data root, exec root and socket, no
iptables, vfs storage; its image is `docker import` of the tiny root).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from dataclasses import dataclass
from typing import Optional, Union

CONTAINER_PATH = "/dev/nvidia0"
DOCKER_START_TIMEOUT_S = 60.0


class EngineFailed(RuntimeError):
    """The engine could not start or run a container; the message says why, in one line."""


@dataclass
class Started:
    """One container: what it was, how long its engine command took, and what it said."""

    token: str
    expected_id: str
    expected_name: str
    wall_s: float
    refused: bool      # the container printed errno=1 (EPERM): the denial happened
    error: str = ""


def build_open_once(workdir: str) -> str:
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "open_once.c")
    exe = os.path.join(workdir, "open_once")
    done = subprocess.run(["gcc", "-static", "-O2", "-Wall", "-o", exe, src],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise EngineFailed(f"cannot build open_once: {done.stderr.strip()[-200:]}")
    return exe


def make_rootfs(directory: str, open_once: str) -> str:
    """The container's whole root: open_once and the mount points runc needs."""
    for sub in ("proc", "dev", "sys", "tmp", "etc"):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
    shutil.copy2(open_once, os.path.join(directory, "open_once"))
    os.chmod(os.path.join(directory, "open_once"), 0o755)
    for name in ("hostname", "hosts", "resolv.conf"):  # docker bind-mounts these
        open(os.path.join(directory, "etc", name), "a").close()
    return directory


def _finish(token: str, expected_id: str, name: str, started: float,
            done: "subprocess.CompletedProcess[str]") -> Started:
    wall = time.monotonic() - started
    refused = f"{token} errno=1" in done.stdout  # EPERM; a quiet container says 26 (ETXTBSY)
    error = "" if refused else (done.stderr.strip() or done.stdout.strip())[-200:]
    return Started(token, expected_id, name, wall, refused, error)


class RuncEngine:
    """`runc run` of one bundle per worker; the container id is also its name (no
    engine names it otherwise), and runc puts it in the cgroup /<id>."""

    name = "runc"

    def __init__(self, workdir: str, node: str, open_once: str, workers: int) -> None:
        if shutil.which("runc") is None:
            raise EngineFailed("runc is not installed")
        self.base = os.path.join(workdir, "churn-runc")
        rootfs = make_rootfs(os.path.join(self.base, "rootfs"), open_once)
        template = os.path.join(self.base, "template")
        os.makedirs(template, exist_ok=True)
        subprocess.run(["runc", "spec", "--bundle", template], check=True)
        with open(os.path.join(template, "config.json")) as f:
            self.spec = json.load(f)
        self.spec["root"] = {"path": rootfs, "readonly": True}
        self.spec["process"]["terminal"] = False
        self.spec["mounts"].append({"destination": CONTAINER_PATH, "type": "bind",
                                    "source": node, "options": ["bind"]})
        self.open_path = CONTAINER_PATH
        self.bundles = [os.path.join(self.base, f"bundle{w}") for w in range(workers)]
        for bundle in self.bundles:
            os.makedirs(bundle, exist_ok=True)

    def run(self, worker: int, token: str) -> Started:
        cid = f"gtbench-{token}"
        bundle = self.bundles[worker]
        spec = dict(self.spec, process=dict(self.spec["process"],
                                            args=["/open_once", token, self.open_path]))
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(spec, f)
        started = time.monotonic()
        done = subprocess.run(["runc", "run", "--bundle", bundle, cid], capture_output=True,
                              text=True, timeout=60)
        return _finish(token, cid, cid, started, done)

    def close(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


class DockerEngine:
    """`docker run --rm` against a private dockerd; the id comes from --cidfile."""

    name = "docker"
    image = "gtbench/churn:latest"

    def __init__(self, workdir: str, node: str, open_once: str, workers: int) -> None:
        if shutil.which("dockerd") is None:
            raise EngineFailed("dockerd is not installed (Debian package docker.io)")
        self.base = os.path.join(workdir, "churn-docker")
        self.node = node
        self.open_path = CONTAINER_PATH
        self.socket = os.path.join(self.base, "docker.sock")
        self.cids = os.path.join(self.base, "cids")
        os.makedirs(self.cids)
        self.process: Optional[subprocess.Popen] = None
        self._start_dockerd()
        rootfs = make_rootfs(os.path.join(self.base, "rootfs"), open_once)
        tar_path = os.path.join(self.base, "rootfs.tar")
        with tarfile.open(tar_path, "w") as tar:
            tar.add(rootfs, arcname=".")
        self._docker("import", tar_path, self.image)

    def _start_dockerd(self) -> None:
        log = open(os.path.join(self.base, "dockerd.log"), "wb")
        self.process = subprocess.Popen(
            ["dockerd", "--data-root", os.path.join(self.base, "data"),
             "--exec-root", os.path.join(self.base, "exec"),
             "--pidfile", os.path.join(self.base, "docker.pid"), "-H", f"unix://{self.socket}",
             "--iptables=false", "--ip-masq=false", "--bridge=none", "--storage-driver=vfs"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + DOCKER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EngineFailed("dockerd exited at start (see its log)")
            if subprocess.run(self._argv("version"), capture_output=True).returncode == 0:
                return
            time.sleep(0.3)
        raise EngineFailed(f"dockerd did not answer within {DOCKER_START_TIMEOUT_S:.0f} s")

    def _argv(self, *args: str) -> list[str]:
        return ["docker", "-H", f"unix://{self.socket}", *args]

    def _docker(self, *args: str) -> str:
        done = subprocess.run(self._argv(*args), capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise EngineFailed(f"docker {args[0]}: {done.stderr.strip()[-200:]}")
        return done.stdout

    def run(self, worker: int, token: str) -> Started:
        name = f"gtbench-{token}"
        cidfile = os.path.join(self.cids, token)
        started = time.monotonic()
        done = subprocess.run(self._argv("run", "--rm", "--network", "none", "--name", name,
                                         "--cidfile", cidfile, "-v",
                                         f"{self.node}:{CONTAINER_PATH}", self.image,
                                         "/open_once", token, self.open_path),
                              capture_output=True, text=True, timeout=120)
        try:
            with open(cidfile) as f:
                cid = f.read().strip()
        except OSError:
            cid = ""
        return _finish(token, cid, name, started, done)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        subprocess.run(["umount", "-R", "-l", self.base], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


Engine = Union[RuncEngine, DockerEngine]
ENGINES: dict[str, type[Engine]] = {"runc": RuncEngine, "docker": DockerEngine}
