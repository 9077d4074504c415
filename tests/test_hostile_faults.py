"""Faults a hostile or merely unlucky process causes, on the real kernel: it
exits (or its container goes) while we enrich it, its pid names someone else
by the time we look, its filesystem changes under our path walk, it fills the
ring buffer, or it opens a PATH_MAX-long path."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import threading
import time
from collections import defaultdict
from typing import Optional

import pytest

from tests.fuzz.denial_storm import denied_dir, held_storm, storm
from tests.support.sensor_harness import SensorHarness
from tests.test_hostile_strings import assert_terminal_safe
from tracer.enrichment.enricher import Enricher
from tracer.enrichment.node import NodeStat, stat_in_root
from tracer.in_root import resolve_in_root
from tracer.event import Event, Node, Process, UserNs
from tracer.host import HostPaths
from tracer.sensors.bpf_sensor import BpfConfig
from tracer.sinks.console import denial_line

pytestmark = pytest.mark.kernel


def ns_inum(pid: int, kind: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


def start_in_own_mount_ns() -> subprocess.Popen:
    """A process with a private mount namespace and a tmpfs over /dev of its own,
    like a container: its /proc/PID/root view differs from ours."""
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             "mount -t tmpfs gttest /mnt && echo ready && exec sleep 60"],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc


def event_for(pid: int, mntns: int, userns: int, path: bytes = b"/dev/nvidia0") -> Event:
    return Event(time=time.time(), sensor="bpf", syscall="openat", errno=errno.EACCES,
                 process=Process(pid=pid, tid=pid, uid=1000, gid=1000, mntns=mntns,
                                 userns=UserNs(userns, 0, 0)),
                 node=Node(path=path, major=195, minor=0))


def test_process_exits_during_enrichment() -> None:
    """The process is killed after its live facts were read and before its node
    is looked up inside its root: enrichment does not stop half way with a live
    process's half reading (a node 'removed', a layer unread), it reads the event
    again as the gone process it now is, and counts that."""
    proc = start_in_own_mount_ns()
    event = event_for(proc.pid, ns_inum(proc.pid, "mnt"), ns_inum(proc.pid, "user"))
    calls: list[str] = []

    def kill_then_stat(root: str, path: str) -> Optional[NodeStat]:
        if not calls:
            proc.kill()
            proc.wait()
        calls.append(root)
        return stat_in_root(root, path)  # the real statter, on a root that is gone

    enricher = Enricher(HostPaths(), stat_node=kill_then_stat)
    facts = enricher.enrich(event)
    assert calls, "the node was never looked up: the kill did not happen mid-way"
    assert not os.path.exists(f"/proc/{proc.pid}")
    assert enricher.counters["exited_while_enriched"] == 1
    assert facts.get("process.live") is False  # judged as the gone process it became
    assert facts.get("node.seen_from") == "host"  # its root went with it: looked up on the host
    assert event.facts and "node.path" in event.facts


def test_process_gone_before_enrichment() -> None:
    proc = start_in_own_mount_ns()
    event = event_for(proc.pid, ns_inum(proc.pid, "mnt"), ns_inum(proc.pid, "user"))
    proc.kill()
    proc.wait()
    facts = Enricher(HostPaths()).enrich(event)
    assert facts.get("process.live") is False


def test_random_exit_races_never_raise() -> None:
    """Kill at a random moment while enrichment runs, many times over."""
    enricher = Enricher(HostPaths())
    rng = random.Random(7)
    for _ in range(25):
        proc = start_in_own_mount_ns()
        event = event_for(proc.pid, ns_inum(proc.pid, "mnt"), ns_inum(proc.pid, "user"))
        killer = threading.Timer(rng.uniform(0, 0.004), proc.kill)
        killer.start()
        try:
            enricher.enrich(event)
        finally:
            killer.join()
            proc.kill()
            proc.wait()


def test_reused_pid_is_not_taken_for_the_process() -> None:
    """The event's pid now names another process (here: this test): the namespace
    inodes do not match, so nothing is read from it as if it were the original."""
    event = event_for(os.getpid(), mntns=4026599999, userns=4026599998)
    facts = Enricher(HostPaths()).enrich(event)
    assert facts.get("process.live") is False
    assert "process.groups_in_ns" not in facts  # read from the live /proc/PID/status


def test_path_walk_survives_a_changing_container_filesystem(tmp_path) -> None:
    """A container flips /etc/group between a symlink, a file and nothing while we
    resolve it inside its root: we get an answer or None, never an OSError.
    (Before the fix in resolve_in_root this failed within a few hundred tries.)"""
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    target = root / "etc" / "group"
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            for make in (lambda: os.symlink("group.real", target),
                         lambda: target.write_text("video:x:44:\n")):
                try:
                    make()
                    os.unlink(target)
                except OSError:
                    pass

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        deadline = time.monotonic() + 2.0
        tries = 0
        while time.monotonic() < deadline:
            resolve_in_root(str(root), "/etc/group")
            tries += 1
    finally:
        stop.set()
        flipper.join()
    assert tries > 1000


# --------------------------------------------------------------- the sensor

@pytest.fixture(scope="module")
def tiny_ring_sensor():
    """A second live sensor whose ring buffer is a single page (a few events)."""
    harness = SensorHarness(BpfConfig(ringbuf_pages=1, transport="ringbuf",
                                      aggregate_interval_s=0.2, sweep_interval_s=0.2)).start()
    yield harness
    harness.close()


def reported_total(harness: SensorHarness, pid: int) -> int:
    """Sum over aggregation keys of the highest count reported for each."""
    best: dict[str, int] = defaultdict(int)
    for event in harness.for_pid(pid):
        best[event.key] = max(best[event.key], event.count)
    return sum(best.values())


def test_full_ring_buffer_drops_are_counted_and_totals_stay_exact(tiny_ring_sensor) -> None:
    before = tiny_ring_sensor.sensor.stats()
    with denied_dir() as base:
        result = storm(base, 3000)
    assert result.failures == {"EACCES": 3000}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and reported_total(tiny_ring_sensor, result.pid) < 3000:
        time.sleep(0.2)
    stats = tiny_ring_sensor.sensor.stats()
    dropped = stats["dropped_buffer_full"] - before["dropped_buffer_full"]
    assert dropped > 0, "the burst never filled the buffer: the test proves nothing"
    assert stats["first_event_lost"] > before.get("first_event_lost", 0)
    assert reported_total(tiny_ring_sensor, result.pid) == 3000
    lost = [e for e in tiny_ring_sensor.for_pid(result.pid)
            if e.facts.get("sensor.first_event_lost")]
    assert lost and all(e.count >= 1 for e in lost)


@pytest.fixture(scope="module")
def small_table_sensor():
    """A live sensor whose kernel aggregation table holds 64 keys."""
    harness = SensorHarness(BpfConfig(aggregate_max=64, aggregate_interval_s=0.2,
                                      sweep_interval_s=0.2)).start()
    yield harness
    harness.close()


def test_full_aggregation_table_keeps_totals_exact(small_table_sensor) -> None:
    with denied_dir() as base:
        result = storm(base, 600, names=200)  # 200 keys, 3 denials each
    assert result.failures == {"EACCES": 600}
    stats = small_table_sensor.sensor.stats()
    assert stats["aggregation_table_full"] > 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and reported_total(small_table_sensor, result.pid) < 600:
        time.sleep(0.2)
    assert reported_total(small_table_sensor, result.pid) == 600


def test_sensor_forgets_keys_of_exited_processes(small_table_sensor) -> None:
    book = small_table_sensor.sensor._book

    def keys_of(pid: int) -> list:
        return [k for k in list(book) if k.tgid == pid]
    with denied_dir() as base:
        with held_storm(base, 300, names=300) as result:
            assert result.failures == {"EACCES": 300}
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not keys_of(result.pid):
                time.sleep(0.1)
            time.sleep(1.0)  # several sweeps while the process lives: its keys stay
            assert keys_of(result.pid), "the sensor never kept this process's keys"
    time.sleep(1.5)  # several sweeps after the process exited (killed and reaped)
    assert keys_of(result.pid) == []


def long_path_event(sensor: SensorHarness, base: str) -> Event:
    name = "/".join(["p" * 200] * 40)
    path = (base + "/" + name)[:4095]  # PATH_MAX counts the NUL
    assert len(path.encode()) == 4095
    assert storm_one(path) == errno.EACCES
    events = sensor.wait_for(lambda e: e.node.path is not None
                             and e.node.path.startswith(base.encode() + b"/ppp"))
    event = events[0]
    assert path.encode().startswith(event.node.path)
    return event


def test_path_max_path_is_captured_without_crash(bpf_sensor) -> None:
    with denied_dir() as base:
        event = long_path_event(bpf_sensor, base)
    assert 200 < len(event.node.path) <= 255
    assert_terminal_safe(denial_line(event))
    assert Event.from_json(event.to_json()).node.path == event.node.path


def test_path_max_path_is_flagged_truncated(bpf_sensor) -> None:
    with denied_dir() as base:
        event = long_path_event(bpf_sensor, base)
    assert event.node.path_truncated is True


def storm_one(path: str, uid: int = 65534) -> int:
    def drop() -> None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    code = "import os,sys\ntry: os.open(sys.argv[1], os.O_RDONLY)\nexcept OSError as e: print(e.errno)"
    proc = subprocess.run(["/usr/bin/python3", "-c", code, path], capture_output=True, text=True,
                          preexec_fn=drop, timeout=30, check=True)
    return int(proc.stdout)
