"""A v1 devices cgroup removed between a denial and its explanation (real kernel).

systemd removes a transient unit's cgroup (`systemd-run -p DevicePolicy=closed`), and
a runtime a `--rm` container's, as soon as the last process exits: an EPERM of a
process that exits at once is often explained after its devices cgroup is gone, when
nothing can be read by the id the probe captured.  The pipeline's on-arrival stage
reads that cgroup's devices.list as the EPERM arrives, by the same id; enrichment uses
that reading only when the cgroup cannot be read any more, and says so.
"""

from __future__ import annotations

import errno
import os
import secrets
import subprocess
import time
from typing import Iterator

import pytest

from tests.support.nodes import NodeSpec, make_node
from tests.test_absent_node_real import OPEN, ArrivalHarness, free_gpu_path

pytestmark = [pytest.mark.kernel]
V1_DEVICES = "/sys/fs/cgroup/devices"


@pytest.fixture(scope="module")
def harness() -> Iterator[ArrivalHarness]:
    h = ArrivalHarness(errnos=(errno.EPERM,)).start()
    yield h
    h.close()


def test_a_devices_cgroup_removed_before_enrichment_is_judged_by_its_list_at_arrival(
        harness: ArrivalHarness) -> None:
    if not os.path.isfile(os.path.join(V1_DEVICES, "devices.list")):
        pytest.fail("the v1 devices controller is not mounted at /sys/fs/cgroup/devices")
    path = free_gpu_path()
    make_node(path, NodeSpec(major=195, minor=int(path[len("/dev/nvidia"):]), mode=0o666))
    cg = os.path.join(V1_DEVICES, f"gttest-arrival-{secrets.token_hex(3)}")
    os.mkdir(cg)
    try:
        for name, rule in (("devices.deny", "a"), ("devices.allow", "c 1:3 rwm"),
                           ("devices.allow", "c 136:* rwm")):
            with open(os.path.join(cg, name), "w", encoding="ascii") as f:
                f.write(rule)
        # the process joins the cgroup, is refused (EPERM: the list allows no 195) and exits
        proc = subprocess.Popen(["sh", "-c", f"echo $$ > {cg}/cgroup.procs && exec python3 -c "
                                 "\"$0\"", OPEN.format(path=path, linger=0)])
        event = harness.wait_for(lambda e: e.node.path == path.encode()
                                 and e.errno == errno.EPERM)
        assert proc.wait(30) == 0
        deadline = time.monotonic() + 10
        while True:  # removed as systemd removes a stopped unit's cgroup
            try:
                os.rmdir(cg)
                break
            except OSError:
                assert time.monotonic() < deadline, "the cgroup stayed busy"
                time.sleep(0.05)
        harness.stage(event)
    finally:
        os.unlink(path)
        if os.path.isdir(cg):
            os.rmdir(cg)
    verdict, facts = event.verdict, event.facts
    assert verdict is not None
    assert facts.get("process.live") is False
    origin = facts.fact("device_cgroup.v1_rules").origin if "device_cgroup.v1_rules" in facts \
        else None
    assert verdict["reason"] == "device_cgroup" and verdict["confidence"] == "high", (
        verdict, origin, facts.get("device_cgroup.v1_unreadable"))
    assert facts.get("device_cgroup.v1_rules") == ["c 1:3 rwm", "c 136:* rwm"]
    assert origin is not None and "read as the event arrived; removed before enrichment" in origin
    assert os.path.basename(cg) in origin
