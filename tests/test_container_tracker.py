"""The container tracker and its snapshot store on fixture trees: runtime state
written the way runc writes it (state.json by rename), docker's config.v2.json,
Kubernetes CRI annotations and kubepods cgroup layouts, and a 500-container
storm against a bounded store.  Real inotify on a real directory tree."""

from __future__ import annotations

import json
import os
import time

import pytest

from tracer.enrichment.container_state import (kubernetes_from_annotations,
                                               kubernetes_from_cgroup, read_oci_config)
from tracer.enrichment.container_store import ContainerSnapshot, SnapshotStore
from tracer.enrichment.container_tracker import ContainerTracker
from tracer.event import Process, UserNs
from tracer.host import HostPaths

POD_UID = "5d8b2c1e-9f3a-4c61-8e2a-0b7d6f4a9c12"
CID = "a" * 63 + "1"

# recorded from kubelet with each cgroup driver and CRI runtime
KUBEPODS_LAYOUTS = [
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_UID.replace('-', '_')}"
     f".slice/cri-containerd-{CID}.scope", "burstable", "containerd"),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_UID.replace('-', '_')}"
     f".slice/crio-{CID}.scope", "besteffort", "cri-o"),
    (f"/kubepods.slice/kubepods-pod{POD_UID.replace('-', '_')}.slice/docker-{CID}.scope",
     "guaranteed", "docker"),
    (f"/kubepods/burstable/pod{POD_UID}/{CID}", "burstable", None),
    (f"/kubepods/pod{POD_UID}/{CID}", "guaranteed", None),
]


@pytest.mark.parametrize("path,qos,runtime", KUBEPODS_LAYOUTS)
def test_kubepods_cgroup_layouts(path, qos, runtime):
    found = kubernetes_from_cgroup(path)
    assert found["pod_uid"] == POD_UID and found["qos"] == qos
    assert found["container_id"] == CID
    assert found.get("cri_runtime") == runtime


def test_not_kubepods():
    assert kubernetes_from_cgroup(f"/libpod_parent/libpod-{CID}") == {}
    assert kubernetes_from_cgroup("/user.slice/user-1000.slice/session-2.scope") == {}


def write_json(path: str, data: object) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.rename(path + ".tmp", path)  # as runc writes state.json


