"""The BPF sensor names the refused task's own cgroup at the denial: the cgroup
directory carries the container id (docker-<id>.scope, /docker/<id>, libpod-<id>,
cri-containerd-<id>.scope) even when the container is gone and no runtime state
was ever read.  Real kernel: the probe is moved into a cgroup laid out as an
engine lays it out, drops to nobody and is refused a 0600 root node."""

from __future__ import annotations

import os
import secrets
import subprocess
from typing import Iterator

import pytest

from tests.support.probe import probe_binary
from tests.support.scenario_workspace import Scenario

pytestmark = pytest.mark.kernel
V2 = "/sys/fs/cgroup/unified"
V1_DEVICES = "/sys/fs/cgroup/devices"
NOBODY = 65534


def _refused_in(cgroup_procs: list[str], node: str, token: str) -> int:
    """gtprobe run as nobody after joining the cgroups whose cgroup.procs are given;
    returns its pid."""
    def enter() -> None:
        for procs in cgroup_procs:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    done = subprocess.run([probe_binary(), node, "0", token], preexec_fn=enter,
                          capture_output=True, text=True, timeout=30)
    assert "errno=13" in done.stdout, done.stdout + done.stderr
    return int(done.stdout.split("pid=")[1].split()[0])


@pytest.fixture
def cgroup_dirs() -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for path in reversed(made):
        try:
            os.rmdir(path)
        except OSError:
            pass


def _mkdirs(made: list[str], *paths: str) -> None:
    for path in paths:
        os.mkdir(path)
        made.append(path)


def test_v2_cgroup_leaf_and_parent_name_the_container(bpf_sensor, cgroup_dirs):
    cid = secrets.token_hex(32)
    with Scenario("cgname") as scenario:
        node = scenario.nvidia_node(0o600, 0)
        parent = os.path.join(V2, f"gttest-cgname-{scenario.token}")
        leaf = os.path.join(parent, f"docker-{cid}.scope")
        _mkdirs(cgroup_dirs, parent, leaf)
        pid = _refused_in([os.path.join(leaf, "cgroup.procs")], node.path, scenario.token)
        event = bpf_sensor.wait_for(lambda e: e.process.pid == pid and e.kind == "denial")[0]
    assert event.process.cgroup_leaf == f"docker-{cid}.scope".encode()
    assert event.process.cgroup_parent == os.path.basename(parent).encode()
    assert event.process.cgroup_hierarchy == "v2"
    as_json = event.to_json()["process"]
    assert as_json["cgroup_leaf"] == f"docker-{cid}.scope" and as_json["cgroup_hierarchy"] == "v2"


def test_v1_devices_cgroup_when_the_task_sits_at_the_v2_root(bpf_sensor, cgroup_dirs):
    """cgroupfs docker on a v1 host: /docker/<id> in the devices hierarchy only."""
    if not os.path.isdir(V1_DEVICES):
        pytest.fail("the v1 devices controller is not mounted at /sys/fs/cgroup/devices")
    cid = secrets.token_hex(32)
    with Scenario("cgname1") as scenario:
        node = scenario.nvidia_node(0o600, 0)
        parent = os.path.join(V1_DEVICES, f"gttest-cgname-{scenario.token}")
        leaf = os.path.join(parent, cid)
        _mkdirs(cgroup_dirs, parent, leaf)
        pid = _refused_in([os.path.join(V2, "cgroup.procs"), os.path.join(leaf, "cgroup.procs")],
                          node.path, scenario.token)
        event = bpf_sensor.wait_for(lambda e: e.process.pid == pid and e.kind == "denial")[0]
    assert (event.process.cgroup_leaf, event.process.cgroup_parent) == \
        (cid.encode(), os.path.basename(parent).encode())
    assert event.process.cgroup_hierarchy == "v1 devices"
