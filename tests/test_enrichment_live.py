"""Enrichment and verdicts against the real kernel: our own process, a child in
a new user namespace, a real device node with an ACL, a nodev mount, a v1
device cgroup and a rootful podman+runc container.  Needs root."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Iterator

import pytest

from tests.test_enrichment_fixtures import denial
from tracer.enrichment.enricher import Enricher
from tracer.in_root import resolve_in_root
from tracer.host import LIVE
from tracer.verdict import reasons as R
from tracer.verdict.explain import explain

pytestmark = pytest.mark.kernel


def _ns(pid: int, name: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{name}").st_ino


def _live_denial(pid: int, path: str, err: int = errno.EACCES, **kw: object):  # type: ignore[no-untyped-def]
    return denial(pid, path, err, userns=_ns(pid, "user"), mntns=_ns(pid, "mnt"), **kw)  # type: ignore[arg-type]


@pytest.fixture
def gttest_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="gttest-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_own_process_live_facts() -> None:
    pid = os.getpid()
    facts = Enricher(LIVE).enrich(_live_denial(pid, "/dev/null"))
    status = open(f"/proc/{pid}/status").read()
    cap_line = next(ln for ln in status.splitlines() if ln.startswith("CapEff:"))
    assert facts.get("process.live") is True
    assert facts.get("process.cap_effective_live") == cap_line.split()[1]
    assert facts.get("node.major") == 1 and facts.get("node.minor") == 3
    assert facts.get("node.mode") == "0666" and facts.get("node.type") == "char"
    assert facts.get("cgroup.paths")  # this machine mounts cgroup hierarchies
    assert facts.get("host.user_name") == "root"


def test_child_in_new_user_namespace() -> None:
    child = subprocess.Popen(["unshare", "--user", "--map-root-user", "sleep", "5"])
    try:
        for _ in range(100):  # wait until unshare has exec'd sleep inside the new userns
            if _ns(child.pid, "user") != _ns(os.getpid(), "user") and \
                    open(f"/proc/{child.pid}/comm").read().strip() == "sleep":
                break
            time.sleep(0.02)
        event = _live_denial(child.pid, "/dev/null", level=1, owner=0, uid=0, gid=0)
        enricher = Enricher(LIVE)
        facts = enricher.enrich(event)
        assert facts.get("userns.uid_map") == [[0, 0, 1]]
        assert facts.get("userns.gid_map") == [[0, 0, 1]]
        assert facts.get("userns.setgroups") == "deny"
        assert facts.get("process.groups_in_ns") is not None
    finally:
        child.kill()
        child.wait()
    gone = enricher.enrich(event)  # the process has exited: the userns cache answers
    assert gone.get("process.live") is False
    assert gone.get("userns.uid_map") == [[0, 0, 1]]
    assert gone.fact("userns.uid_map").source == "cached"


def test_real_node_acl_and_class(gttest_dir: str) -> None:
    node = os.path.join(gttest_dir, "nvidia0")
    os.mknod(node, 0o660 | 0o020000, os.makedev(195, 0))
    os.chown(node, 0, 44)
    subprocess.run(["setfacl", "-m", "u:4242:rw", node], check=True)
    facts = Enricher(LIVE).enrich(_live_denial(os.getpid(), node, uid=4242, gid=4242,
                                               groups=(4242,)))
    assert facts.get("node.major") == 195 and facts.get("node.class") == "nvidia-gpu"
    assert {"tag": "user", "perm": "rw-", "id": 4242} in facts.get("node.acl")
    assert facts.get("node.gid") == 44
    # the model lets ACL user 4242 in, so an EACCES here points past DAC
    verdict = explain(_live_denial(os.getpid(), node, uid=4242, gid=4242, groups=(4242,)),
                      Enricher(LIVE))
    assert verdict.check == "dac_acl_user" and verdict.reason == R.LSM_DENIED


def test_resolution_stays_inside_the_root(gttest_dir: str) -> None:
    root = os.path.join(gttest_dir, "root")
    os.makedirs(os.path.join(root, "dev"))
    os.makedirs(os.path.join(root, "etc"))
    open(os.path.join(root, "etc/group"), "w").write("video:x:27:\n")
    os.symlink("/etc/group", os.path.join(root, "dev/abs"))
    os.symlink("../../../../../../etc/group", os.path.join(root, "dev/rel"))
    os.symlink("/dev/loop1", os.path.join(root, "dev/loop1"))
    os.symlink("loopy", os.path.join(root, "dev/loopy"))
    inside = os.path.join(root, "etc/group")
    assert resolve_in_root(root, "/dev/abs") == inside
    assert resolve_in_root(root, "/dev/rel") == inside
    assert resolve_in_root(root, "/dev/loop1") is None  # loops end, never the host /dev
    assert resolve_in_root(root, "/dev/loopy") is None
    assert resolve_in_root(root, "/etc/passwd") is None


@pytest.fixture
def nodev_mount(gttest_dir: str) -> Iterator[str]:
    mnt = os.path.join(gttest_dir, "nodev")
    os.mkdir(mnt)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "nodev,size=64k", "gttest", mnt], check=True)
    yield mnt
    subprocess.run(["umount", mnt], check=True)


def test_nodev_mount_real_denial(nodev_mount: str) -> None:
    node = os.path.join(nodev_mount, "null")
    os.mknod(node, 0o666 | 0o020000, os.makedev(1, 3))
    with pytest.raises(PermissionError) as denied:
        open(node, "rb")  # the kernel refuses even root on a nodev mount
    assert denied.value.errno == errno.EACCES
    verdict = explain(_live_denial(os.getpid(), node, flags=os.O_RDONLY), Enricher(LIVE))
    assert verdict.reason == R.NODEV_MOUNT and verdict.confidence == "high"
    assert any(f.command == f"mount -o remount,dev {nodev_mount}" for f in verdict.fixes)


DEVICES_V1 = "/sys/fs/cgroup/devices"
CHILD = """
import os, sys, time
with open(sys.argv[1] + "/cgroup.procs", "w") as f:
    f.write(str(os.getpid()))
