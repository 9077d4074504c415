"""A private containerd for the tests: its own root, state, socket and config under
/tmp/gttest-containerd-TOKEN, so it collides with nothing (the CRI plugin off: no
kubelet here, and `ctr` writes what it would).  Images come from a docker-archive
tarball of a busybox root filesystem built here (`ctr images import`): no
registry is reachable.

Kubernetes for real, without a kubelet: `run_pod_container` runs a container in
namespace k8s.io with the OCI annotations and labels the CRI plugin writes and
in a kubepods cgroup path (cgroupfs driver layout), through the real shim and
runc."""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import tarfile
import time
import uuid
from dataclasses import dataclass
from typing import Sequence

START_TIMEOUT_S = 30.0
IMAGE = "docker.io/gttest/busybox:latest"
NAMESPACE = "k8s.io"
CGROUP_ROOTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")


class ContainerdFailed(RuntimeError):
    """containerd or a ctr command failed; the message carries their words."""


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    uid: str

    @property
    def cgroup_parent(self) -> str:
        return f"/kubepods/besteffort/pod{self.uid}"


def new_pod(token: str, namespace: str = "gttest-ml") -> Pod:
    return Pod(f"gttest-job-{token}", namespace, str(uuid.uuid4()))


def cri_annotations(pod: Pod, container: str, sandbox_id: str) -> dict[str, str]:
    """The OCI annotations containerd's CRI plugin (1.6) gives a pod's container."""
    return {"io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.container-name": container,
            "io.kubernetes.cri.image-name": IMAGE,
            "io.kubernetes.cri.sandbox-id": sandbox_id,
            "io.kubernetes.cri.sandbox-name": pod.name,
            "io.kubernetes.cri.sandbox-namespace": pod.namespace,
            "io.kubernetes.cri.sandbox-uid": pod.uid}


def cri_labels(pod: Pod, container: str) -> dict[str, str]:
    """The containerd labels kubelet's CRI requests carry."""
    return {"io.kubernetes.pod.name": pod.name, "io.kubernetes.pod.namespace": pod.namespace,
            "io.kubernetes.pod.uid": pod.uid, "io.kubernetes.container.name": container}


def docker_archive(rootfs: str, path: str, tag: str = IMAGE) -> str:
    """A `docker save` tarball of one layer holding `rootfs`."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        tar.add(rootfs, arcname=".")
    layer_bytes = layer.getvalue()
    diff_id = hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                         "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [tag.split("/", 1)[1]],
                            "Layers": [f"{diff_id}/layer.tar"]}]).encode()
    with tarfile.open(path, "w") as out:
        for name, data in ((f"{diff_id}/layer.tar", layer_bytes), (config_name, config),
                           ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return path


class PrivateContainerd:
    def __init__(self) -> None:
        self.base = f"/tmp/gttest-containerd-{secrets.token_hex(3)}"
        self.socket = os.path.join(self.base, "containerd.sock")
        self.process: "subprocess.Popen[bytes] | None" = None
        self.pods: list[Pod] = []

    def start(self) -> "PrivateContainerd":
        if shutil.which("containerd") is None or shutil.which("ctr") is None:
            raise ContainerdFailed("containerd is not installed (it comes with docker.io)")
        os.makedirs(self.base, 0o700)
        config = os.path.join(self.base, "config.toml")
        with open(config, "w", encoding="utf-8") as f:
            f.write(f'version = 2\nroot = "{self.base}/root"\nstate = "{self.base}/state"\n'
                    'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                    f'[grpc]\n  address = "{self.socket}"\n'
                    f'[ttrpc]\n  address = "{self.socket}.ttrpc"\n[debug]\n  address = ""\n')
        log = open(os.path.join(self.base, "containerd.log"), "wb")
        self.process = subprocess.Popen(["containerd", "--config", config], stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ContainerdFailed(f"containerd exited: {self.log_tail()}")
            if subprocess.run(self.argv("version"), capture_output=True).returncode == 0:
                return self
            time.sleep(0.2)
        raise ContainerdFailed(f"containerd did not answer within {START_TIMEOUT_S:.0f}s")

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.base, "containerd.log"), "rb") as f:
                return f.read()[-600:].decode("utf-8", "replace")
        except OSError:
            return ""

    def argv(self, *args: str) -> list[str]:
        return ["ctr", "-a", self.socket, "-n", NAMESPACE, *args]

    def ctr(self, *args: str, timeout: float = 60.0,
            check: bool = True) -> "subprocess.CompletedProcess[str]":
        done = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise ContainerdFailed(f"ctr {' '.join(args[:2])}: {done.stderr.strip()[-400:]}")
        return done

    def import_rootfs(self, rootfs: str) -> str:
        self.ctr("images", "import", "--snapshotter", "native",
                 docker_archive(rootfs, os.path.join(self.base, "image.tar")))
        return IMAGE

    def run_pod_container(self, pod: Pod, container: str, mounts: Sequence[str],
                          command: Sequence[str]) -> tuple[str, "subprocess.CompletedProcess[str]"]:
        """`ctr run --rm` as the CRI plugin would create a pod's container (cgroupfs
        driver): returns (container id, what ran)."""
        cid = secrets.token_hex(32)
        self.pods.append(pod)
        options: list[str] = ["--rm", "--snapshotter", "native",
                              "--cgroup", f"{pod.cgroup_parent}/{cid}"]
        for key, value in cri_annotations(pod, container, secrets.token_hex(32)).items():
            options += ["--annotation", f"{key}={value}"]
        for key, value in cri_labels(pod, container).items():
            options += ["--label", f"{key}={value}"]
        for mount in mounts:
            options += ["--mount", mount]
        done = self.ctr("run", *options, IMAGE, cid, *command, check=False)
        return cid, done

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        for pod in self.pods:  # what the kubelet would remove: the pod's cgroup
            for root in CGROUP_ROOTS:
                for hierarchy in [root] + [os.path.join(root, h) for h in os.listdir(root)]:
                    _rmdir(hierarchy + pod.cgroup_parent)
                    _rmdir(hierarchy + "/kubepods/besteffort")  # only when nothing else is there
                    _rmdir(hierarchy + "/kubepods")
        subprocess.run(["umount", "-R", "-l", self.base], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass
