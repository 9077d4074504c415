"""What a kernel-captured cgroup name says about the container (our own logic, on
constructed events): engine patterns, runc's /<id>, Kubernetes pod uids, the
snapshot it finds (only when the snapshot's own cgroup is that one), and the
container facts a gone process gets when no snapshot exists."""

from __future__ import annotations

import time

import pytest

from tracer.enrichment.cgroup_name import identity_from_cgroup
from tracer.enrichment.container_store import ContainerSnapshot, SnapshotStore
from tracer.enrichment.enricher import Enricher
from tracer.event import Event, Node, Process
from tracer.host import HostPaths

CID = "0f" * 32
POD = "5d8b2c1e-9f3a-4c61-8e2a-0b7d6f4a9c12"
GONE_PID = 4_000_000  # above pid_max's default: never a live process


def proc(leaf: "str | None", parent: str = "", pid: int = GONE_PID) -> Process:
    return Process(pid=pid, tid=pid, cgroup_leaf=None if leaf is None else leaf.encode(),
                   cgroup_parent=parent.encode(), cgroup_hierarchy="v2", mntns=4026532999)


@pytest.mark.parametrize("leaf,parent,expected", [
    (f"docker-{CID}.scope", "system.slice", {"engine": "docker", "id": CID}),
    (CID, "docker", {"engine": "docker", "id": CID}),
    (f"libpod-{CID}", "machine.slice", {"engine": "podman", "id": CID}),
    (f"libpod-conmon-{CID}", "machine.slice", {}),  # podman's monitor, not the container
    (f"crio-{CID}.scope", "kubepods-besteffort-pod" + POD.replace("-", "_") + ".slice",
     {"engine": "cri-o", "id": CID, "pod_uid": POD}),
    (f"cri-containerd-{CID}.scope", "kubepods-burstable-pod" + POD.replace("-", "_") + ".slice",
     {"engine": "containerd", "id": CID, "pod_uid": POD}),
    (CID, f"pod{POD}", {"engine": "kubernetes", "id": CID, "pod_uid": POD}),
    ("session-3.scope", "user-1000.slice", {}),
    ("gttest-runc-1", "", {}),  # runc's /<id>: no engine pattern, found only via a snapshot
])
def test_identity_from_cgroup_names(leaf, parent, expected):
    assert identity_from_cgroup(proc(leaf, parent)) == expected


def snap(cid: str, paths: "dict[str, str] | None", created: float) -> ContainerSnapshot:
    s = ContainerSnapshot(id=cid, runtime="runc", created=created, pid=GONE_PID - 1)
    if paths is not None:
        s.put("cgroup.paths", paths, "test")
    s.put("container.name", cid, "test")
    return s


def test_store_finds_by_cgroup_name_only_when_the_snapshot_cgroup_is_that_one():
    now = time.time()
    store = SnapshotStore()
    store.add(snap("gttest-runc-1", {"unified": "/gttest-runc-1", "devices": "/gttest-runc-1"},
                   now - 1))
    # a container whose name copies another's cgroup leaf: its own cgroup is elsewhere
    store.add(snap("session-3.scope", {"unified": "/user.slice/evil"}, now - 1))
    store.add(snap(CID, None, now - 1))  # init gone before its cgroup was read
    found = store.find(proc("gttest-runc-1"), now)
    assert found is not None and found[0].id == "gttest-runc-1"
    assert found[1] == "cgroup name /gttest-runc-1"
    assert store.find(proc("session-3.scope", "user-1000.slice"), now) is None
    found = store.find(proc(f"docker-{CID}.scope", "system.slice"), now)
    assert found is not None and found[0].id == CID  # an engine's pattern gave the id
    assert store.find(proc("gttest-runc-1"), now - 60) is None  # not alive then


def test_a_gone_process_gets_its_container_id_from_the_cgroup_name_alone():
    event = Event(time=time.time(), sensor="bpf", syscall="openat", errno=1,
                  process=proc(f"docker-{CID}.scope", "system.slice"),
                  node=Node(path=b"/dev/nvidia0"))
    facts = Enricher(HostPaths(), snapshots=SnapshotStore()).enrich(event)
    assert facts.get("process.live") is False
    assert (facts.get("container.id"), facts.get("container.engine")) == (CID, "docker")
    assert facts.fact("container.id").source == "kernel"
    assert "named by the kernel" in facts.fact("container.id").origin
    assert facts.get("process.cgroup_leaf") == f"docker-{CID}.scope"
    assert facts.get("process.host_process") is False


def test_a_reused_namespace_inode_does_not_find_another_containers_snapshot():
    """A container's end may not have reached the tracker when a new container gets
    the freed mount namespace inode: the kernel-named cgroup tells them apart."""
    now = time.time()
    store = SnapshotStore()
    old = snap("gttest-old", {"unified": "/gttest-old"}, now - 5)
    old.mntns = 4026532999
    store.add(old)
    assert store.find(proc("gttest-new"), now) is None  # same mntns, other cgroup
    found = store.find(proc("gttest-old"), now)
    assert found is not None and found[0].id == "gttest-old"
    child = proc("init.scope", "gttest-old")  # a process in a child of the container's cgroup
    found = store.find(child, now)
    assert found is not None and found[0].id == "gttest-old" and found[1].startswith("mntns")