try:
    open("/dev/null", "rb")
    print("opened", flush=True)
except OSError as err:
    print(err.errno, flush=True)
time.sleep(30)
"""


@pytest.mark.skipif(not os.path.isdir(DEVICES_V1), reason="host has no cgroup v1 devices hierarchy")
def test_device_cgroup_v1_real_eperm() -> None:
    cg = os.path.join(DEVICES_V1, f"gttest-{uuid.uuid4().hex[:8]}")
    os.mkdir(cg)
    child = None
    try:
        open(os.path.join(cg, "devices.deny"), "w").write("a")
        open(os.path.join(cg, "devices.allow"), "w").write("c 1:5 rwm")
        child = subprocess.Popen([sys.executable, "-c", CHILD, cg], stdout=subprocess.PIPE,
                                 text=True)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == str(errno.EPERM)
        verdict = explain(_live_denial(child.pid, "/dev/null", errno.EPERM, flags=os.O_RDONLY),
                          Enricher(LIVE))
        assert verdict.reason == R.DEVICE_CGROUP and verdict.confidence == "high"
        evidence = {e.fact: e.value for e in verdict.evidence}
        assert evidence["device_cgroup.v1_rules"] == ["c 1:5 rwm"]
    finally:
        if child is not None:
            child.kill()
            child.wait()
        os.rmdir(cg)


@pytest.fixture
def busybox_rootfs(gttest_dir: str) -> str:
    root = os.path.join(gttest_dir, "rootfs")
    os.makedirs(os.path.join(root, "bin"))
    os.makedirs(os.path.join(root, "etc"))
    shutil.copy("/bin/busybox", os.path.join(root, "bin/busybox"))
    os.symlink("busybox", os.path.join(root, "bin/sleep"))
    open(os.path.join(root, "etc/group"), "w").write("root:x:0:\nrender:x:995:\n")
    return root


@pytest.mark.podman
def test_rootful_podman_runc_container_detection(busybox_rootfs: str) -> None:
    name = f"gttest-{uuid.uuid4().hex[:8]}"
    run = subprocess.run(
        ["podman", "run", "-d", "--name", name, "--runtime", "runc", "--network=none",
         "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
         "--rootfs", busybox_rootfs, "/bin/sleep", "60"],
        capture_output=True, text=True, timeout=120)
    try:
        assert run.returncode == 0, run.stderr
        cid = run.stdout.strip().splitlines()[-1]
        pid = int(subprocess.run(["podman", "inspect", "-f", "{{.State.Pid}}", name],
                                 capture_output=True, text=True, check=True).stdout)
        facts = Enricher(LIVE).enrich(_live_denial(pid, "/dev/null"))
        assert facts.get("container.engine") == "podman"
        assert facts.get("container.runtime") == "runc"
        assert facts.get("container.id") == cid
        assert facts.get("container.name") == name
        assert facts.get("container.rootless") is False
        # trimmed to the relevant entries: our gid 0 and the render/video names
        assert facts.get("container.etc_group") == {"root": 0, "render": 995}
        assert facts.get("device_cgroup.version") == 1
        assert "c 1:3 rwm" in facts.get("device_cgroup.v1_rules")
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True, timeout=120)
