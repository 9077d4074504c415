"""ENOENT on a GPU node, on the real kernel (issue 18): the BPF sensor watching
ENOENT, the pipeline's on-arrival capture, then the verdict after the process
has exited.

* a node the host has, opened from a private /dev (a tmpfs on /dev in the
  process's own mount namespace): `node_not_in_private_dev`, nvidia-modprobe
  never offered;
* a node never created, from a plain process and from one with no_new_privs
  (captured by the kernel with the event): `node_missing`, and with
  no_new_privs the story says the setuid helper could not have helped, and the
  first fix creates the nodes at boot.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import threading
import time
from typing import Callable, Iterator

import pytest

from tests.support.nodes import NodeSpec, make_node
from tracer.event import Event
from tracer.host import HostPaths
from tracer.sensors.bpf_sensor import BpfConfig, BpfSensor
from tracer.verdict.stage import explain_stages

pytestmark = [pytest.mark.kernel]


class ArrivalHarness:
    """The sensor drained on its own thread, with the pipeline's on-arrival stage run
    as each denial arrives; the explaining stage is run by the test later."""

    def __init__(self, errnos: tuple[int, ...] = (errno.ENOENT,)) -> None:
        self.on_arrival, self.stage = explain_stages(HostPaths(), track_containers=False)
        self.sensor = BpfSensor(BpfConfig(errnos=errnos, aggregate_interval_s=0.5,
                                          sweep_interval_s=0.5), say=lambda msg: None)
        self.events: list[Event] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for event in self.sensor.events(self.stop):
            if event.kind == "denial":
                self.on_arrival(event)
                self.events.append(event)

    def start(self) -> "ArrivalHarness":
        self.sensor.start()
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.sensor.close()

    def wait_for(self, pred: Callable[[Event], bool], timeout: float = 15) -> Event:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in list(self.events) if pred(e)]
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError("no matching event")


@pytest.fixture(scope="module")
def harness() -> Iterator[ArrivalHarness]:
    h = ArrivalHarness().start()
    yield h
    h.close()


def free_gpu_path() -> str:
    """/dev/nvidiaN for an N no one uses (its class is nvidia-gpu, nvidia-modprobe -c=N)."""
    for _ in range(100):
        path = f"/dev/nvidia{random.randint(600, 999)}"
        if not os.path.lexists(path):
            return path
    raise AssertionError("no free /dev/nvidiaN")


def explained(harness: ArrivalHarness, path: str, proc: subprocess.Popen) -> Event:
    event = harness.wait_for(lambda e: e.node.path == path.encode() and e.errno == errno.ENOENT)
    proc.wait(30)  # the process is gone before it is explained, as in the field
    time.sleep(0.2)
    harness.stage(event)
    assert event.verdict is not None
    print(path, event.verdict["reason"], "|", event.verdict["summary"], "|",
          [f["command"] for f in event.verdict["fixes"]][:3])
    return event


OPEN = "import os,time\ntry: os.open({path!r}, os.O_RDWR)\nexcept OSError: pass\ntime.sleep({linger})"


def test_private_dev_without_the_host_node_is_not_node_missing(harness: ArrivalHarness) -> None:
    path = free_gpu_path()
    make_node(path, NodeSpec(major=195, minor=int(path[len("/dev/nvidia"):]), mode=0o666))
    try:
        # a private /dev, as bubblewrap, firejail --private-dev or PrivateDevices= make it;
        # the process lives a moment after the failure (a service retrying), then exits
        proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                 "mount -t tmpfs -o mode=0755 none /dev && exec python3 -c "
                                 f"\"$0\"", OPEN.format(path=path, linger=0.5)])
        event = explained(harness, path, proc)
    finally:
        os.unlink(path)
    verdict, facts = event.verdict, event.facts
    assert verdict["reason"] == "node_not_in_private_dev", verdict
    assert facts.get("node.on_host") is True
    assert facts.get("process.dev_private") is True  # from the table read at arrival
    assert "(read as the event arrived)" in facts.fact("process.dev_private").origin
    assert "private /dev" in verdict["summary"]
    assert not any("nvidia-modprobe" in f["command"] for f in verdict["fixes"])


@pytest.mark.parametrize("no_new_privs", [False, True])
def test_node_never_created(harness: ArrivalHarness, no_new_privs: bool) -> None:
    path = free_gpu_path()
    prefix = ["setpriv", "--no-new-privs"] if no_new_privs else []
    proc = subprocess.Popen(prefix + ["python3", "-c", OPEN.format(path=path, linger=0)])
    event = explained(harness, path, proc)
    verdict, facts = event.verdict, event.facts
    assert event.process.no_new_privs is no_new_privs  # captured in the kernel
    assert verdict["reason"] == "node_missing", verdict
    assert facts.get("node.on_host") is False
    blockers = facts.get("nvidia_modprobe.blockers")
    commands = [f["command"] for f in verdict["fixes"]]
    minor = int(path[len("/dev/nvidia"):])
    assert f"nvidia-modprobe -c={minor}" in commands
    assert not any("--device" in c for c in commands)  # the host lacks it: nothing to pass
    if no_new_privs:
        assert blockers == ["no_new_privs"]
        assert "no_new_privs" in verdict["summary"]
        assert "ExecStart=/usr/bin/nvidia-modprobe" in commands[0]  # make them at boot first
    else:
        assert blockers == []
        assert "no_new_privs" not in verdict["summary"]
        assert not commands[0].startswith("[Unit]")
