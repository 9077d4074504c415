"""Container-start records and the command lines they carry (our own logic, on
constructed records and command lines recorded on this machine): what runc's,
crun's, conmon's and a containerd shim's command lines say; how a start is
filed and found again, and when it must not be."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracer.enrichment.kernel_starts import StartBook, add_start_facts
from tracer.event import Process, UserNs
from tracer.facts import Facts
from tracer.sensors.bpf_constants import EV_START, F_START_ARGV_CUT, START_EXEC, START_MKDIR
from tracer.sensors.bpf_event import DecodeError
from tracer.sensors.container_starts import (START, START_EVENT_SIZE, ContainerStart, decode_start,
                                             monitor_command, runtime_command)

CID = "443d8364ddf58b7cf3efeb1d11b3fa4e128e1f1b8f2846d02a77cd48389f4179"


def argv(line: str) -> tuple[bytes, ...]:
    return tuple(w.encode() for w in line.split())


# recorded on this machine (ps while the containers started)
DOCKER_RUNC = (f"runc --root /tmp/gttest-docker-1/exec/runtime-runc/moby --log "
               f"/run/containerd/io.containerd.runtime.v2.task/moby/{CID}/log.json --log-format "
               f"json create --bundle /run/containerd/io.containerd.runtime.v2.task/moby/{CID} "
               f"--pid-file /run/containerd/io.containerd.runtime.v2.task/moby/{CID}/init.pid {CID}")
PODMAN_RUNC = (f"/usr/bin/runc --log-format=json --log /tmp/podman-run-1001/containers/"
               f"vfs-containers/{CID}/userdata/oci-log create --bundle /home/u/.local/share/"
               f"containers/storage/vfs-containers/{CID}/userdata --pid-file /tmp/podman-run-1001/"
               f"containers/vfs-containers/{CID}/userdata/pidfile {CID}")
CONMON = (f"/usr/bin/conmon --api-version 1 -c {CID} -u {CID} -r /usr/bin/crun -b /home/u/x "
          f"-p /tmp/podman-run-1002/x/pidfile -n fervent_spence --exit-dir "
          f"/tmp/podman-run-1002/libpod/tmp/exits --full-attach -l k8s-file:/x/ctr.log "
          f"--exit-command /usr/bin/podman --runtime-arg --root=/srv/crun-state")
SHIM = f"/usr/bin/containerd-shim-runc-v2 -namespace k8s.io -id {CID} -address /run/x.sock"


@pytest.mark.parametrize("line,expected", [
    ("runc run --bundle /b gtbench-r0g00001", ("runc", "run", "gtbench-r0g00001", None, "/b")),
    (DOCKER_RUNC, ("runc", "create", CID, "/tmp/gttest-docker-1/exec/runtime-runc/moby",
                   f"/run/containerd/io.containerd.runtime.v2.task/moby/{CID}")),
    (PODMAN_RUNC, ("runc", "create", CID, None,
                   f"/home/u/.local/share/containers/storage/vfs-containers/{CID}/userdata")),
    ("crun --root=/run/crun create -b /b c1", ("crun", "create", "c1", "/run/crun", "/b")),
])
def test_runtime_command_lines(line, expected):
    cmd = runtime_command(argv(line))
    assert cmd is not None
    assert (cmd.runtime, cmd.command, cmd.container_id, cmd.root, cmd.bundle) == expected


@pytest.mark.parametrize("line", [f"runc start {CID}", f"runc delete --force {CID}",
                                  "runc init", "podman run x", "", "runc --root"])
def test_other_command_lines_are_not_container_starts(line):
    assert runtime_command(argv(line)) is None


def test_a_cut_command_line_names_no_container():
    cmd = runtime_command(argv(DOCKER_RUNC)[:-1] + (CID[:20].encode(),), cut=True)
    assert cmd is not None and cmd.container_id is None
    assert cmd.root == "/tmp/gttest-docker-1/exec/runtime-runc/moby"


def test_monitor_command_lines():
    conmon = monitor_command(argv(CONMON))
    assert conmon is not None
    assert (conmon.engine, conmon.container_id, conmon.runtime, conmon.name) == \
        ("podman", CID, "crun", "fervent_spence")
    assert conmon.runtime_args == ("--root=/srv/crun-state",)
    shim = monitor_command(argv(SHIM))
    assert shim is not None and (shim.engine, shim.namespace, shim.container_id) == \
        ("kubernetes", "k8s.io", CID)
    assert monitor_command(argv("/usr/sbin/runc run x")) is None


def raw_start(how: int = START_MKDIR, cgroup_id: int = 501, pid: int = 40, pidns: int = 0,
              line: str = "runc run --bundle /b gttest-c1", flags: int = 0,
              ts_ns: int = 3_000_000_000) -> bytes:
    args = line.replace(" ", "\0").encode() + b"\0"
    return START.pack(EV_START, how, ts_ns, cgroup_id, pid, 1, 0, 4026531837, 0, 0, 4026531840,
                      pidns, 1, flags, len(args), 0, b"runc", b"", b"", b"/gttest-x", args)


def test_decode_start_records():
    start = decode_start(raw_start(), clock_offset=100.0)
    assert (start.how, start.cgroup_id, start.pid, start.time) == ("mkdir", 501, 40, 103.0)
    assert start.argv == (b"runc", b"run", b"--bundle", b"/b", b"gttest-c1")
    assert start.path == b"/gttest-x" and start.cgroup_hierarchy is None
    cut = decode_start(raw_start(flags=F_START_ARGV_CUT), 0)
    assert cut.argv_cut and runtime_command(cut.argv, cut.argv_cut).container_id is None
    with pytest.raises(DecodeError):
        decode_start(raw_start()[:100], 0)
    with pytest.raises(DecodeError):
        decode_start(struct.pack("<II", EV_START, 9) + bytes(START_EVENT_SIZE), 0)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=START_EVENT_SIZE + 8))
def test_hostile_start_records_decode_or_are_refused(data):
    try:
        start = decode_start(data, 0.0)
    except DecodeError:
        return
    runtime_command(start.argv, start.argv_cut)
    monitor_command(start.argv)


def exec_start(pidns: int, cgroup_id: int, when_ns: int = 3_100_000_000) -> ContainerStart:
    return decode_start(raw_start(START_EXEC, cgroup_id, pid=41, pidns=pidns, line="",
                                  ts_ns=when_ns), 0)


def test_book_joins_a_start_by_cgroup_and_finds_it_by_cgroup_or_pid_namespace():
    book = StartBook()
    book.add(decode_start(raw_start(), 0))
    book.add(exec_start(pidns=4026532500, cgroup_id=501))
    facts = Facts()
    proc = Process(pid=41, tid=41, cgroup_id=501, pidns=4026532500, userns=UserNs(1, 0, 0))
    add_start_facts(book, proc, 3.5, facts)
    assert (facts.get("container.id"), facts.get("container.name")) == ("gttest-c1", "gttest-c1")
    assert facts.fact("container.id").source == "kernel"
    # same pid namespace, other cgroup (a pod's container sharing its sandbox's): not it
    other = Facts()
    add_start_facts(book, Process(pid=50, tid=50, cgroup_id=777, pidns=4026532500), 3.5, other)
    assert other.get("container.id") is None
    # before the start: not it
    early = Facts()
    add_start_facts(book, proc, 2.0, early)
    assert early.get("container.id") is None


def test_book_is_bounded_and_counts_what_it_forgets():
    book = StartBook(capacity=10)
    for i in range(25):
        book.add(decode_start(raw_start(cgroup_id=1000 + i, line=f"runc run c{i}"), 0))
    assert len(book) == 10 and book.stats()["starts_forgotten"] == 15
    found = Facts()
    add_start_facts(book, Process(pid=1, tid=1, cgroup_id=1024), 10.0, found)
    assert found.get("container.id") == "c24"
    gone = Facts()
    add_start_facts(book, Process(pid=1, tid=1, cgroup_id=1000), 10.0, gone)
    assert gone.get("container.id") is None


class _Tracker:
    """What StartFollower asks of the tracker, recorded: no thread, no inotify."""

    def __init__(self) -> None:
        from tracer.enrichment.container_store import SnapshotStore
        self.store = SnapshotStore()
        self.work: list = []
        self.roots: list[tuple[str, str]] = []

    def submit(self, work) -> None:
        self.work.append(work)

    def add_root(self, directory: str, runtime: str, why: str) -> None:
        self.roots.append((directory, runtime))

    def take(self, state_root: str, cid: str, runtime: str) -> None:
        pass


def test_follower_wakes_the_tracker_only_for_what_is_new(tmp_path):
    """A cgroup maker whose named root (--root, in a mount namespace of the host's)
    is watched already, and an exec of a container the tracker has read, are filed
    in the book but give the tracker's thread no work: follow() would do nothing."""
    import os
    from tracer.enrichment.container_store import ContainerSnapshot
    from tracer.enrichment.start_follower import StartFollower
    from tracer.host import HostPaths

    own_mntns = os.stat("/proc/self/ns/mnt").st_ino
    state = str(tmp_path / "state")
    os.mkdir(state)

    def mkdir(cid: str, cgroup_id: int, mntns: int = own_mntns) -> ContainerStart:
        start = decode_start(raw_start(cgroup_id=cgroup_id, pid=os.getpid(),
                                       line=f"runc --root {state} run --bundle /b {cid}"), 0)
        return ContainerStart(**{**start.__dict__, "mntns": mntns})

    tracker = _Tracker()
    follower = StartFollower(HostPaths(), tracker)  # type: ignore[arg-type]
    follower.on_start(mkdir("c1", 601))
    assert len(tracker.work) == 1  # a root not watched yet
    tracker.work.pop()()
    assert tracker.roots == [(state, "runc")]
    follower.on_start(mkdir("c2", 602))
    assert tracker.work == []  # the same root: nothing to follow
    follower.on_start(mkdir("c3", 603, mntns=12345))
    assert len(tracker.work) == 1  # another mount namespace (not the host's): followed
    tracker.work.clear()
    # the exec of c2's init: read already -> no work; not read yet -> followed
    follower.on_start(exec_start(pidns=4026532600, cgroup_id=602))
    assert len(tracker.work) == 1
    tracker.work.clear()
    tracker.store.add(ContainerSnapshot(id="c1", runtime="runc", created=0.0))
    follower.on_start(exec_start(pidns=4026532601, cgroup_id=601))
    assert tracker.work == []
    stats = follower.stats()
    assert stats["start_follow_skipped"] == 2 and stats["starts_exec"] == 2
