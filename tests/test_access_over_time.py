"""Access that changes while the workload runs, on the real kernel (issue 17).

1. Device rules (cgroup v2): who attached, replaced or detached a device program,
   and when, as the access-change probe records it; the story a denial then gets.

runc runs on a pure cgroup2 mount (tests/support/runc_v2.py) and attaches its
own device program.  A process of its own (gt-hook) grants a GPU the way
libnvidia-container does on cgroup v2 for the legacy hook (every attached
program replaced by one that allows the node first, then runs the old
instructions); another (gt-reapply) re-applies the runtime's program, as
systemd or a runtime does.  The probe must record both calls with their
callers; the denial after the re-apply is `device_cgroup_revoked`, naming
gt-reapply by pid; the denial before the grant is `device_cgroup` with
"never granted".  `gputrace check --containers` lists the node in between.
The same story again from `gputrace watch` under exactly the systemd unit's
capability bounding set, which may not ask bpf() for a cgroup's programs
(BPF_PROG_QUERY needs CAP_NET_ADMIN, BPF_PROG_GET_FD_BY_ID CAP_SYS_ADMIN): every
state then comes from the probe's reading in the kernel at each call.

2. A group granted, then dropped: docker gives the container `--group-add G` and
   its entrypoint clears the groups before switching user, as `gosu user:group`
   does (tests/fixtures/rootfs/dropgroups.c).  The probe records the setgroups
   call; the verdict names the process that dropped G and never repeats the
   --group-add the user already gave.

3. A session older than the group: a real `su` session, then a real `usermod -aG`;
   the session's process is refused.  The verdict says the session predates the
   group (with /etc/group's change time) and never offers usermod.

4. The summary names the piece that refused: an ACL whose mask withholds write.
"""

from __future__ import annotations

import errno
import os
import random
import shlex
import subprocess
import sys
import time
from typing import Any, Iterator

import pytest

from tests.support import actor
from tests.support import podman as podman_support
from tests.support.device_program_hook import allow_first
from tests.support.docker import PrivateDocker
from tests.support.nodes import NodeSpec, make_node
from tests.support.probe import probe_binary
from tests.support.runc_v2 import RuncV2, make_container_node
from tests.support.scenario_workspace import Scenario
from tests.support.sensor_harness import SensorHarness
from tests.support.unit_caps import WatchUnderUnitCaps, verdict_of
from tracer.enrichment import bpf_syscall as bpf
from tracer.enrichment.access_history import AccessHistory
from tracer.enrichment.container_store import SnapshotStore
from tracer.enrichment.container_tracker import ContainerTracker
from tracer.enrichment.device_program import Insn, encode
from tracer.enrichment.enricher import Enricher
from tracer.enrichment.host_facts import cgroup2_mount_dir
from tracer.event import Event
from tracer.host import HostPaths
from tracer.sensors.access_change_records import DeviceProgramCall
from tracer.sensors.access_change_sensor import AccessChangeSensor
from tracer.sensors.bpf_event import DevProgRecord
from tracer.verdict import reasons as R
from tracer.verdict.check_containers import check_containers
from tracer.verdict.explain import explain_facts
from tracer.verdict.reasons import Verdict

pytestmark = [pytest.mark.kernel, pytest.mark.podman]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DROPGROUPS_C = os.path.join(REPO, "tests", "fixtures", "rootfs", "dropgroups.c")
DENY_ALL = [Insn(0xB4, 0, 0, 0, 0), Insn(0x95, 0, 0, 0, 0)]   # r0 = 0; exit


@pytest.fixture(scope="module")
def probe() -> Iterator[tuple[AccessHistory, list[Any]]]:
    history = AccessHistory(lambda: cgroup2_mount_dir(HostPaths()))
    seen: list[Any] = []

    def record(change: Any) -> None:
        seen.append(change)
        history.on_record(change)
    sensor = AccessChangeSensor(record).start()
    yield history, seen
    sensor.close()


