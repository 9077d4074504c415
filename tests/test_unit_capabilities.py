"""Which capability each bpf() call that reads cgroup v2 device programs needs, measured
on this kernel under `setpriv --bounding-set` (issue 19): the premise of the unit's
design (systemd/gputrace.service says why it adds none of them) and of the one-line
reasons gputrace gives when a call is refused (tracer/enrichment/bpf_syscall.py
CAPABILITY_NEEDED).  Each call runs in a child holding exactly the unit's bounding
set (parsed from the unit file), then that set plus one capability."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.unit_caps import REPO, bounding_set, setpriv_prefix
from tests.support.v2_device_cgroup import UNIFIED, deny_major, v2_device_cgroup
from tracer.enrichment import bpf_syscall as bpf

pytestmark = [pytest.mark.kernel]

CHILD = """
import json, os, sys
from tracer.enrichment import bpf_syscall as bpf
cgroup, prog_id, prog_fd, cgroup_id = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
out = {}
def attempt(name, call):
    try:
        out[name] = "ok" if call() is None else call()
    except OSError as exc:
        out[name] = "EPERM" if exc.errno == 1 else f"errno {exc.errno}"
fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
attempt("BPF_PROG_QUERY", lambda: None if bpf.prog_query(fd, bpf.BPF_CGROUP_DEVICE) else "empty")
attempt("BPF_PROG_GET_FD_BY_ID", lambda: os.close(bpf.prog_get_fd_by_id(prog_id)))
attempt("BPF_PROG_GET_NEXT_ID", lambda: None if bpf.prog_ids(2) else "empty")
attempt("BPF_OBJ_GET_INFO_BY_FD", lambda: None if bpf.prog_info(prog_fd).xlated else "no instructions")
attempt("open_by_handle_at", lambda: os.close(bpf.open_cgroup_by_id(sys.argv[5], cgroup_id)))
print(json.dumps(out))
"""
# the capability that, added to the unit's set, makes each call work (as measured)
ADDED = {"BPF_PROG_QUERY": "CAP_NET_ADMIN", "BPF_PROG_GET_FD_BY_ID": "CAP_SYS_ADMIN",
         "BPF_PROG_GET_NEXT_ID": "CAP_SYS_ADMIN"}


def calls(caps: list[str], cgroup: str, prog_id: int, prog_fd: int) -> dict[str, str]:
    python = os.path.join(REPO, ".venv", "bin", "python")
    done = subprocess.run(setpriv_prefix(caps) + [
        python if os.path.exists(python) else sys.executable, "-c", CHILD, cgroup, str(prog_id),
        str(prog_fd), str(os.stat(cgroup).st_ino), UNIFIED], cwd=REPO, capture_output=True,
        text=True, pass_fds=(prog_fd,), timeout=60)
    assert done.returncode == 0, done.stderr[-1000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_each_bpf_call_needs_the_capability_the_unit_does_not_grant() -> None:
    unit = bounding_set()
    with v2_device_cgroup(deny_major(195, "runc")) as cgroup:
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            [prog_id] = bpf.prog_query(fd, bpf.BPF_CGROUP_DEVICE, effective=False)
        finally:
            os.close(fd)
        prog_fd = bpf.prog_get_fd_by_id(prog_id)
        try:
            rows = {"unit": calls(unit, cgroup, prog_id, prog_fd)}
            for cap in ("CAP_NET_ADMIN", "CAP_SYS_ADMIN"):
                rows[f"unit + {cap}"] = calls(unit + [cap], cgroup, prog_id, prog_fd)
            rows["unit - CAP_BPF"] = calls([c for c in unit if c != "CAP_BPF"], cgroup,
                                           prog_id, prog_fd)
            rows["unit - CAP_DAC_READ_SEARCH"] = calls(
                [c for c in unit if c != "CAP_DAC_READ_SEARCH"], cgroup, prog_id, prog_fd)
        finally:
            os.close(prog_fd)
    print("capabilities the bpf() calls need (unit = " + " ".join(unit) + "):")
    for label, row in rows.items():
        print(f"  {label:28} " + ", ".join(f"{k}={v}" for k, v in row.items()))
    assert {k: rows["unit"][k] for k in ADDED} == {k: "EPERM" for k in ADDED}
    for call, cap in ADDED.items():
        assert rows[f"unit + {cap}"][call] == "ok", (call, rows)
        assert cap in bpf.CAPABILITY_NEEDED[call]  # the reason gputrace gives says so
    assert rows["unit + CAP_NET_ADMIN"]["BPF_PROG_GET_FD_BY_ID"] == "EPERM"  # not enough
    # with a program fd in hand, the unit could read the instructions (CAP_BPF), and it
    # opens a cgroup by id (CAP_DAC_READ_SEARCH); without those, it could not
    assert rows["unit"]["BPF_OBJ_GET_INFO_BY_FD"] == "ok"
    assert rows["unit - CAP_BPF"]["BPF_OBJ_GET_INFO_BY_FD"] == "no instructions"
    assert rows["unit"]["open_by_handle_at"] == "ok"
    assert rows["unit - CAP_DAC_READ_SEARCH"]["open_by_handle_at"] == "EPERM"
