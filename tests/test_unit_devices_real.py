"""A systemd unit's device sandboxing under the real systemd (issue 18): systemd
252 as PID 1 in a privileged podman container (tests/support/systemd_container.py),
`gputrace watch` inside it, and services started by that systemd:

* PrivateDevices=yes: the node is in the container's /dev, the service gets
  ENOENT: `node_not_in_private_dev`, named by its unit, fixed with a drop-in
  (PrivateDevices=no and DeviceAllow=), never nvidia-modprobe;
* DevicePolicy=closed with a DeviceAllow= that does not cover the node: EPERM
  from the device cgroup systemd built, `device_cgroup` naming the unit, the
  property and the DeviceAllow= line.

The unit's properties come from systemd over D-Bus (dbus started in the
container), else from the transient unit's file under /run/systemd/transient.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any, Iterator

import pytest

from tests.support.daemon_proc import REPO
from tests.support.systemd_container import SystemdContainer

pytestmark = [pytest.mark.kernel, pytest.mark.podman]
WATCH_OUT = "/tmp/gttest-h18-watch.jsonl"


@pytest.fixture(scope="module")
def systemd() -> Iterator[SystemdContainer]:
    container = SystemdContainer(REPO).start()
    try:
        container.sh("systemctl start dbus.socket dbus.service", check=False)
        container.sh(f"nohup {REPO}/.venv/bin/gputrace watch --json --standalone --no-nodes "
                     f"--errno ENOENT,EPERM --duration 600 > {WATCH_OUT} 2>{WATCH_OUT}.err &")
        deadline = time.monotonic() + 180
        while "watching" not in container.sh(f"cat {WATCH_OUT}.err", check=False).stdout:
            assert time.monotonic() < deadline, container.sh(f"cat {WATCH_OUT}.err").stdout
            time.sleep(1)
        yield container
    finally:
        container.remove()


def _verdict_for(systemd: SystemdContainer, path: str, err: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in systemd.sh(f"cat {WATCH_OUT}", check=False).stdout.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("node", {}).get("path") == path and event.get("errno") == err \
                    and event.get("verdict"):
                print(path, err, event["verdict"]["reason"], "|", event["verdict"]["summary"],
                      "|", [f["command"] for f in event["verdict"]["fixes"]][:2],
                      "| properties from:", event["facts"].get("systemd.unit_properties", {})
                      .get("origin"))
                return event
        time.sleep(0.5)
    raise AssertionError(f"no {err} event for {path}: "
                         + systemd.sh(f"tail -c 3000 {WATCH_OUT}.err", check=False).stdout)


def _node(systemd: SystemdContainer) -> tuple[str, int]:
    minor = random.randint(600, 999)
    path = f"/dev/nvidia{minor}"
    systemd.sh(f"rm -f {path} && mknod -m 0666 {path} c 195 {minor}")
    return path, minor


def _service(systemd: SystemdContainer, unit: str, path: str, *props: str) -> None:
    code = (f"import os,time\ntry: os.open('{path}', os.O_RDWR)\nexcept OSError as e: "
            f"print(e)\ntime.sleep(3)")
    args = " ".join(f"-p {p}" for p in props)
    systemd.sh(f"systemd-run --unit {unit} {args} /usr/bin/python3 -c \"{code}\"")


def test_private_devices_unit_gets_enoent_for_a_node_the_host_has(systemd) -> None:
    path, _ = _node(systemd)
    unit = f"gttest-h18-pd-{random.randint(0, 1 << 30):x}"
    _service(systemd, unit, path, "PrivateDevices=yes")
    event = _verdict_for(systemd, path, "ENOENT")
    verdict, facts = event["verdict"], event["facts"]
    assert facts["systemd.unit"]["value"] == f"{unit}.service"
    assert facts["systemd.unit_properties"]["value"]["PrivateDevices"] is True
    assert verdict["reason"] == "node_not_in_private_dev", verdict
    assert f"{unit}.service" in verdict["summary"] and "PrivateDevices=yes" in verdict["summary"]
    commands = [f["command"] for f in verdict["fixes"]]
    assert commands[0].startswith("[Service]\nPrivateDevices=no\nDeviceAllow=")
    assert not any("nvidia-modprobe" in c for c in commands)


def test_device_allow_that_misses_the_node_is_named(systemd) -> None:
    path, minor = _node(systemd)
    unit = f"gttest-h18-da-{random.randint(0, 1 << 30):x}"
    _service(systemd, unit, path, "DevicePolicy=closed", "DeviceAllow='/dev/null rw'")
    event = _verdict_for(systemd, path, "EPERM")
    verdict = event["verdict"]
    assert verdict["reason"] == "device_cgroup", verdict
    assert f"{unit}.service" in verdict["summary"] and "DeviceAllow=" in verdict["summary"]
    assert verdict["fixes"][0]["command"] == f"[Service]\nDeviceAllow={path} rw"
    assert f"systemctl restart {unit}.service" in verdict["fixes"][1]["command"]
