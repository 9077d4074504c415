"""The userspace half of matching by device: candidates (refused opens outside the
GPU prefixes) are kept only when their path is a GPU char device, on the real
filesystem; the kernel maps are stood in for by dicts (our own logic here)."""

from __future__ import annotations

import ctypes
import os
import stat
from typing import Any

from tests.test_sensor_units import raw_event
from tracer.sensors import bpf_event
from tracer.sensors.bpf_constants import TARGET_CANDIDATE
from tracer.sensors.bpf_sensor import BpfConfig, BpfSensor
from tracer.sensors.candidates import DeviceResolver
from tracer.sensors.gpu_nodes import GpuNodeSet


class _Key(ctypes.Structure):
    _fields_ = [("tgid", ctypes.c_uint32), ("sys", ctypes.c_uint16), ("err", ctypes.c_uint16),
                ("target", ctypes.c_uint64), ("mntns", ctypes.c_uint32), ("hash", ctypes.c_uint64)]


class _Table(dict):  # type: ignore[type-arg]
    Key = _Key

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(bytes(key), value)

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(bytes(key))


class _Maps:
    def __init__(self) -> None:
        self.tables = {b"agg": _Table(), b"not_gpu": _Table()}

    def __getitem__(self, name: bytes) -> _Table:
        return self.tables[name]


def sensor_for(tmp_path) -> BpfSensor:
    # the test process stands in for the refused one (its root is resolvable): here it
    # is not the tracer whose own look-ups the sensor leaves out
    sensor = BpfSensor(BpfConfig(not_gpu_ttl_s=10.0), say=lambda m: None, own_tgid=0)
    sensor.bpf = _Maps()
    sensor.resolver = DeviceResolver(GpuNodeSet(majors={195: "nvidia"}), ttl_s=10.0)
    return sensor


def candidate(path: str, count: int = 1, kind: int = 1) -> bytes:
    mntns = os.stat("/proc/self/ns/mnt").st_ino
    pid = os.getpid()
    return raw_event(kind=kind, tgid=pid, ktgid=pid, target=TARGET_CANDIDATE | 0x1234, count=count,
                     ns=(mntns, 2, 3, pid), path=path.encode(), given=path.encode(),
                     path_len=len(path), path_flags=bpf_event.F_CANDIDATE)


def test_a_plain_file_is_not_a_gpu_node_and_repeats_stay_silent(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    sensor = sensor_for(tmp_path)
    sensor._ingest(candidate(str(plain)))
    sensor._ingest(candidate(str(plain), count=40, kind=2)[:bpf_event.UPDATE_SIZE])
    assert list(sensor._queue) == []
    assert sensor._user_stats["candidates_not_gpu"] == 1
    assert len(sensor.bpf[b"not_gpu"]) == 1  # the kernel is told to stop sending it


def test_a_gpu_char_device_under_another_name_is_kept_with_its_number(tmp_path):
    node = tmp_path / "gpu0"
    os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(195, 7))
    sensor = sensor_for(tmp_path)
    sensor._ingest(candidate(str(node)))
    (event,) = list(sensor._queue)
    assert (event.node.major, event.node.minor) == (195, 7)
    assert event.facts.get("sensor.matched_by_device") is True
    assert sensor._user_stats["candidates_gpu"] == 1


def test_a_non_gpu_char_device_is_not_kept(tmp_path):
    node = tmp_path / "tty-like"
    os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(4, 70))
    sensor = sensor_for(tmp_path)
    sensor._ingest(candidate(str(node)))
    assert list(sensor._queue) == [] and sensor._user_stats["candidates_not_gpu"] == 1


def test_counts_before_a_resent_first_event_do_not_make_a_non_gpu_path_an_event(tmp_path):
    """The first event was refused by a full buffer: count updates arrive first,
    then the resend.  The resend is still asked whether it is a GPU node."""
    plain = tmp_path / "plain"
    plain.write_text("x")
    sensor = sensor_for(tmp_path)
    sensor._ingest(candidate(str(plain), count=9, kind=2)[:bpf_event.UPDATE_SIZE])
    sensor._ingest(candidate(str(plain), count=10))
    assert list(sensor._queue) == []
    assert sensor._user_stats["candidates_not_gpu"] == 1


def test_resolver_answers_expire_and_the_cache_is_bounded(tmp_path):
    now = [100.0]
    resolver = DeviceResolver(GpuNodeSet(majors={195: "nvidia"}), ttl_s=5.0, cache_max=3,
                              clock=lambda: now[0])
    mntns, pid = os.stat("/proc/self/ns/mnt").st_ino, os.getpid()
    later = tmp_path / "later"
    assert resolver.resolve(pid, mntns, str(later).encode()).outcome == "not_gpu"
    os.mknod(later, stat.S_IFCHR | 0o600, os.makedev(195, 9))
    assert resolver.resolve(pid, mntns, str(later).encode()).outcome == "not_gpu"  # cached
    now[0] += 6.0
    found = resolver.resolve(pid, mntns, str(later).encode())
    assert (found.outcome, found.major, found.minor) == ("gpu", 195, 9)
    for i in range(10):
        resolver.resolve(pid, mntns, str(tmp_path / f"n{i}").encode())
    assert len(resolver) == 3 and resolver.counts["cache_evicted"] >= 8


def test_a_namespace_with_no_live_process_is_unresolved_not_guessed(tmp_path):
    resolver = DeviceResolver(GpuNodeSet(majors={195: "nvidia"}))
    gone = resolver.resolve(2**22 + 12345, 1, b"/dev/nvidia0")  # no such pid, no such ns
    assert gone.outcome == "unresolved" and resolver.counts["unresolved"] == 1
    assert len(resolver) == 0  # not cached: a process may appear there later


