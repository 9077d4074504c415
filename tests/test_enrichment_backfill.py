"""Credentials the audit sensor cannot capture are read from /proc while the process lives."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tracer.enrichment.backfill import backfill_process, userns_level_and_owner
from tracer.event import Event, Node, Process
from tracer.host import HostPaths
from tracer.sensors.audit_events import AUDIT_MISSING

pytestmark = pytest.mark.kernel


def test_initial_namespace_is_level_zero():
    assert userns_level_and_owner("/proc/self/ns/user") == (0, 0)


def test_backfill_reads_a_nested_user_namespace():
    child = subprocess.Popen(["setpriv", "--reuid=1800", "--regid=1800", "--groups=44,27",
                              "unshare", "--user", "--map-root-user", "sleep", "10"])
    try:
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{child.pid}/ns/user") == os.readlink("/proc/self/ns/user"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        event = Event(time=0, sensor="audit", syscall="openat", errno=13,
                      process=Process(pid=child.pid, tid=child.pid, uid=1800), node=Node(),
                      missing=list(AUDIT_MISSING))
        filled = backfill_process(HostPaths(), event)
        p = event.process
        assert "process.userns" in filled and "process.userns" not in event.missing
        assert p.userns.level == 1 and p.userns.owner_uid == 1800
        assert p.userns.inum == os.stat(f"/proc/{child.pid}/ns/user").st_ino
        assert p.mntns == os.stat(f"/proc/{child.pid}/ns/mnt").st_ino
        assert sorted(p.groups) == [27, 44]  # host ids, as the initial namespace reads them
    finally:
        child.kill()
        child.wait()
    # once the process is gone nothing can be filled, and nothing is invented
    gone = Event(time=0, sensor="audit", syscall="openat", errno=13,
                 process=Process(pid=child.pid, tid=child.pid), node=Node(),
                 missing=list(AUDIT_MISSING))
    assert backfill_process(HostPaths(), gone) == [] and gone.missing == AUDIT_MISSING
