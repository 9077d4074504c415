"""The cgroup mount table is read once and again only when the kernel says our
mount table changed (poll on /proc/self/mountinfo): a cgroup2 mounted or unmounted
meanwhile must show at once.  Real kernel."""

from __future__ import annotations

import os
import subprocess
import tempfile

import pytest

from tracer.enrichment.host_facts import cgroup_mounts
from tracer.facts import Facts
from tracer.host import HostPaths

pytestmark = pytest.mark.kernel


def test_a_cgroup_mount_made_after_the_first_read_is_seen():
    before = {m.mount_point for m in cgroup_mounts(HostPaths(), Facts())}
    where = tempfile.mkdtemp(prefix="gttest-cgmount-")
    try:
        subprocess.run(["mount", "-t", "cgroup2", "none", where], check=True)
        try:
            during = {m.mount_point for m in cgroup_mounts(HostPaths(), Facts())}
        finally:
            subprocess.run(["umount", where], check=True)
        after = {m.mount_point for m in cgroup_mounts(HostPaths(), Facts())}
    finally:
        os.rmdir(where)
    assert where not in before and where in during and where not in after
