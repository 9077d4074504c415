"""The BPF sensor against the real kernel: every captured field is checked
against what /proc said while the process lived."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import time
from typing import Iterator

import pytest

from tests.support import actor
from tests.support.nodes import NodeSpec, make_node, unique
from tracer.event import Event

pytestmark = pytest.mark.kernel

UNIFIED = "/sys/fs/cgroup/unified"
RNDADDTOENTCNT = 0x40045201


@contextlib.contextmanager
def gpu_node(mode: int = 0o660, major: int = 195, minor: int = 77, uid: int = 0,
             gid: int = 0, parent: str = "/dev", stem: str = "nvidia-") -> Iterator[str]:
    """A driverless char node whose path matches a default GPU prefix."""
    path = os.path.join(parent, stem + unique())
    make_node(path, NodeSpec(major=major, minor=minor, mode=mode, uid=uid, gid=gid))
    try:
        yield path
    finally:
        os.unlink(path)


@contextlib.contextmanager
def v2_cgroup() -> Iterator[str]:
    path = os.path.join(UNIFIED, unique())
    os.mkdir(path)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(path)


def status_ids(truth: dict, key: str) -> list[int]:
    return [int(x) for x in truth["status"][key].split()]


def only_denial(events: list[Event]) -> Event:
    denials = [e for e in events if e.kind == "denial"]
    assert len(denials) == 1, denials
    return denials[0]


def test_plain_user_every_field_matches_proc(bpf_sensor):
    with gpu_node() as node, v2_cgroup() as cg:
        res = actor.spawn({"uid": 1500, "gid": 1501, "groups": [1501, 27, 44, 109],
                           "comm": "gt-plain", "cgroup_procs": [cg + "/cgroup.procs"],
                           "actions": [{"op": "open", "path": node, "flags": "O_RDWR"}]}).check()
        assert res.errnos() == [errno.EACCES]
        ev = only_denial(bpf_sensor.wait_for(lambda e: e.process.pid == res.pid))
        t = res.truth
        p = ev.process
        assert (p.pid, p.tid, p.ppid, p.ns_pid) == (t["pid"], t["tid"], t["ppid"], t["pid"])
        assert p.comm == res.comm == b"gt-plain"
        uid_r, uid_e, _uid_s, uid_fs = status_ids(t, "Uid")
        gid_r, gid_e, _gid_s, gid_fs = status_ids(t, "Gid")
        assert (p.uid, p.euid, p.fsuid) == (uid_r, uid_e, uid_fs) == (1500, 1500, 1500)
        assert (p.gid, p.egid, p.fsgid) == (gid_r, gid_e, gid_fs) == (1501, 1501, 1501)
        assert sorted(p.groups) == sorted(status_ids(t, "Groups")) == [27, 44, 109, 1501]
        assert p.ngroups == 4
        assert p.cap_effective == int(t["status"]["CapEff"], 16)
        # struct-derived fields (offsets from BTF): namespaces and the cgroup
        assert p.userns.inum == t["ns"]["user"] and p.userns.level == 0
        assert (p.mntns, p.pidns, p.cgroupns) == (t["ns"]["mnt"], t["ns"]["pid"], t["ns"]["cgroup"])
        assert p.cgroup_id == os.stat(cg).st_ino
        assert ev.syscall == "openat" and ev.errno == errno.EACCES and ev.count == 1
        assert ev.node.path == node.encode()
        assert ev.open_flags is not None and ev.open_flags & os.O_ACCMODE == os.O_RDWR
        assert ev.sensor == "bpf" and ev.to_json()["errno"] == "EACCES"


def test_process_that_exits_at_once_is_still_captured(bpf_sensor):
    with gpu_node() as node:
        res = actor.spawn({"uid": 1502, "gid": 1502, "groups": [], "report_truth": False,
                           "actions": [{"op": "open", "path": node}]}).check()
        assert not os.path.exists(f"/proc/{res.pid}")  # gone before we look
        ev = only_denial(bpf_sensor.wait_for(lambda e: e.process.pid == res.pid))
        assert (ev.process.uid, ev.process.gid, ev.process.groups) == (1502, 1502, [])
        assert ev.node.path == node.encode()


def test_user_namespace_with_non_identity_map(bpf_sensor):
    maps = "0 1600 1\n1 300000 1000\n"
    with gpu_node(mode=0o660) as node:
        res = actor.spawn({"uid": 1600, "gid": 1600, "groups": [],
                           "userns": {"uid_map": maps, "gid_map": maps, "setgroups": "allow"},
                           "inner": {"uid": 0, "gid": 0, "groups": [5]},
                           "actions": [{"op": "open", "path": node}]}).check()
        assert res.errnos() == [errno.EACCES]
        t = res.truth
        assert t["uid_map"].split() == maps.split()
        ev = only_denial(bpf_sensor.wait_for(lambda e: e.process.pid == res.pid))
        p = ev.process
        # ids as the initial namespace sees them: inner 0 -> 1600, inner group 5 -> 300004
        assert (p.uid, p.fsuid, p.gid, p.fsgid) == (1600, 1600, 1600, 1600)
        assert p.groups == [300004]
        assert status_ids(t, "Uid")[0] == 0  # /proc, read inside, shows the inner id
        assert p.userns.inum == t["ns"]["user"] != os.stat("/proc/self/ns/user").st_ino
        assert p.userns.level == 1 and p.userns.owner_uid == 1600
        assert p.cap_effective == int(t["status"]["CapEff"], 16) != 0  # full caps, own ns only


def test_relative_path_and_dirfd_are_resolved(bpf_sensor):
    with gpu_node() as node:
        name = os.path.basename(node)
        res = actor.spawn({"uid": 1503, "gid": 1503, "groups": [], "chdir": "/dev",
                           "actions": [{"op": "open", "path": name},
                                       {"op": "open", "path": "./" + name, "flags": "O_WRONLY"},
                                       {"op": "open", "path": name, "dirfd": "/dev",
                                        "flags": "O_RDWR"}]}).check()
        assert res.errnos() == [errno.EACCES] * 3
        events = bpf_sensor.wait_for(lambda e: e.process.pid == res.pid and e.kind == "denial")
        ev = only_denial(events)  # three attempts, one node: one aggregate
        assert ev.node.path == node.encode()
        assert ev.node.path_as_given == name.encode()
        bpf_sensor.wait_for(lambda e: e.process.pid == res.pid and e.count == 3)


def test_relative_path_inside_dri_directory(bpf_sensor):
    made = not os.path.isdir("/dev/dri")
    os.makedirs("/dev/dri", exist_ok=True)
    try:
        with gpu_node(major=226, minor=200, parent="/dev/dri", stem="renderD-") as node:
            res = actor.spawn({"uid": 1504, "gid": 1504, "groups": [], "chdir": "/dev",
                               "actions": [{"op": "open", "path": "dri/" + os.path.basename(node)}]}).check()
            ev = only_denial(bpf_sensor.wait_for(lambda e: e.process.pid == res.pid))
            assert ev.node.path == node.encode()
    finally:
        if made:
            shutil.rmtree("/dev/dri", ignore_errors=True)


@pytest.mark.parametrize("op,syscall", [("openat2", "openat2"), ("creat", "creat")])
def test_openat2_and_creat(bpf_sensor, op, syscall):
    with gpu_node() as node:
        res = actor.spawn({"uid": 1505, "gid": 1505, "groups": [],
                           "actions": [{"op": op, "path": node, "flags": "O_RDWR"}]}).check()
        assert res.errnos() == [errno.EACCES]
        ev = only_denial(bpf_sensor.wait_for(lambda e: e.process.pid == res.pid))
        assert ev.syscall == syscall and ev.node.path == node.encode()


def test_denied_ioctl_on_a_matched_device(bpf_sensor):
    res = actor.spawn({"uid": 1506, "gid": 1506, "groups": [],
                       "actions": [{"op": "ioctl", "path": "/dev/urandom", "cmd": RNDADDTOENTCNT,
                                    "arg": 0}]}).check()
    assert res.errnos() == [errno.EPERM] and res.results[0]["stage"] == "ioctl"
    ev = only_denial(bpf_sensor.wait_for(lambda e: e.process.pid == res.pid))
    st = os.stat("/dev/urandom")
    assert ev.syscall == "ioctl" and ev.errno == errno.EPERM
    assert (ev.node.major, ev.node.minor) == (os.major(st.st_rdev), os.minor(st.st_rdev))
    assert ev.node.path == b"/dev/urandom"  # named in the kernel from the open file
    assert ev.ioctl_cmd == RNDADDTOENTCNT
    assert ev.process.uid == 1506


def test_no_event_for_permitted_open_or_non_gpu_path(bpf_sensor, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("x")
    os.chmod(secret, 0o600)
    os.chmod(tmp_path, 0o755)
    with gpu_node(mode=0o666, minor=78) as open_node, gpu_node(mode=0o600, minor=79) as shut_node:
        res = actor.spawn({"uid": 1507, "gid": 1507, "groups": [],
                           "actions": [{"op": "open", "path": open_node},
                                       {"op": "open", "path": str(secret)},
                                       {"op": "open", "path": shut_node}]}).check()
        assert res.errnos() == [errno.ENXIO, errno.EACCES, errno.EACCES]
        # the last (denied, GPU) open proves the sensor saw this process...
        bpf_sensor.wait_for(lambda e: e.process.pid == res.pid and e.node.path == shut_node.encode())
        # ...and it is the only thing seen from it
        paths = {e.node.path for e in bpf_sensor.for_pid(res.pid)}
        assert paths == {shut_node.encode()}


def test_storm_counts_are_exact_and_aggregated(bpf_sensor):
    before = bpf_sensor.sensor.stats()
    attempts = 150_000
    with gpu_node() as node:
        res = actor.spawn({"uid": 1508, "gid": 1508, "groups": [],
                           "actions": [{"op": "open_loop", "path": node, "count": attempts}]},
                          timeout=120).check()
        failures = res.results[0]["failures"]
        assert failures == {"EACCES": attempts}
        bpf_sensor.wait_for(lambda e: e.process.pid == res.pid and e.count == attempts, timeout=15)
        events = bpf_sensor.for_pid(res.pid)
    after = bpf_sensor.sensor.stats()
    assert bpf_sensor.total_count(res.pid, node.encode()) == attempts
    assert len([e for e in events if e.kind == "denial"]) == 1
    assert len(events) < 60  # the storm did not flood userspace
    assert after["denials"] - before["denials"] >= attempts
    assert after["aggregated"] - before["aggregated"] >= attempts - 1
    print(f"storm: {attempts} attempts, {attempts} counted, {len(events)} events delivered")


def test_hostile_comm_and_path_survive_capture(bpf_sensor):
    comm = b"gt\x1b[2J\xff\x07"
    with gpu_node(stem="nvidia-\x1b]0;pwn\x07-") as node:
        res = actor.spawn({"uid": 1509, "gid": 1509, "groups": [],
                           "comm_b64": __import__("base64").b64encode(comm).decode(),
                           "actions": [{"op": "open", "path": node}]}).check()
        ev = only_denial(bpf_sensor.wait_for(lambda e: e.process.pid == res.pid))
        assert ev.process.comm == comm
        assert ev.node.path == node.encode()
        back = Event.from_json(__import__("json").loads(__import__("json").dumps(ev.to_json())))
        assert back.process.comm == comm and back.node.path == node.encode()


def test_perf_buffer_transport_delivers_the_same_event():
    from tests.support.sensor_harness import SensorHarness
    from tracer.sensors.bpf_sensor import BpfConfig

    harness = SensorHarness(BpfConfig(transport="perf")).start()
    try:
        assert harness.sensor.transport == "perf"
        with gpu_node() as node:
            res = actor.spawn({"uid": 1510, "gid": 1510, "groups": [],
                               "actions": [{"op": "open", "path": node}]}).check()
            ev = only_denial(harness.wait_for(lambda e: e.process.pid == res.pid))
            assert ev.node.path == node.encode() and ev.process.uid == 1510
    finally:
        harness.close()


def test_extra_errnos_are_configurable():
    """ENXIO (permission granted, no driver) is reported only when asked for."""
    from tests.support.sensor_harness import SensorHarness
    from tracer.sensors.bpf_sensor import BpfConfig

    harness = SensorHarness(BpfConfig(errnos=(errno.ENXIO,))).start()
    try:
        with gpu_node(mode=0o666) as node, gpu_node(mode=0o600, minor=80) as shut:
            res = actor.spawn({"uid": 1511, "gid": 1511, "groups": [],
                               "actions": [{"op": "open", "path": shut},
                                           {"op": "open", "path": node}]}).check()
            assert res.errnos() == [errno.EACCES, errno.ENXIO]
            ev = only_denial(harness.wait_for(lambda e: e.process.pid == res.pid))
            assert ev.errno == errno.ENXIO and ev.node.path == node.encode()
    finally:
        harness.close()


# --- every spelling of a node, and the node under another name ----------------

@pytest.mark.parametrize("spell", [
    "{d}//{n}", "{d}/./{n}", "{d}/../dev/{n}", "/{d}/.//{n}", "/tmp/../../{d}/{n}",
])
def test_every_spelling_is_one_event_with_the_normalised_path(bpf_sensor, spell):
    with gpu_node() as node:
        d, n = os.path.split(node)
        given = spell.format(d=d, n=n)
        res = actor.spawn({"uid": 1520, "gid": 1520, "groups": [],
                           "actions": [{"op": "open", "path": given}]}).check()
        assert res.errnos() == [errno.EACCES]
        ev = only_denial(bpf_sensor.wait_for(lambda e: e.process.pid == res.pid))
        assert ev.node.path == node.encode()
        assert ev.node.path_as_given == given.encode()


def test_relative_spelling_with_dotdot_from_cwd(bpf_sensor):
    with gpu_node() as node:
        given = "../dev/./" + os.path.basename(node)
        res = actor.spawn({"uid": 1521, "gid": 1521, "groups": [], "chdir": "/tmp",
                           "actions": [{"op": "open", "path": given},
                                       {"op": "open", "path": node}]}).check()
        assert res.errnos() == [errno.EACCES] * 2
        ev = only_denial(bpf_sensor.wait_for(lambda e: e.process.pid == res.pid))
        assert ev.node.path == node.encode() and ev.node.path_as_given == given.encode()
        # both spellings are one node: one aggregate counting two denials
        bpf_sensor.wait_for(lambda e: e.process.pid == res.pid and e.count == 2)


@contextlib.contextmanager
def alias(kind: str, node: str) -> Iterator[str]:
    """The node reached under another name: a symlink, a bind mount, a second mknod."""
    path = os.path.join("/tmp", unique("gt-alias"))
    if kind == "symlink":
        os.symlink(node, path)
    elif kind == "bind":
        open(path, "w").close()
        subprocess.run(["mount", "--bind", node, path], check=True)
    else:
        st = os.stat(node)
        make_node(path, NodeSpec(major=os.major(st.st_rdev), minor=os.minor(st.st_rdev),
                                 mode=0o600))
    try:
        yield path
    finally:
        if kind == "bind":
            subprocess.run(["umount", path], check=False)
        os.unlink(path)


@pytest.mark.parametrize("kind", ["symlink", "bind", "mknod"])
def test_node_under_another_name_is_matched_by_device(bpf_sensor, kind):
    with gpu_node(mode=0o600, minor=81) as node, alias(kind, node) as other:
        res = actor.spawn({"uid": 1522, "gid": 1522, "groups": [], "report_truth": False,
                           "actions": [{"op": "open", "path": other}]}).check()
        assert res.errnos() == [errno.EACCES]
        assert not os.path.exists(f"/proc/{res.pid}")  # resolved after the process is gone
        ev = only_denial(bpf_sensor.wait_for(lambda e: e.process.pid == res.pid))
        assert ev.node.path == other.encode()
        assert (ev.node.major, ev.node.minor) == (195, 81)
        assert ev.process.uid == 1522 and ev.count == 1


def test_alias_in_another_mount_namespace_after_the_opener_exited(bpf_sensor):
    """The bind mount exists only in a private mount namespace; the opener is dead
    by the time userspace looks, a process holding the namespace is not."""
    with gpu_node(mode=0o600, minor=82) as node:
        spot = os.path.join("/tmp", unique("gt-ns"))
        open(spot, "w").close()
        script = (f"mount --bind {node} {spot} && "
                  f"setpriv --reuid 1523 --regid 1523 --clear-groups /usr/bin/python3 -c "
                  f"'import os\ntry: os.open(\"{spot}\", os.O_RDONLY)\nexcept OSError: print(os.getpid())' "
                  f"&& sleep 3")
        holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None
            pid = int(holder.stdout.readline())
            ev = only_denial(bpf_sensor.wait_for(lambda e: e.process.pid == pid))
            assert ev.node.path == spot.encode() and (ev.node.major, ev.node.minor) == (195, 82)
            assert ev.process.mntns != os.stat("/proc/self/ns/mnt").st_ino
        finally:
            holder.wait(10)
            os.unlink(spot)


def test_non_gpu_aliases_and_files_give_no_event(bpf_sensor, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    (locked / "f").write_text("x")
    os.chmod(tmp_path, 0o755)
    link = tmp_path / "link-to-null-dir"
    os.symlink(str(locked / "f"), link)
    with gpu_node(mode=0o600, minor=83) as shut:
        before = bpf_sensor.sensor.stats()
        res = actor.spawn({"uid": 1524, "gid": 1524, "groups": [],
                           "actions": [{"op": "open", "path": str(locked / "f")},
                                       {"op": "open", "path": str(link)},
                                       {"op": "open", "path": str(tmp_path / "locked/./f")},
                                       {"op": "open", "path": shut}]}).check()
        assert res.errnos() == [errno.EACCES] * 4
        bpf_sensor.wait_for(lambda e: e.process.pid == res.pid and e.node.path == shut.encode())
        assert {e.node.path for e in bpf_sensor.for_pid(res.pid)} == {shut.encode()}
        after = bpf_sensor.sensor.stats()
        # the three refusals were candidates, looked at and found not to be GPU nodes
        # (the counters are host-wide: other processes may add to them meanwhile)
        assert after["candidates"] - before["candidates"] >= 3
        assert after.get("candidates_not_gpu", 0) - before.get("candidates_not_gpu", 0) >= 1


def _locked_dir(tmp_path) -> str:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    os.chmod(tmp_path, 0o755)
    return str(locked)


def _settle(pred, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "counts did not settle"
        time.sleep(0.1)


def test_storm_of_refused_non_gpu_opens_is_counted_and_costs_no_events(bpf_sensor, tmp_path):
    attempts = 100_000
    target = os.path.join(_locked_dir(tmp_path), "f")
    before = bpf_sensor.sensor.stats()
    res = actor.spawn({"uid": 1525, "gid": 1525, "groups": [],
                       "actions": [{"op": "open_loop", "path": target, "count": attempts}]},
                      timeout=120).check()
    assert res.results[0]["failures"] == {"EACCES": attempts}
    after = bpf_sensor.sensor.stats()
    # every attempt counted (host-wide counters: others may add to them)
    assert after["candidates"] - before["candidates"] >= attempts
    # userspace looked once or twice; the kernel then dropped the repeats itself (how many
    # went by before userspace answered depends on the machine's load: 1,054 in one full run;
    # without the kernel's known-path map this count is 0)
    assert after["candidates_known"] - before["candidates_known"] >= attempts * 9 // 10
    time.sleep(1.0)
    assert bpf_sensor.for_pid(res.pid) == []


def test_storm_of_distinct_refused_paths_is_bounded_and_counted(bpf_sensor, tmp_path):
    paths = 10_000
    locked = _locked_dir(tmp_path)
    before = bpf_sensor.sensor.stats()
    code = (f"import os\nfor i in range({paths}):\n"
            f"    try: os.open('{locked}/f%d' % i, os.O_RDONLY)\n    except OSError: pass\n"
            "print(os.getpid())")
    out = subprocess.run(["setpriv", "--reuid", "1526", "--regid", "1526", "--clear-groups",
                          "/usr/bin/python3", "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    pid = int(out.stdout)

    def delta(name: str) -> int:
        return bpf_sensor.sensor.stats().get(name, 0) - before.get(name, 0)
    _settle(lambda: delta("candidates") >= paths)
    # each distinct path: looked at by userspace, or refused by the rate bound, or
    # lost to a full buffer; every one is counted, none becomes an event
    _settle(lambda: delta("candidates_not_gpu") + delta("candidates_rate_limited")
            + delta("dropped_buffer_full") >= paths)
    assert delta("candidates_rate_limited") < paths
    assert bpf_sensor.sensor.stats()["candidate_cache_entries"] <= 4096
    assert bpf_sensor.for_pid(pid) == []
    time.sleep(2.5)  # the rate bound refills before later tests


@pytest.mark.parametrize("kind", ["symlink", "bind", "mknod"])
def test_alias_event_is_explained_by_the_node_it_reached(bpf_sensor, kind):
    """The event of an alias goes through enrichment and the verdict like any other:
    the refusing layer is named from the node the alias reached (mode 0600 root)."""
    from tracer.enrichment.enricher import Enricher
    from tracer.host import HostPaths
    from tracer.verdict.explain import explain
    from tracer.verdict.reasons import MODE_RESTRICTIVE

    with gpu_node(mode=0o600, minor=84) as node, alias(kind, node) as other:
        held = actor.start({"uid": 1527, "gid": 1527, "groups": [], "hold": True,
                            "actions": [{"op": "open", "path": other}]})
        try:
            res = held.wait()
            assert res.errnos() == [errno.EACCES]
            ev = only_denial(bpf_sensor.wait_for(lambda e: e.process.pid == res.pid))
            verdict = explain(ev, Enricher(HostPaths()))
        finally:
            held.release()
        assert (ev.node.major, ev.node.minor) == (195, 84)
        assert verdict.reason == MODE_RESTRICTIVE, verdict.to_json()


def test_a_path_that_becomes_a_gpu_node_is_caught_once_not_gpu_expires(tmp_path):
    """'Not a GPU node' is trusted for not_gpu_ttl_s only: a node made later under
    a path already found harmless is caught, by the same process too."""
    from tests.support.sensor_harness import SensorHarness
    from tracer.sensors.bpf_sensor import BpfConfig

    harness = SensorHarness(BpfConfig(not_gpu_ttl_s=1.0)).start()
    try:
        locked = _locked_dir(tmp_path)
        later = os.path.join(locked, "gpu-later")
        held = actor.start({"uid": 1528, "gid": 1528, "groups": [], "await_go": True,
                            "actions": [{"op": "open", "path": later}, {"op": "sleep", "seconds": 2.5},
                                        {"op": "open", "path": later}]})
        try:
            held.truth()
            held.go()
            time.sleep(1.0)  # the first refusal was looked at: nothing there
            assert harness.sensor.stats().get("candidates_not_gpu", 0) >= 1
            make_node(later, NodeSpec(major=195, minor=86, mode=0o600))
            res = held.wait()
        finally:
            held.release()
        assert res.errnos() == [errno.EACCES, 0, errno.EACCES]  # open, sleep, open
        ev = only_denial(harness.wait_for(lambda e: e.process.pid == res.pid))
        assert ev.node.path == later.encode() and (ev.node.major, ev.node.minor) == (195, 86)
    finally:
        harness.close()


@pytest.mark.podman
def test_node_renamed_inside_a_container_is_matched_by_device(bpf_sensor):
    """`-v /dev/nvidia-X:/dev/gpu0`: the container opens /dev/gpu0, a name no GPU
    prefix matches; the device cgroup refuses it (EPERM).  Resolved in the
    container's own root while it lives: the event names /dev/gpu0 and 195:minor."""
    from tests.support import scenarios

    with scenarios.rootful_podman(via="bind", container_path="/dev/gpu0") as attempt:
        assert attempt.errno == errno.EPERM
        ev = only_denial(bpf_sensor.wait_for(
            lambda e: e.process.pid == attempt.host_pid and e.kind == "denial", timeout=15))
        assert ev.node.path == b"/dev/gpu0"
        assert (ev.node.major, ev.node.minor) == (attempt.node.major, attempt.node.minor)
        assert ev.process.mntns != os.stat("/proc/self/ns/mnt").st_ino