def helper(*args: str) -> int:
    """Run tests/support/device_program_hook.py; its pid as it printed it."""
    done = subprocess.run([sys.executable, "-m", "tests.support.device_program_hook", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    return int(done.stdout.split()[0])


def wait(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def denial(sensor: SensorHarness, path: str, since: float) -> Event:
    return sensor.wait_for(lambda e: e.kind == "denial" and e.errno == errno.EPERM
                           and e.node.path == path.encode() and e.time >= since - 0.05,
                           timeout=15)[0]


def explained(event: Event, store: SnapshotStore, history: AccessHistory) -> Verdict:
    facts = Enricher(HostPaths(), snapshots=store, history=history).enrich(event)
    return explain_facts(event, facts)


def test_the_probe_reads_each_call_s_programs_as_bpf_reports_them(probe: Any) -> None:
    """Attach, replace, detach on a cgroup of our own: the target's programs before and
    after each call, and each program's instructions once, equal to what bpf() says."""
    history, seen = probe
    cgroup = f"/sys/fs/cgroup/unified/gtprobe-{random.randint(0, 1 << 30):x}"
    os.mkdir(cgroup)
    fds: list[int] = []
    try:
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        fds.append(fd)
        first = bpf.prog_load(encode(allow_first(195, 1) + DENY_ALL), name="gt_first")
        second = bpf.prog_load(encode(DENY_ALL), name="gt_second")
        fds += [first, second]
        ids = [bpf.prog_info(p).id for p in (first, second)]
        xlated = {bpf.prog_info(p).id: bpf.prog_info(p).xlated for p in (first, second)}
        since = len(seen)
        bpf.prog_attach(fd, first)
        bpf.prog_attach(fd, second, replace_fd=first)
        bpf.prog_detach(fd, second)
        wait(lambda: sum(isinstance(c, DeviceProgramCall) and c.target_cgroup == os.stat(
            cgroup).st_ino for c in seen[since:]) == 3, "three recorded calls")
    finally:
        for handle in fds:
            os.close(handle)
        os.rmdir(cgroup)
    calls = [c for c in seen[since:] if isinstance(c, DeviceProgramCall)]
    assert [(c.before_ids, c.after_ids) for c in calls] == [
        ((), (ids[0],)), ((ids[0],), (ids[1],)), ((ids[1],), ())]
    records = [r for r in seen[since:] if isinstance(r, DevProgRecord) and r.id in ids]
    assert {r.id: r.insns for r in records} == xlated and len(records) == 2  # once per id
    assert [r.name for r in records] == ["gt_first", "gt_second"]


def test_a_v2_grant_taken_back_by_a_reapply_names_who_did_it(bpf_sensor: SensorHarness,
                                                             probe: Any) -> None:
    history, seen = probe
    minor = random.randint(100, 250)
    path = f"/dev/nvidia-gtv2{minor}"
    container = RuncV2()
    os.makedirs(container.root, 0o700)
    store = SnapshotStore()
    tracker = ContainerTracker(HostPaths(), store, extra_roots=((container.root, "runc"),),
                               history=history).start()
    host_node = make_node(path, NodeSpec(195, minor, 0o666))  # the host has it, like a real GPU
    try:
        container.start()
        wait(lambda: store.get(container.id) is not None, "the tracker's snapshot")
        make_container_node(container.pid, path, 195, minor)

        before = time.time()
        assert "Operation not permitted" in container.exec("cat", path).stderr
        never = explained(denial(bpf_sensor, path, before), store, history)
        print("before the grant:", never.reason, never.notes[:2])
        assert never.reason == R.DEVICE_CGROUP, never.to_json()
        assert any("never allowed" in n for n in never.notes), never.notes

        hook_pid = helper("grant", container.cgroup_dir, "195", str(minor),
                          os.path.join(container.base, "saved"))
        assert "No such device or address" in container.exec("cat", path).stderr
        rows = [r for r in check_containers(HostPaths(), [(container.root, "runc")])
                if r.node == path]
        print("check --containers:", [r.to_json() for r in rows])
        assert rows and rows[0].at_risk and rows[0].in_config is False and rows[0].allowed_now

        reapply_pid = helper("reapply", container.cgroup_dir, os.path.join(container.base, "saved"))
        wait(lambda: any(isinstance(c, DeviceProgramCall) and c.caller.pid == reapply_pid
                         for c in seen), "the re-apply's bpf() call")
        before = time.time()
        assert "Operation not permitted" in container.exec("cat", path).stderr
        verdict = explained(denial(bpf_sensor, path, before), store, history)
    finally:
        container.remove()
        tracker.close()
        os.unlink(host_node)
    calls = [c for c in seen if isinstance(c, DeviceProgramCall)
             and c.caller.pid in (hook_pid, reapply_pid)]
    print("recorded:", [(c.caller.comm, c.caller.pid, c.how()) for c in calls])
    assert [c.caller.comm for c in calls] == ["gt-hook", "gt-reapply"]
    assert all(c.cmd == "BPF_PROG_ATTACH" and c.replace_prog_id and c.ret == 0 for c in calls)
    print("verdict:", verdict.reason, verdict.summary, verdict.notes)
    assert verdict.reason == R.DEVICE_CGROUP_REVOKED, verdict.to_json()
    assert f"gt-reapply (pid {reapply_pid}" in verdict.summary, verdict.summary
    assert any(n.startswith("Granted after the container started") and "gt-hook" in n
               for n in verdict.notes), verdict.notes
    dropped = next(n for n in verdict.notes if n.startswith("Dropped at"))
    assert "'gt_hook'" in dropped and "'gt_reapply'" in dropped, dropped
    assert verdict.fixes[0].command.startswith(("docker run --device", "podman run --device"))


def test_a_v2_grant_taken_back_by_a_reapply_is_told_under_the_units_capabilities() -> None:
    minor = random.randint(100, 250)
    path = f"/dev/nvidia-gtv2{minor}"
    watch = WatchUnderUnitCaps().start()   # before the container: it sees runc's own attach
    container = RuncV2()
    os.makedirs(container.root, 0o700)
    host_node = make_node(path, NodeSpec(195, minor, 0o666))
    try:
        container.start()
        make_container_node(container.pid, path, 195, minor)
        hook_pid = helper("grant", container.cgroup_dir, "195", str(minor),
                          os.path.join(container.base, "saved"))
        assert "No such device or address" in container.exec("cat", path).stderr
        reapply_pid = helper("reapply", container.cgroup_dir, os.path.join(container.base, "saved"))
        before = time.time()
        assert "Operation not permitted" in container.exec("cat", path).stderr
        event = watch.wait_for(lambda e: e.kind == "denial" and e.errno == errno.EPERM
                               and e.node.path == path.encode() and e.time >= before - 0.05,
                               timeout=30)[0]
    finally:
        container.remove()
        watch.close()
        os.unlink(host_node)
    verdict = verdict_of(event)
    print("capabilities:", " ".join(watch.caps), f"(CapEff {watch.cap_eff:#x})")
    starts = [s for s in event.facts.get("device_cgroup.at_start") or []
              if s.get("layer") == "device_cgroup_v2"]
    print("at start:", [(s.get("origin"), s.get("why_unknown"),
                         [p.get("id") for p in s.get("rules") or []]) for s in starts])
    print("verdict:", verdict.reason, "|", verdict.summary, "|", verdict.notes)
    assert watch.cap_eff & (1 << 21) == 0 and watch.cap_eff & (1 << 12) == 0  # no SYS/NET_ADMIN
    # runc's own attach, seen by the probe, is the start state bpf() could not read
    assert starts and starts[0].get("rules"), starts
    assert verdict.reason == R.DEVICE_CGROUP_REVOKED, verdict.to_json()
    assert f"gt-reapply (pid {reapply_pid}" in verdict.summary, verdict.summary
    granted = next(n for n in verdict.notes if n.startswith("Granted after the container started"))
    assert f"gt-hook (pid {hook_pid}" in granted, granted
    dropped = next(n for n in verdict.notes if n.startswith("Dropped at"))
    assert "'gt_hook'" in dropped and "'gt_reapply'" in dropped, dropped
    assert verdict.fixes[0].command.startswith(("docker run --device", "podman run --device"))


# --- 2. a group granted by the runtime, dropped by the entrypoint -------------------

@pytest.fixture(scope="module")
def docker() -> Iterator[PrivateDocker]:
    engine = PrivateDocker()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def docker_image(docker: PrivateDocker) -> str:
    docker.start()
    rootfs = podman_support.build_rootfs(
        os.path.join(docker.base, "rootfs"), probe_binary(), podman_support.RootfsFiles(
            passwd=("root:x:0:0:root:/:/bin/sh", "gtapp:x:1000:1000::/:/bin/sh"),
            group=("root:x:0:", "gtapp:x:1000:")))
    dropper = os.path.join(rootfs, "bin", "dropgroups")
    subprocess.run(["gcc", "-static", "-Os", "-Wall", "-o", dropper, DROPGROUPS_C], check=True,
                   capture_output=True, timeout=120)
    return docker.import_rootfs(rootfs, "gttest/dropgroups:latest")


def test_a_group_the_runtime_granted_and_the_entrypoint_dropped(
        bpf_sensor: SensorHarness, probe: Any, docker: PrivateDocker, docker_image: str) -> None:
    history, seen = probe
    store = SnapshotStore()
    tracker = ContainerTracker(HostPaths(), store, extra_roots=((docker.runc_root, "runc"),),
                               history=history).start()
    try:
        with Scenario("grpdrop") as scenario:
            group = scenario.group("gpu")
            node = scenario.nvidia_node(0o660, group.gr_gid)
            inside = f"/dev/nvidia-gtdrop{node.minor}"
            started = time.time()
            done = docker.run_to_exit(
                f"gttest-grpdrop-{scenario.token}",
                ["--group-add", str(group.gr_gid), "--device", f"{node.path}:{inside}"],
                ["/bin/dropgroups", "1000", "1000", "/bin/cat", inside], image=docker_image)
            assert "Permission denied" in done.stderr, done.stderr
            event = bpf_sensor.wait_for(lambda e: e.kind == "denial" and e.errno == errno.EACCES
                                        and e.node.path == inside.encode()
                                        and e.time >= started - 0.05, timeout=15)[0]
            facts = Enricher(HostPaths(), snapshots=store, history=history).enrich(event)
            verdict = explain_facts(event, facts)
    finally:
        tracker.close()
    print("group changes:", facts.get("process.group_changes"))
    print("verdict:", verdict.reason, "|", verdict.summary, "|", [f.command for f in verdict.fixes])
    assert group.gr_gid not in event.process.groups
    assert verdict.reason == R.GROUP_DROPPED_BY_PROCESS and verdict.confidence == "high", \
        verdict.to_json()
    assert "dropgroups" in verdict.summary and "setgroups" in verdict.summary
    assert "additionalGids" in verdict.summary
    commands = [f.command for f in verdict.fixes]
    assert not any("--group-add" in c or "supplementalGroups" in c for c in commands), commands
    assert "--keep-groups" in commands[0] and str(group.gr_gid) in commands[1], commands


def test_docker_gpu_granted_outside_its_config_is_predicted_lost_then_revoked(
        bpf_sensor: SensorHarness, probe: Any, docker: PrivateDocker, docker_image: str) -> None:
    """cgroup v1 with docker's own rule list: the hook's rule is not in the config, so
    `check --containers` predicts its loss; a re-apply as systemd's reset does it
    (deny all, then the rules the container started with) takes it away."""
    history, _ = probe
    store = SnapshotStore()
    tracker = ContainerTracker(HostPaths(), store, extra_roots=((docker.runc_root, "runc"),),
                               history=history).start()
    name = f"gttest-rev-{random.randint(0, 1 << 30):x}"
    try:
        with Scenario("dockrev") as scenario:
            node = scenario.nvidia_node(0o666)
            cid = docker.run("run", "-d", "--network", "none", "--name", name, docker_image,
                             "/bin/sleep", "600").stdout.strip()
            scenario.undo("docker rm", docker.run, "rm", "-f", name)
            wait(lambda: store.get(cid) is not None, "the tracker's snapshot")
            pid = int(docker.run("inspect", "-f", "{{.State.Pid}}", cid).stdout)
            with open(f"/proc/{pid}/cgroup", encoding="ascii") as cgroups:
                devices = next(line.split(":", 2)[2] for line in cgroups
                               if ":devices:" in line).strip()
            directory = f"/sys/fs/cgroup/devices{devices}"
            with open(f"{directory}/devices.list", encoding="ascii") as listed:
                started_with = listed.read().split("\n")
            make_container_node(pid, node.path, 195, node.minor)   # as the hook does
            with open(f"{directory}/devices.allow", "w", encoding="ascii") as allow:
                allow.write(f"c 195:{node.minor} rw")
            assert "No such device" in docker.run("exec", cid, "cat", node.path, check=False).stderr
            rows = [r for r in check_containers(HostPaths(), [(docker.runc_root, "runc")])
                    if r.node == node.path]
            print("check --containers:", [r.to_json() for r in rows])
            assert rows and rows[0].at_risk and rows[0].in_config is False \
                and rows[0].container == name and rows[0].manager == "cgroupfs"
            reapply = "echo a > devices.deny; " + "; ".join(
                f"echo {shlex.quote(rule)} > devices.allow" for rule in started_with if rule)
            subprocess.run(["sh", "-c", reapply], cwd=directory, check=True)
            time.sleep(0.3)  # the watcher's settle time: the burst is one change
            started = time.time()
            assert "Operation not permitted" in docker.run("exec", cid, "cat", node.path,
                                                           check=False).stderr
            event = denial(bpf_sensor, node.path, started)
            verdict = explained(event, store, history)
    finally:
        tracker.close()
    print("verdict:", verdict.reason, "|", verdict.summary, "|", [f.command for f in verdict.fixes])
    assert verdict.reason == R.DEVICE_CGROUP_REVOKED, verdict.to_json()
    assert "outside the container's OCI config" in verdict.summary and name in verdict.summary
    assert any(n.startswith("Dropped at") and f"- c 195:{node.minor} rw" in n
               for n in verdict.notes), verdict.notes
    commands = [f.command for f in verdict.fixes]
    assert commands[:2] == ["docker run --device nvidia.com/gpu=all ...",
                            f"docker run --device {node.path} ..."], commands
    assert "devices.allow" in commands[-1] and verdict.fixes[-1].summary.startswith("Stop-gap")


# --- 3. a session older than the group -----------------------------------------------

def test_a_session_started_before_usermod_lacks_the_group(bpf_sensor: SensorHarness) -> None:
    with Scenario("session") as scenario:
        group = scenario.group("gpu")
        user = scenario.user("late")
        node = scenario.nvidia_node(0o660, group.gr_gid)
        fifo = os.path.join(scenario.workdir, "go")
        os.mkfifo(fifo, 0o666)
        # a login session (PAM, initgroups) that waits, then opens the node and lingers
        session = subprocess.Popen(
            ["setsid", "su", "-s", "/bin/sh", user.pw_name, "-c",
             f"read x < {fifo}; cat {node.path}; sleep 20"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        scenario.undo("end the session", session.kill)
        time.sleep(1.2)  # /etc/group's mtime must be after the session's start
        subprocess.run(["usermod", "-aG", group.gr_name, user.pw_name], check=True)
        started = time.time()
        with open(fifo, "w", encoding="ascii") as go:
            go.write("go\n")
        event = bpf_sensor.wait_for(lambda e: e.kind == "denial" and e.errno == errno.EACCES
                                    and e.node.path == node.path.encode()
                                    and e.time >= started - 0.05, timeout=15)[0]
        time.sleep(0.2)  # cat has exited; its shell and the session leader live on
        facts = Enricher(HostPaths()).enrich(event)
        verdict = explain_facts(event, facts)
        session.kill()
    print("session:", facts.get("process.session_leader"), "group file changed:",
          facts.get("host.etc_group_changed"))
    print("verdict:", verdict.reason, "|", verdict.summary, "|", [f.command for f in verdict.fixes])
    assert facts.get("process.live") is False
    assert verdict.reason == R.SESSION_PREDATES_GROUP, verdict.to_json()
    # timed: the session's start and the change of /etc/group, both named
    assert "only after this process's session started" in verdict.summary, verdict.summary
    assert user.pw_name in verdict.summary and group.gr_name in verdict.summary
    commands = [f.command for f in verdict.fixes]
    assert not any("usermod" in c for c in commands), commands
    assert commands[0] == f"newgrp {group.gr_name}", commands
    assert any(c.startswith("loginctl terminate-user") for c in commands), commands


# --- 4. the summary names the piece that refused: the ACL mask -----------------------

def test_an_acl_mask_withholding_write_is_named(bpf_sensor: SensorHarness) -> None:
    """The ACL grants the process's group read and write, the mask only read: the
    summary names the mask, not "only the owner"."""
    minor = random.randint(100, 250)
    path = f"/dev/nvidia-gtmask{minor}"
    uid, gid = 41731, 41732
    make_node(path, NodeSpec(195, minor, 0o640, 0, 0, setfacl=(f"g:{gid}:rw", "m::r")))
    try:
        result = actor.spawn({"uid": uid, "gid": uid, "groups": [gid],
                              "actions": [{"op": "open", "path": path, "flags": "O_RDWR"}]})
        assert result.errnos() == [errno.EACCES]
        event = bpf_sensor.wait_for(lambda e: e.process.pid == result.pid
                                    and e.kind == "denial", timeout=15)[0]
        verdict = explain_facts(event, Enricher(HostPaths()).enrich(event))
    finally:
        os.unlink(path)
    print("verdict:", verdict.reason, "|", verdict.summary, "|", [f.command for f in verdict.fixes])
    assert verdict.reason == R.ACL_MASK_WITHHOLDS, verdict.to_json()
    assert "ACL mask" in verdict.summary and "mask r--" in verdict.summary, verdict.summary
    assert verdict.fixes[0].command == f"setfacl -m m::rw {path}"
