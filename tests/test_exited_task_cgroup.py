"""An exiting task (PF_EXITING set, then a zombie not yet reaped) shows `/` for every
v1 hierarchy in /proc/PID/cgroup, while its v2 line stays right (measured on this
kernel).  A
snapshot of a container whose init had already exited once read the root's
devices.list (`a *:* rwm`) as the container's rules, and its verdict became
`unknown` (flaky test_exited_containers runc case).  Real kernel: a v1 devices
cgroup with a rule, a child moved into it that exits unreaped."""

from __future__ import annotations

import os
import secrets
import time
from typing import Iterator

import pytest

from tracer.enrichment.container_state import RuntimeState
from tracer.enrichment.container_snapshot import snapshot_container
from tracer.enrichment.container_init import read_init
from tracer.enrichment.container_store import ContainerSnapshot
from tracer.enrichment.process import cgroup_facts, task_exited
from tracer.facts import Facts
from tracer.host import HostPaths

pytestmark = pytest.mark.kernel
V1_DEVICES = "/sys/fs/cgroup/devices"


def parked_child() -> tuple[int, int]:
    """(pid, release fd): a forked child that exits once a byte is written to the fd."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(write_end)
        os.read(read_end, 1)
        os._exit(0)
    os.close(read_end)
    return pid, write_end


@pytest.fixture
def zombie_in_devices_cgroup() -> Iterator[tuple[int, str, int]]:
    """(pid, cgroup dir, release fd): a child in a fresh v1 devices cgroup allowing only c 195:0 r;
    it exits when told (`os.write(release, ...)`), and is reaped after the test."""
    if not os.path.isfile(os.path.join(V1_DEVICES, "devices.list")):
        pytest.fail("the v1 devices controller is not mounted at /sys/fs/cgroup/devices")
    cg = os.path.join(V1_DEVICES, f"gttest-zombie-{secrets.token_hex(3)}")
    os.mkdir(cg)
    pid, write_end = parked_child()
    try:
        with open(os.path.join(cg, "cgroup.procs"), "w") as f:
            f.write(str(pid))
        with open(os.path.join(cg, "devices.deny"), "w") as f:
            f.write("a")
        with open(os.path.join(cg, "devices.allow"), "w") as f:
            f.write("c 195:0 r")
        yield pid, cg, write_end
    finally:
        os.close(write_end)
        os.waitpid(pid, 0)
        os.rmdir(cg)


def _exit_unreaped(pid: int, release: int) -> None:
    os.write(release, b"x")
    for _ in range(500):
        if task_exited(HostPaths(), pid):
            return
        time.sleep(0.002)
    raise AssertionError("the child did not exit")


def test_zombie_v1_lines_are_left_out_and_its_v2_line_kept(zombie_in_devices_cgroup):
    pid, cg, release = zombie_in_devices_cgroup
    alive = Facts()
    cgroup_facts(HostPaths(), pid, alive)
    paths = alive.get("cgroup.paths")
    assert paths["devices"] == "/" + os.path.basename(cg), paths
    _exit_unreaped(pid, release)
    with open(f"/proc/{pid}/cgroup", encoding="ascii") as f:  # the kernel's side of it
        assert any(line.endswith(":devices:/") for line in f.read().splitlines())
    gone = Facts()
    cgroup_facts(HostPaths(), pid, gone)
    paths = gone.get("cgroup.paths")
    assert not any("devices" in key.split(",") for key in paths), paths
    assert "unified" in paths and "exited" in gone.fact("cgroup.paths").origin


def test_snapshot_of_an_exited_init_reads_the_rules_where_the_runtime_put_them(
        zombie_in_devices_cgroup):
    """runc's state.json names the container's v1 cgroups; the snapshot reads the
    rules there, not in the root the zombie's /proc/PID/cgroup points at."""
    pid, cg, release = zombie_in_devices_cgroup
    _exit_unreaped(pid, release)
    state = RuntimeState("runc", "gttest-zombie", "/run/runc/gttest-zombie", pid=pid,
                         cgroup_paths={"devices": cg})
    snap = snapshot_container(HostPaths(), state)
    rules = snap.facts["device_cgroup.v1_rules"]
    assert rules.value == ["c 195:0 r"], (rules, snap.facts.get("cgroup.paths"))
    assert snap.facts["cgroup.paths"].value["devices"] == "/" + os.path.basename(cg)
    assert "runtime state" in snap.facts["cgroup.paths"].origin


def test_a_reaped_init_answers_nothing_through_the_snapshots_proc_descriptor():
    """The snapshot reads the init through one descriptor of /proc/PID: once that
    task is reaped, nothing more is read through it, even if its pid is reused, so
    no other process's facts can enter the container's snapshot."""
    from tracer.enrichment.container_init import ProcDir
    pid, write_end = parked_child()
    proc = ProcDir(HostPaths(), pid)
    try:
        assert proc.text("status", 4096) is not None and proc.link("ns/mnt") is not None
        os.write(write_end, b"x")
        os.waitpid(pid, 0)
        assert proc.text("status", 4096) is None and proc.text("cgroup") is None
        assert proc.link("ns/mnt") is None
    finally:
        proc.close()
        os.close(write_end)


def test_a_task_still_exiting_is_not_read_as_in_the_root(zombie_in_devices_cgroup):
    """The window before the zombie: PF_EXITING is set at the start of do_exit(), and
    from then on the kernel shows the task in every v1 root, while `State:` still says
    R until exit_notify().  A child freeing 1.5 GiB after SIGKILL stays in that window
    for a while; every reading taken in it (the enrichment's and the container
    snapshot's) must leave the v1 lines out, never name the root.  Before, `State:`
    decided, and the root's devices.list (a *:* rwm) became a container's rules."""
    pid, cg, release = zombie_in_devices_cgroup  # a parked child: the cgroup and its rules
    big = os.fork()
    if big == 0:  # pragma: no cover - child
        block = bytearray(1536 << 20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(60)
        os._exit(0)
    with open(os.path.join(cg, "cgroup.procs"), "w") as f:
        f.write(str(big))
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # its memory is touched when its RSS is
            with open(f"/proc/{big}/statm", encoding="ascii") as f:
                if int(f.read().split()[1]) * 4096 >= 1500 << 20:
                    break
            time.sleep(0.05)
        os.kill(big, 9)
        in_window = rooted = 0
        for _ in range(20000):
            try:
                with open(f"/proc/{big}/cgroup", encoding="ascii") as f:
                    raw = f.read()
                with open(f"/proc/{big}/status", encoding="ascii") as f:
                    state = f.read().partition("\nState:")[2].split()[0]
            except OSError:
                break
            if state == "Z":
                break
            if any(line.endswith(":devices:/") for line in raw.splitlines()):
                in_window += 1
            facts = Facts()
            cgroup_facts(HostPaths(), big, facts)
            snap, live = ContainerSnapshot(id="gttest-exiting", runtime="runc", created=0), Facts()
            read_init(HostPaths(), big, snap, live)
            for paths in (facts.get("cgroup.paths") or {}, live.get("cgroup.paths") or {}):
                rooted += paths.get("devices") == "/"
        assert in_window > 0, "never caught the task between PF_EXITING and its zombie state"
        assert rooted == 0, f"{rooted} readings named the root as the exiting task's devices cgroup"
    finally:
        try:
            os.kill(big, 9)
        except ProcessLookupError:
            pass
        os.waitpid(big, 0)
