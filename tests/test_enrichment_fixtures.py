"""Enrichment on recorded host trees (tests/fixtures/hosts/*)."""

from __future__ import annotations

import errno
import json
import os
from typing import Optional

from tracer.enrichment.enricher import Enricher
from tracer.facts import CACHED, KERNEL, LIVE, Facts
from tracer.enrichment.node import FixtureNodeStats
from tracer.event import Event, Node, Process, UserNs
from tracer.host import HostPaths

HOSTS = os.path.join(os.path.dirname(__file__), "fixtures", "hosts")
INIT_USERNS = 4026531837
GENTOO_USERNS, GENTOO_MNTNS = 4026532500, 4026532501


def fixture_enricher(tree: str, stats: str = "node-stats.json", cache_size: int = 16) -> Enricher:
    root = os.path.join(HOSTS, tree)
    return Enricher(HostPaths.under(root), stat_node=FixtureNodeStats(os.path.join(root, stats)),
                    cache_size=cache_size)


def denial(pid: int, path: Optional[str], err: int = errno.EACCES, *, uid: int = 0,
           gid: int = 0, groups: tuple[int, ...] = (), caps: int = 0, userns: int = INIT_USERNS,
           level: int = 0, owner: int = 0, mntns: int = 0, cgroup_id: int = 0,
           flags: Optional[int] = os.O_RDWR, major: Optional[int] = None,
           minor: Optional[int] = None) -> Event:
    """A denial as the BPF sensor reports it (kernel ids)."""
    proc = Process(pid=pid, tid=pid, comm=b"gpuapp", uid=uid, gid=gid, euid=uid, egid=gid,
                   fsuid=uid, fsgid=gid, groups=list(groups), ngroups=len(groups),
                   cap_effective=caps, userns=UserNs(userns, level, owner), mntns=mntns,
                   cgroup_id=cgroup_id)
    return Event(time=1700000000.0, sensor="bpf", syscall="openat", errno=err, process=proc,
                 node=Node(path=path.encode() if path else None, major=major, minor=minor),
                 open_flags=flags)


def gentoo_denial(pid: int = 4242, path: str = "/dev/nvidia0", **kw: object) -> Event:
    args = dict(uid=1000, gid=1000, groups=(1000,), caps=0x800405FB, userns=GENTOO_USERNS,
                level=1, owner=1000, mntns=GENTOO_MNTNS, cgroup_id=9001)
    args.update(kw)
    return denial(pid, path, **args)  # type: ignore[arg-type]


def test_gentoo_process_facts_and_sources() -> None:
    event = gentoo_denial()
    facts = fixture_enricher("gentoo-rootless-podman").enrich(event)
    assert facts.get("process.live") is True
    assert facts.get("userns.gid_map") == [[0, 1000, 1], [1, 100000, 65536]]
    assert facts.get("userns.setgroups") == "deny"
    assert facts.get("process.no_new_privs") is False
    assert facts.get("process.cap_effective_live") == "00000000800405fb"
    assert facts.fact("process.groups").source == KERNEL
    assert facts.fact("userns.uid_map").source == LIVE
    assert facts.fact("userns.uid_map").origin.endswith("proc/4242/uid_map")
    assert facts.get("host.user_name") == "alice"
    assert facts.get("host.user_groups") == [10, 27, 1000]
    assert facts.get("nvidia.params")["DeviceFileMode"] == 432  # decimal 0660
    assert facts.get("nvidia.params")["DeviceFileGID"] == 27
    assert facts.get("node.mode") == "0660" and facts.get("node.gid") == 27
    assert facts.get("node.group_name") == "video"
    assert facts.get("node.gid_in_container") == 65534 and facts.get("node.gid_mapped") is False
    assert facts.get("node.class") == "nvidia-gpu"
    assert facts.get("node.mount_nodev") is False
    assert event.facts.get("node.mode") == "0660"  # stored on the event


