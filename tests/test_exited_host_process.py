"""A process that exited before enrichment, with no container snapshot: its
uid names a host account only when it ran on the host (the host's mount
namespace, initial user namespace, no container); what the sensor could not
capture makes the verdict unknown, never a cause only that fact could rule out.
Fixture host trees: the subject is our own logic."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from tracer.enrichment.container_store import ContainerSnapshot, SnapshotStore
from tracer.enrichment.enricher import Enricher
from tracer.enrichment.node import NodeStat
from tracer.event import Event, Node, Process, UserNs
from tracer.host import HostPaths
from tracer.sensors.audit_events import AUDIT_MISSING
from tracer.verdict.explain import explain_facts

HOST_MNTNS = 4026531840
INIT_USERNS = 4026531837
NODE = "/dev/nvidia0"


@pytest.fixture
def host(tmp_path) -> HostPaths:
    for sub in ("proc/1/ns", "sys", "dev", "etc", "run"):
        (tmp_path / sub).mkdir(parents=True)
    os.symlink(f"mnt:[{HOST_MNTNS}]", tmp_path / "proc/1/ns/mnt")
    (tmp_path / "etc/passwd").write_text("root:x:0:0::/:/bin/sh\n"
                                         "stranger:x:1000:1000::/home/s:/bin/sh\n")
    (tmp_path / "etc/group").write_text("root:x:0:\nvideo:x:44:\nstranger:x:1000:\n")
    return HostPaths.under(str(tmp_path))


def node_0660_video(root: str, path: str) -> NodeStat:
    return NodeStat(mode=stat.S_IFCHR | 0o660, uid=0, gid=44, major=195, minor=0)


def gone(uid: int = 1000, mntns: int = HOST_MNTNS, missing: tuple[str, ...] = (),
         sensor: str = "bpf", pid: int = 4242) -> Event:
    proc = Process(pid=pid, tid=pid, comm=b"nvidia-smi", uid=uid, gid=uid, euid=uid,
                   egid=uid, fsuid=uid, fsgid=uid, groups=[uid], ngroups=1, cap_effective=0,
                   userns=UserNs(INIT_USERNS, 0, 0), mntns=mntns)
    return Event(time=1700000000.0, sensor=sensor, syscall="openat", errno=errno.EACCES,
                 process=proc, node=Node(path=NODE.encode()), open_flags=os.O_RDWR,
                 missing=list(missing))


def explain(host: HostPaths, event: Event, store: "SnapshotStore | None" = None):
    facts = Enricher(host, stat_node=node_0660_video, snapshots=store).enrich(event)
    return facts, explain_facts(event, facts)


def test_host_process_in_the_host_mount_namespace_is_named(host):
    facts, verdict = explain(host, gone())
    assert facts.get("process.live") is False and facts.get("process.host_process") is True
    assert facts.get("host.user_name") == "stranger"  # here it really is that account
    assert verdict.reason == "not_in_group"
    assert any(f.command == "usermod -aG video stranger" for f in verdict.fixes)
    assert {f.applies_to for f in verdict.fixes} <= {"host", "any"}


def test_gone_in_another_mount_namespace_without_snapshot_names_nobody(host):
    """A rootful container the tracker never saw: same uid 1000, but not the host's."""
    facts, verdict = explain(host, gone(mntns=4026532999))
    assert facts.get("process.host_process") is None
    assert facts.get("host.user_name") is None
    assert not any("usermod" in f.command for f in verdict.fixes)
    assert "stranger" not in str(verdict.to_json())


def test_rootful_container_from_snapshot_names_nobody_and_offers_its_engine(host):
    store = SnapshotStore()
    snap = ContainerSnapshot(id="c" * 64, runtime="runc", created=1699999999.0, mntns=4026532999)
    snap.put("container.engine", "docker", "fixture")
    snap.put("container.name", "trainer", "fixture")
    store.add(snap)
    facts, verdict = explain(host, gone(mntns=4026532999), store)
    assert facts.get("container.name") == "trainer"
    assert facts.get("process.host_process") is False and facts.get("host.user_name") is None
    assert verdict.reason == "not_in_group"
    assert verdict.fixes[0].command == "docker run --group-add 44 ..."
    assert {f.applies_to for f in verdict.fixes} <= {"docker", "host", "any"}
    assert "stranger" not in str(verdict.to_json())


def test_audit_event_of_a_gone_process_is_unknown_with_what_is_missing(host):
    """Audit cannot capture supplementary groups or namespaces; the process is gone,
    so whether it held gid 44 is unknown: no not_in_group, no user named."""
    facts, verdict = explain(host, gone(missing=tuple(AUDIT_MISSING), sensor="audit"))
    assert "process.groups" not in facts and "userns.level" not in facts
    assert verdict.reason == "unknown" and verdict.confidence == "low", verdict.to_json()
    assert any("process.groups" in n for n in verdict.notes)
    assert facts.get("host.user_name") is None


def test_audit_event_found_by_the_container_init_pid(host):
    """Audit has no namespace ids: the container is found by its init pid within its
    lifetime, and the rootless userns facts it snapshotted prove the dropped group."""
    store = SnapshotStore()
    snap = ContainerSnapshot(id="d" * 64, runtime="runc", created=1699999999.0, pid=4242)
    for name, value in (("container.engine", "podman"), ("container.runtime", "runc"),
                        ("container.name", "train"), ("userns.level", 1),
                        ("userns.owner_uid", 1000), ("userns.gid_map", [[0, 1000, 1], [1, 100000, 65536]]),
                        ("userns.uid_map", [[0, 1000, 1], [1, 100000, 65536]])):
        snap.put(name, value, "fixture")
    store.add(snap)
    (host_etc := os.path.join(host.etc, "group"))
    with open(host_etc, "w", encoding="ascii") as f:
        f.write("root:x:0:\nvideo:x:44:stranger\nstranger:x:1000:\n")
    facts, verdict = explain(host, gone(missing=tuple(AUDIT_MISSING), sensor="audit"), store)
    assert facts.get("container.snapshot_key").startswith("pid 4242")
    assert verdict.reason == "group_dropped_in_userns", verdict.to_json()
    assert facts.get("host.user_name") == "stranger"  # the userns owner: not a stranger
