"""A private dockerd for the tests: its own data root, exec root, socket and
pid file under /tmp/gttest-docker-TOKEN, so it collides with nothing; no
iptables, no bridge, the vfs storage driver (no systemd, no registry here).
Images come from `docker import` of a busybox root filesystem."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tarfile
import time
from typing import Sequence

START_TIMEOUT_S = 60.0
IMAGE = "gttest/busybox:latest"


class DockerFailed(RuntimeError):
    """dockerd or a docker command failed; the message carries docker's words."""


class PrivateDocker:
    def __init__(self) -> None:
        self.base = f"/tmp/gttest-docker-{secrets.token_hex(3)}"
        self.exec_root = os.path.join(self.base, "exec")
        self.data_root = os.path.join(self.base, "data")
        self.socket = os.path.join(self.base, "docker.sock")
        self.process: "subprocess.Popen[bytes] | None" = None

    @property
    def runc_root(self) -> str:
        """Where docker's containerd shim keeps runc's state (namespace moby)."""
        return os.path.join(self.exec_root, "runtime-runc", "moby")

    def start(self) -> "PrivateDocker":
        if shutil.which("dockerd") is None:
            raise DockerFailed("dockerd is not installed (apt-get install docker.io)")
        os.makedirs(self.base, 0o700)
        log = open(os.path.join(self.base, "dockerd.log"), "wb")
        self.process = subprocess.Popen(
            ["dockerd", "--data-root", self.data_root, "--exec-root", self.exec_root,
             "--pidfile", os.path.join(self.base, "docker.pid"), "-H", f"unix://{self.socket}",
             "--iptables=false", "--ip-masq=false", "--bridge=none", "--storage-driver=vfs"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DockerFailed(f"dockerd exited: {self.log_tail()}")
            if subprocess.run(self.argv("version"), capture_output=True).returncode == 0:
                return self
            time.sleep(0.3)
        raise DockerFailed(f"dockerd did not answer within {START_TIMEOUT_S:.0f}s: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.base, "dockerd.log"), "rb") as f:
                return f.read()[-600:].decode("utf-8", "replace")
        except OSError:
            return ""

    def argv(self, *args: str) -> list[str]:
        return ["docker", "-H", f"unix://{self.socket}", *args]

    def run(self, *args: str, timeout: float = 60.0, check: bool = True) -> "subprocess.CompletedProcess[str]":
        done = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise DockerFailed(f"docker {' '.join(args[:2])}: {done.stderr.strip()[-400:]}")
        return done

    def import_rootfs(self, rootfs: str, image: str = IMAGE) -> str:
        """`docker import` of a directory: no registry needed."""
        tar_path = os.path.join(self.base, "rootfs.tar")
        with tarfile.open(tar_path, "w") as tar:
            tar.add(rootfs, arcname=".")
        self.run("import", tar_path, image)
        return image

    def run_to_exit(self, name: str, options: Sequence[str], command: Sequence[str],
                    image: str = IMAGE) -> "subprocess.CompletedProcess[str]":
        """`docker run --rm` that ends when its process does (milliseconds)."""
        return self.run("run", "--rm", "--network", "none", "--name", name, *options, image,
                        *command, check=False)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        subprocess.run(["umount", "-R", "-l", self.base], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)