def test_gentoo_container_detection() -> None:
    facts = fixture_enricher("gentoo-rootless-podman").enrich(gentoo_denial())
    assert facts.get("container.engine") == "podman"
    assert facts.get("container.runtime") == "runc"
    assert facts.fact("container.runtime").origin.startswith("ancestor conmon")
    assert facts.get("container.id").startswith("3f1c9e0a")
    assert facts.get("container.name") == "cuda-test"
    assert facts.get("container.rootless") is True


def test_exited_process_gets_cached_container_facts() -> None:
    enricher = fixture_enricher("gentoo-rootless-podman")
    assert enricher.prime(gentoo_denial().process) is True
    assert enricher.prime(gentoo_denial().process) is False  # already cached
    gone = gentoo_denial(pid=4299)  # same userns and cgroup, no /proc entry
    facts = enricher.enrich(gone)
    assert facts.get("process.live") is False
    assert facts.get("userns.gid_map") == [[0, 1000, 1], [1, 100000, 65536]]
    assert facts.fact("userns.gid_map").source == CACHED
    assert facts.get("container.runtime") == "runc"
    assert facts.get("node.seen_from") == "host"
    assert facts.get("node.gid") == 27


def test_reused_pid_is_not_mistaken_for_the_process() -> None:
    other_ns = gentoo_denial(userns=GENTOO_USERNS + 7)
    facts = fixture_enricher("gentoo-rootless-podman").enrich(other_ns)
    assert facts.get("process.live") is False
    assert "userns.uid_map" not in facts


def test_cache_is_bounded() -> None:
    enricher = fixture_enricher("gentoo-rootless-podman", cache_size=1)
    enricher.prime(gentoo_denial(pid=4242, cgroup_id=1).process)
    enricher.prime(gentoo_denial(pid=4250, cgroup_id=2, userns=GENTOO_USERNS).process)
    assert len(enricher.by_cgroup) == 1 and 2 in enricher.by_cgroup and 1 not in enricher.by_cgroup


def test_jetson_acl_sessions_and_docker_detection() -> None:
    enricher = fixture_enricher("jetson-jp61")
    facts = enricher.enrich(denial(500, "/dev/dri/renderD128", uid=1001, gid=1001,
                                   groups=(1001,), mntns=4026531841))
    assert facts.get("node.class") == "drm-render"
    assert facts.get("node.group_name") == "render" and facts.get("node.gid") == 109
    assert {"tag": "user", "perm": "rw-", "id": 1000} in facts.get("node.acl")
    sessions = {s["user"]: s for s in facts.get("logind.sessions")}
    assert sessions["nvidia"]["seat"] == "seat0" and sessions["nvidia"]["remote"] is False
    assert sessions["bob"]["remote"] is True
    assert facts.skips.counts["logind_session:bad_line"] == 1  # the broken session file
    assert facts.get("node.mount")["mount_point"] == "/dev"
    container = enricher.enrich(denial(600, "/dev/dri/renderD128", uid=1000, gid=1000,
                                       groups=(995,), mntns=4026532610))
    assert container.get("container.engine") == "docker"
    assert container.get("container.runtime") == "runc"
    assert container.get("container.etc_group")["render"] == 995


def test_device_cgroup_v1_list_is_read_from_the_devices_hierarchy() -> None:
    facts = fixture_enricher("cgroup-v1-host").enrich(
        denial(700, "/dev/nvidia0", errno.EPERM, caps=0xA80425FB, mntns=4026532700,
               cgroup_id=55))
    assert facts.get("device_cgroup.version") == 1
    assert "c 136:* rwm" in facts.get("device_cgroup.v1_rules")
    assert facts.fact("device_cgroup.v1_rules").origin.endswith("/devices.list")
    assert facts.get("container.engine") == "docker"
    assert facts.get("process.lsm_label") == "docker-default (enforce)"


def test_facts_round_trip_through_json() -> None:
    event = gentoo_denial()
    facts = fixture_enricher("gentoo-rootless-podman").enrich(event)
    again = Facts.from_json(json.loads(json.dumps(event.facts.to_json())))
    assert again.to_json() == facts.to_json()
    assert Event.from_json(event.to_json()).facts == event.facts