def test_resolution_never_leaves_the_process_root(tmp_path):
    """A symlink inside a container root that points at an absolute host path is
    resolved inside that root (RESOLVE_IN_ROOT), never on the host."""
    root = tmp_path / "root"
    (root / "dev").mkdir(parents=True)
    os.mknod(tmp_path / "host-gpu", stat.S_IFCHR | 0o600, os.makedev(195, 3))
    os.symlink(str(tmp_path / "host-gpu"), root / "dev" / "gpu0")
    resolver = DeviceResolver(GpuNodeSet(majors={195: "nvidia"}))
    assert resolver._stat(str(root), b"/dev/gpu0").outcome == "not_gpu"
    assert resolver._stat("/", str(tmp_path / "host-gpu").encode()).outcome == "gpu"



def _gone_container(store: Any, oci: dict[str, Any], created: float, died: float) -> None:
    from tracer.enrichment.container_store import ContainerSnapshot

    snap = ContainerSnapshot(id="c0ffee", runtime="runc", created=created, mntns=4026599999)
    snap.put("container.oci", oci, "/run/bundle/config.json")
    snap.put("container.name", "gone-one", "conmon -n")
    store.add(snap)
    store.mark_died("c0ffee", died)


def test_a_gone_container_alias_is_resolved_through_its_snapshot(tmp_path):
    """No live process in the namespace: the container snapshot's OCI config says
    what the path was, a linux.devices entry or a bind mount of a host node; only
    within the container's lifetime, and only a GPU char device."""
    from tracer.enrichment.container_store import SnapshotStore
    from tracer.event import Process

    store = SnapshotStore()
    os.mknod(tmp_path / "host-gpu", stat.S_IFCHR | 0o600, os.makedev(195, 7))
    (tmp_path / "plain").write_bytes(b"")
    _gone_container(store, {
        "linux": {}, "devices": [
            {"path": "/dev/gpu0", "type": "c", "major": 195, "minor": 3},
            {"path": "/dev/rnd", "type": "c", "major": 1, "minor": 8}],
        "mounts": [{"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
                   {"destination": "/dev/gpu1", "type": "bind", "source": str(tmp_path / "host-gpu")},
                   {"destination": "/mnt", "type": "bind", "source": str(tmp_path)}]},
        created=1000.0, died=1010.0)
    resolver = DeviceResolver(GpuNodeSet(majors={195: "nvidia"}), snapshots=store)
    proc = Process(pid=2**22 + 12345, tid=2**22 + 12345, mntns=4026599999)

    def at(path: bytes, when: float = 1005.0) -> Any:
        return resolver.resolve(proc.pid, proc.mntns, path, proc, when)

    dev = at(b"/dev/gpu0")
    assert (dev.outcome, dev.major, dev.minor) == ("gpu", 195, 3)
    assert dev.via is not None and dev.via["how"] == "linux.devices"
    assert dev.via["container"] == "c0ffee" and dev.via["name"] == "gone-one"
    bind = at(b"/dev/gpu1")
    assert (bind.outcome, bind.major, bind.minor) == ("gpu", 195, 7)
    assert bind.via is not None and bind.via["how"] == f"bind mount of host {tmp_path}/host-gpu"
    below = at(b"/mnt/host-gpu")  # a bind mount of a parent directory
    assert (below.outcome, below.minor) == ("gpu", 7)
    assert at(b"/mnt/plain").outcome == "not_gpu"
    assert at(b"/dev/rnd").outcome == "not_gpu"
    assert at(b"/dev/other").outcome == "unresolved"  # the config does not say
    assert at(b"/dev/gpu0", when=1100.0).outcome == "unresolved"  # inode reused later
    assert resolver.counts["gpu_via_snapshot"] == 3 and resolver.counts["not_gpu_via_snapshot"] == 2
    assert resolver.counts["unresolved"] == 2
    assert len(resolver) == 0  # snapshot answers are not cached
    none = DeviceResolver(GpuNodeSet(majors={195: "nvidia"}))
    assert none.resolve(proc.pid, proc.mntns, b"/dev/gpu0", proc, 1005.0).outcome == "unresolved"


def test_a_snapshot_taken_after_its_init_exited_is_found_by_the_init_pid():
    """Under load the tracker may read a container's state after its only process
    exited: no namespace keys, but its init pid and lifetime.  An event with kernel
    keys falls back to that pid; a snapshot whose keys were read and differ does not."""
    from tracer.enrichment.container_store import ContainerSnapshot, SnapshotStore
    from tracer.event import Process

    store = SnapshotStore()
    store.add(ContainerSnapshot(id="keyless", runtime="runc", created=1000.0, pid=4242))
    store.add(ContainerSnapshot(id="keyed", runtime="runc", created=1000.0, pid=4343,
                                mntns=4026500001))
    opener = Process(pid=4242, tid=4242, mntns=4026599999, pidns=4026599998)
    hit = store.find(opener, 1000.5)
    assert hit is not None and hit[0].id == "keyless" and hit[1].startswith("pid 4242")
    assert store.find(Process(pid=4343, tid=4343, mntns=4026599999), 1000.5) is None
    assert store.find(opener, 999.0) is None  # before it was created


def test_the_summary_line_counts_aliases_resolved_through_a_snapshot_and_unresolved():
    from tracer.pipeline import Summary

    summary = Summary()
    assert "matched by device" not in summary.line()
    summary.sensor_stats = {"candidates": 9, "candidates_gpu": 2, "candidates_gpu_via_snapshot": 3,
                            "candidates_unresolved": 1, "candidates_not_gpu": 3}
    assert ("other paths matched by device 5 (of which 3 through a gone container's snapshot), "
            "unresolved 1") in summary.line()