def oci_config(cid: str, annotations: dict[str, str], hostname_source: str) -> dict:
    return {"process": {"user": {"uid": 1000, "gid": 1000, "additionalGids": [44]}},
            "root": {"path": "rootfs"}, "annotations": annotations,
            "mounts": [{"destination": "/etc/hostname", "type": "bind",
                        "source": hostname_source, "options": ["rbind", "nodev"]}],
            "linux": {"resources": {"devices": [{"allow": False, "access": "rwm"},
                                                {"allow": True, "type": "c", "major": 195,
                                                 "minor": 0, "access": "rw"}]},
                      "devices": [{"path": "/dev/nvidia0", "type": "c", "major": 195,
                                   "minor": 0, "fileMode": 438, "uid": 0, "gid": 44}],
                      "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}]}}


def create_container(root: str, cid: str, annotations: dict[str, str], name: str) -> None:
    """What docker + runc leave on disk for one container (no process: pid 0)."""
    bundle = f"/bundles/{cid}"
    data_dir = f"/var/lib/docker/containers/{cid}"
    write_json(os.path.join(root, data_dir.lstrip("/"), "config.v2.json"),
               {"Name": "/" + name, "Config": {"Image": "gttest/busybox:latest"}})
    write_json(os.path.join(root, bundle.lstrip("/"), "config.json"),
               oci_config(cid, annotations, data_dir + "/hostname"))
    write_json(os.path.join(root, "run/runc", cid, "state.json"),
               {"id": cid, "init_process_pid": 0, "config": {"labels": [f"bundle={bundle}"],
                                                            "rootfs": f"{bundle}/rootfs"}})


def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


@pytest.fixture
def tree(tmp_path):
    for sub in ("run", "proc", "sys", "dev", "etc"):
        (tmp_path / sub).mkdir()
    return str(tmp_path)


def test_tracker_snapshots_docker_name_and_cri_annotations(tree):
    store = SnapshotStore()
    tracker = ContainerTracker(HostPaths.under(tree), store).start()
    try:
        os.makedirs(os.path.join(tree, "run/runc"))  # the runtime root appears after start
        annotations = {"io.kubernetes.cri.sandbox-name": "trainer-0",
                       "io.kubernetes.cri.sandbox-namespace": "ml",
                       "io.kubernetes.cri.container-name": "cuda",
                       "run.oci.keep_original_groups": "1"}
        create_container(tree, CID, annotations, "trainer")
        wait_until(lambda: store.get(CID) is not None)
    finally:
        tracker.close()
    snap = store.get(CID)
    assert snap is not None
    facts = {name: f.value for name, f in snap.facts.items()}
    assert facts["container.engine"] == "docker" and facts["container.name"] == "trainer"
    assert facts["container.image"] == "gttest/busybox:latest"
    assert facts["container.pod"] == {"pod": "trainer-0", "namespace": "ml", "container": "cuda"}
    assert facts["container.keep_original_groups"] is True
    oci = facts["container.oci"]
    assert oci["user"] == {"uid": 1000, "gid": 1000, "additional_gids": [44]}
    assert oci["device_rules"][1]["major"] == 195 and oci["devices"][0]["gid"] == 44
    assert oci["mounts"][0]["options"] == ["rbind", "nodev"]
    assert facts["userns.uid_map"] == [[0, 100000, 65536]]


def test_cri_o_spelling_of_the_annotations():
    assert kubernetes_from_annotations({"io.kubernetes.pod.name": "p",
                                        "io.kubernetes.pod.namespace": "n",
                                        "io.kubernetes.container.name": "c"}) == \
        {"pod": "p", "namespace": "n", "container": "c"}


def test_hostile_config_is_harmless(tree):
    host = HostPaths.under(tree)
    path = os.path.join(tree, "b/config.json")
    os.makedirs(os.path.dirname(path))
    for text in ("[", "[]", '{"mounts": 5, "linux": [], "process": {"user": "x"}}',
                 '{"annotations": {"a": 1}, "linux": {"uidMappings": [{"containerID": "x"}]}}'):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        config = read_oci_config(host, "/b")
        assert config is None or isinstance(config["mounts"], list)


def test_five_hundred_containers_keep_the_store_bounded(tree):
    """500 containers created and destroyed in a storm: the store holds at most its
    capacity, everything it let go is counted, and its size stays under its bound."""
    store = SnapshotStore(capacity=100, max_bytes=4 << 20)
    os.makedirs(os.path.join(tree, "run/runc"))
    tracker = ContainerTracker(HostPaths.under(tree), store).start()
    ids = [f"{i:064x}" for i in range(500)]
    try:
        for i, cid in enumerate(ids):
            create_container(tree, cid, {}, f"storm-{i}")
            if i >= 5:  # each container dies a little after the next ones start
                old = os.path.join(tree, "run/runc", ids[i - 5])
                os.remove(os.path.join(old, "state.json"))
                os.rmdir(old)
        wait_until(lambda: store.stats().get("snapshots_taken", 0)
                   + store.stats().get("containers_missed", 0) >= 500)
    finally:
        tracker.close()
    stats = store.stats()
    # a container removed before the tracker could read it is counted, never silent
    assert stats["snapshots_taken"] + stats.get("containers_missed", 0) == 500
    assert stats["snapshots_taken"] >= 250  # most are seen even in a storm on a busy machine
    assert len(store) == stats["snapshots_held"] <= 100
    assert stats["snapshots_evicted"] + stats.get("snapshots_expired", 0) == \
        stats["snapshots_taken"] - len(store)
    assert store.approx_bytes() <= store.max_bytes
    assert store.get(ids[-1]) is not None  # the newest are kept
    assert store.get(ids[0]) is None


def snap(cid: str, **keys) -> ContainerSnapshot:
    s = ContainerSnapshot(id=cid, runtime="runc", created=1000.0, **keys)
    s.put("container.name", cid, "test")
    return s


def test_store_finds_by_kernel_keys_and_by_init_pid_only_in_lifetime():
    store = SnapshotStore()
    store.add(snap("a", cgroup_id=77, mntns=4026532001, pidns=4026532002, pid=500))
    store.mark_died("a", 1010.0)
    proc = Process(pid=9, tid=9, cgroup_id=77)
    found = store.find(proc, 1005.0)
    assert found is not None and found[0].id == "a" and found[1] == "cgroup_id 77"
    by_mnt = store.find(Process(pid=9, tid=9, mntns=4026532001), 1005.0)
    assert by_mnt is not None and by_mnt[1].startswith("mntns")
    # audit: no kernel keys, the container's init pid within its lifetime
    audit = ["process.cgroup_id", "process.mntns", "process.pidns", "process.userns"]
    assert store.find(Process(pid=500, tid=500), 1005.0, audit) is not None
    assert store.find(Process(pid=600, tid=600, ppid=500), 1005.0, audit) is not None
    assert store.find(Process(pid=500, tid=500), 2000.0, audit) is None  # pid reused later
    assert store.find(Process(pid=9, tid=9, cgroup_id=78), 1005.0) is None
    # the initial user namespace is nobody's key
    assert store.find(Process(pid=9, tid=9, userns=UserNs(4026531837, 0, 0)), 1005.0) is None


def test_dead_snapshots_expire_and_are_counted():
    store = SnapshotStore(retention_s=10)
    store.add(snap("a", cgroup_id=5))
    store.mark_died("a", 100.0)
    store.expire(now=105.0)
    assert store.get("a") is not None
    store.expire(now=111.0)
    assert store.get("a") is None and store.stats()["snapshots_expired"] == 1


def test_requested_device_rules_as_the_v1_allowlist():
    from tracer.enrichment.container_snapshot import oci_rules_as_devices_list
    rules = [{"allow": False, "type": None, "major": None, "minor": None, "access": "rwm"},
             {"allow": True, "type": "c", "major": 195, "minor": 0, "access": "rw"},
             {"allow": True, "type": "c", "major": 136, "minor": None, "access": "rwm"}]
    assert oci_rules_as_devices_list(rules) == ["c 195:0 rw", "c 136:* rwm"]
    # a deny after the allows, or no deny-all first: not the simple shape, stays unknown
    assert oci_rules_as_devices_list(rules + [dict(rules[1], allow=False)]) is None
    assert oci_rules_as_devices_list(rules[1:]) is None
