"""Right about the process that already died (issue 10), on the real kernel with
real runtimes: every container here runs with --rm and its process exits the
moment the open fails, so by the time the event is explained the process, and
usually the container, are gone.  The container tracker (inotify on the
runtimes' state dirs) must have seen it start; nothing may be borrowed from
another process; fixes must be the ones that apply to that engine.

The host has an unrelated account with uid 1000 (on CI machines too, usually):
a container user with uid 1000 must never be called by that account's name."""

from __future__ import annotations

import errno
import grp
import json
import os
import pwd
import subprocess
import time
from typing import Iterator

import pytest

from tests.support import podman as podman_support
from tests.support.docker import PrivateDocker
from tests.support.probe import probe_binary
from tests.support.scenario_workspace import (ROOTFUL_GLOBAL_OPTIONS, ROOTFUL_RUN_OPTIONS,
                                              Scenario)
from tests.support.sensor_harness import SensorHarness
from tracer.enrichment.container_store import SnapshotStore
from tracer.enrichment.container_tracker import ContainerTracker
from tracer.enrichment.enricher import Enricher
from tracer.facts import Facts
from tracer.event import Event
from tracer.host import HostPaths
from tracer.sensors.audit_pipeline import AuditConfig
from tracer.sensors.audit_sensor import AuditSensor
from tracer.verdict.explain import explain_facts
from tracer.verdict.reasons import Verdict

pytestmark = [pytest.mark.kernel, pytest.mark.podman]
RESULTS = os.environ.get("GPUTRACE_EXITED_RESULTS", "/tmp/gttest-exited-results.jsonl")


@pytest.fixture(scope="module")
def docker() -> Iterator[PrivateDocker]:
    engine = PrivateDocker()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def store(docker: PrivateDocker) -> Iterator[SnapshotStore]:
    """One tracker, started before any container: it learns them as they start."""
    snapshots = SnapshotStore()
    tracker = ContainerTracker(HostPaths(), snapshots,
                               extra_roots=((docker.runc_root, "runc"),)).start()
    yield snapshots
    tracker.close()


@pytest.fixture(scope="module")
def audit_sensor() -> Iterator[SensorHarness]:
    harness = SensorHarness(sensor=AuditSensor(AuditConfig(
        extra_prefixes=("/dev/dri-gttest/", "/tmp/gttest-nodev-")))).start()
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def docker_image(docker: PrivateDocker) -> str:
    docker.start()
    rootfs = podman_support.build_rootfs(
        os.path.join(docker.base, "rootfs"), probe_binary(), podman_support.RootfsFiles(
            passwd=("root:x:0:0:root:/:/bin/sh",), group=("root:x:0:",)))
    return docker.import_rootfs(rootfs)


def denial_of(sensor: SensorHarness, node, started: float, opened: "str | None" = None,
              timeout: float = 15, err: "int | None" = None) -> Event:
    """The denial of this node since `started`: by its device number where the
    sensor captured it (ours alone), else by the path the process opened (and the
    errno, where given: the previous case's container opened the same path within
    the clock slack of `started`)."""
    def ours(e: Event) -> bool:
        if e.kind != "denial" or e.time < started - 0.05 or e.process.comm != b"gtprobe":
            return False
        if err is not None and e.errno != err:
            return False
        if e.node.major is not None:
            return (e.node.major, e.node.minor) == (node.major, node.minor)
        return e.node.path == (opened or node.path).encode()
    try:
        return sensor.wait_for(ours, timeout=timeout)[0]
    except AssertionError:
        seen = [(e.kind, e.time - started, e.process.comm, e.node.path, e.node.major,
                 e.node.minor) for e in sensor.matching(lambda e: e.time >= started - 5)]
        raise AssertionError(f"no denial of {node.path} ({node.major}:{node.minor}); "
                             f"seen since: {seen[-10:]}") from None


def explained(event: Event, store: SnapshotStore) -> tuple[Facts, Verdict]:
    facts = Enricher(HostPaths(), snapshots=store).enrich(event)
    verdict = explain_facts(event, facts)
    assert facts.get("process.live") is False, "the process should be gone already"
    return facts, verdict


def record(case: str, sensor: str, facts: Facts, verdict: Verdict) -> None:
    """One row of the closing note's table."""
    row = {"case": case, "sensor": sensor, "reason": verdict.reason,
           "confidence": verdict.confidence, "engine": facts.get("container.engine"),
           "container": facts.get("container.name"),
           "first_fix": verdict.fixes[0].command if verdict.fixes else None,
           "found_by": facts.get("container.snapshot_key")}
    with open(RESULTS, "a", encoding="utf-8") as out:
        out.write(json.dumps(row) + "\n")


def applies(verdict: Verdict) -> set[str]:
    return {f.applies_to for f in verdict.fixes}


def no_stranger(facts: Facts, verdict: Verdict) -> None:
    """Nobody on the host is named for a container process, and no usermod offered."""
    stranger = pwd.getpwuid(1000).pw_name if _uid_exists(1000) else None
    assert facts.get("host.user_name") is None
    assert not any("usermod" in f.command for f in verdict.fixes)
    if stranger:
        assert stranger not in json.dumps(verdict.to_json())


def _uid_exists(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def podman_to_exit(scenario: Scenario, engine: podman_support.Podman, rootfs: str,
                   options: list[str], inside: str) -> str:
    """`podman run --rm` whose process opens the node once and exits; returns the name."""
    name = f"gttest-{scenario.name}-{scenario.token}"
    extra: list[str] = []
    if engine.rootless:
        scenario.undo(f"podman rm {name}", engine.remove, name)
    else:
        scenario.created("cgroup", f"gttest-{scenario.token}")
        extra = [f"--cgroup-parent=/gttest-{scenario.token}"]
        scenario.created("rootful-container", name)
    done = subprocess.run(engine.argv("run", "--rm", "--name", name, "--network=none", *extra,
                                      *options, "--rootfs", rootfs, "/gtprobe", inside, "0",
                                      scenario.token),
                          env=engine.env(), cwd="/", capture_output=True, text=True, timeout=60)
    assert f"token={scenario.token}" in done.stdout, done.stderr[-600:]
    return name


def test_rootless_podman_runc_both_sensors(bpf_sensor, audit_sensor, store):
    with Scenario("exited-rootless") as scenario:
        os.makedirs("/run/user", 0o755, exist_ok=True)
        video = grp.getgrnam("video")
        node = scenario.nvidia_node(0o660, video.gr_gid)
        user = scenario.user("pod", groups=["video"], home=True)
        engine = podman_support.Podman(runtime="runc", user=user)
        engine.prepare_user_runtime_dir()
        rootfs = podman_support.video_rootfs(
            scenario.workdir, probe_binary(), (user.pw_uid, user.pw_gid), video.gr_gid)
        started = time.time()
        name = podman_to_exit(scenario, engine, rootfs,
                              ["--device", f"{node.path}:{node.path}", "--group-add",
                               "keep-groups"], node.path)
        for sensor, label in ((bpf_sensor, "bpf"), (audit_sensor, "audit")):
            event = denial_of(sensor, node, started)
            assert event.errno == errno.EACCES
            facts, verdict = explained(event, store)
            record("rootless podman runc", label, facts, verdict)
            assert verdict.reason == "group_dropped_in_userns", (label, verdict.to_json(), {
                n: facts.get(n) for n in ("userns.level", "userns.gid_map", "node.gid_mapped",
                                          "process.groups", "host.user_groups", "node.gid",
                                          "container.snapshot_key", "node.seen_from")})
            assert facts.get("container.engine") == "podman", label
            assert facts.get("container.name") == name, label
            assert facts.get("container.runtime") == "runc", label
            assert applies(verdict) <= {"podman-runc", "podman-crun", "host", "any"}, label
            assert "--group-add keep-groups" in verdict.fixes[0].command, label
            # the owner of the rootless userns is this user: naming it is right
            assert facts.get("host.user_name") == user.pw_name, label


def both_sensors(bpf_sensor, audit_sensor, node, started: float, opened: "str | None",
                 store: SnapshotStore, case: str, err: "int | None" = None
                 ) -> list[tuple[str, Facts, Verdict]]:
    """The one denial as each sensor saw it, explained after the process is gone."""
    out = []
    for sensor, label in ((bpf_sensor, "bpf"), (audit_sensor, "audit")):
        event = denial_of(sensor, node, started, opened, err=err)
        facts, verdict = explained(event, store)
        record(case, label, facts, verdict)
        out.append((label, facts, verdict))
    return out


def test_rootful_podman_gid_mismatch(bpf_sensor, audit_sensor, store):
    with Scenario("exited-gidmismatch") as scenario:
        group = scenario.group("render")
        node = scenario.render_node(0o660, group.gr_gid)
        container_gid = 109 if group.gr_gid != 109 else 110
        rootfs = podman_support.build_rootfs(
            os.path.join(scenario.workdir, "rootfs"), probe_binary(), podman_support.RootfsFiles(
                passwd=("root:x:0:0:root:/:/bin/sh", "gtuser:x:1000:1000::/:/bin/sh"),
                group=("root:x:0:", "gtuser:x:1000:", f"{group.gr_name}:x:{container_gid}:gtuser")))
        engine = podman_support.Podman(runtime="runc", global_options=ROOTFUL_GLOBAL_OPTIONS)
        started = time.time()
        name = podman_to_exit(scenario, engine, rootfs,
                              [*ROOTFUL_RUN_OPTIONS, "--device", f"{node.path}:/dev/dri/renderD128",
                               "--user", "1000:1000", "--group-add", group.gr_name],
                              "/dev/dri/renderD128")
        # explained while the node and its group still exist (the container is gone)
        seen = both_sensors(bpf_sensor, audit_sensor, node, started, "/dev/dri/renderD128",
                            store, "rootful podman gid mismatch")
    for label, facts, verdict in seen:
        assert verdict.reason == "gid_mismatch_in_container", (label, verdict.to_json(), {
            n: facts.get(n) for n in ("node.gid", "node.group_name", "container.etc_group",
                                      "node.seen_from", "process.groups", "userns.gid_map")})
        assert facts.get("container.engine") == "podman" and facts.get("container.name") == name
        assert verdict.fixes[0].command == f"podman run --group-add {group.gr_gid} ..."
        assert applies(verdict) <= {"podman-crun", "podman-runc", "host", "any"}
        no_stranger(facts, verdict)


def docker_case(sensors: tuple, store, docker, kind: str, node_gid: int, options: list[str],
                errno_text: str, label: str) -> tuple[str, list]:
    """A `docker run --rm` whose only process opens the node as /dev/nvidia0 and exits;
    both sensors' events of it, explained after the container is gone."""
    bpf_sensor, audit_sensor = sensors
    with Scenario(f"exited-docker-{kind}") as scenario:
        node = scenario.nvidia_node(0o660 if node_gid else 0o666, node_gid)
        name = f"gttest-docker-{kind}-{scenario.token}"
        started = time.time()
        done = docker.run_to_exit(name, [*options, f"{node.path}:/dev/nvidia0"],
                                  ["/gtprobe", "/dev/nvidia0", "0", scenario.token])
        assert errno_text in done.stdout, done.stdout + done.stderr
        err = int(errno_text.split("=")[1])
        return name, both_sensors(bpf_sensor, audit_sensor, node, started, "/dev/nvidia0",
                                  store, label, err=err)


def test_docker_user_with_device_is_not_in_group(bpf_sensor, audit_sensor, store, docker,
                                                 docker_image):
    video = grp.getgrnam("video")
    name, seen = docker_case((bpf_sensor, audit_sensor), store, docker, "u", video.gr_gid,
                             ["-u", "1000:1000", "--device"], "errno=13",
                             "docker -u 1000:1000 --device")
    for label, facts, verdict in seen:
        assert verdict.reason == "not_in_group", (label, verdict.to_json())
        assert facts.get("container.engine") == "docker" and facts.get("container.name") == name
        assert verdict.fixes[0].command == f"docker run --group-add {video.gr_gid} ..."
        assert applies(verdict) <= {"docker", "host", "any"}
        no_stranger(facts, verdict)


def test_docker_bind_mount_is_device_cgroup_with_high_confidence(bpf_sensor, audit_sensor, store,
                                                                 docker, docker_image):
    name, seen = docker_case((bpf_sensor, audit_sensor), store, docker, "v", 0, ["-v"],
                             "errno=1 ", "docker -v bind mount")
    for label, facts, verdict in seen:
        assert verdict.reason == "device_cgroup", (label, verdict.to_json())
        assert verdict.confidence == "high", verdict.to_json()  # rules from the snapshot
        assert facts.get("container.name") == name
        assert facts.get("device_cgroup.v1_rules"), "device rules were snapshotted at start"
        assert verdict.fixes[0].command == "docker run --device /dev/nvidia0 ..."
        assert applies(verdict) <= {"docker", "host", "any"}


def test_nodev_mount_short_lived_host_process(bpf_sensor, audit_sensor, store):
    with Scenario("nodev") as scenario:  # the sensor watches /tmp/gttest-nodev-*
        mountpoint = os.path.join(scenario.workdir, "nodev")
        scenario.mount("gttest-nodev", mountpoint, "tmpfs", "nodev,size=64k,mode=0755")
        node = scenario.nvidia_node(0o666, 0, directory=mountpoint)
        started = time.time()
        done = subprocess.run([probe_binary(), node.path, "0", scenario.token],
                              capture_output=True, text=True, timeout=30)
        assert "errno=13" in done.stdout
        seen = dict((label, (facts, verdict)) for label, facts, verdict in both_sensors(
            bpf_sensor, audit_sensor, node, started, None, store,
            "nodev mount, short-lived host process"))  # the mount is still there
    facts, verdict = seen["bpf"]
    assert verdict.reason == "nodev_mount", verdict.to_json()
    assert facts.get("container.engine") is None and facts.get("process.host_process") is True
    assert verdict.fixes[0].command.startswith("mount -o remount,dev ")
    assert applies(verdict) <= {"host", "any"}
    # audit has no mount namespace id: a host process is inferred from its live parent,
    # and so is the host's mount table (medium, labelled)
    facts, verdict = seen["audit"]
    assert verdict.reason == "nodev_mount" and verdict.confidence == "medium", verdict.to_json()
    assert facts.fact("node.mount_ns_inferred") is not None
    assert any("inferred" in n for n in verdict.notes)


def test_one_millisecond_process_in_a_fifty_millisecond_container(bpf_sensor, store):
    """runc alone, no engine: a container that lives a few tens of milliseconds,
    whose only process opens the node and exits, is still attributed to it."""
    with Scenario("exited-runc") as scenario:
        node = scenario.nvidia_node(0o666, 0)
        bundle = os.path.join(scenario.workdir, "bundle")
        rootfs = podman_support.build_rootfs(os.path.join(bundle, "rootfs"), probe_binary(),
                                             podman_support.RootfsFiles())
        subprocess.run(["runc", "spec", "--bundle", bundle], check=True)
        with open(os.path.join(bundle, "config.json"), encoding="utf-8") as f:
            spec = json.load(f)
        spec["process"].update(terminal=False, args=["/gtprobe", "/dev/nvidia0", "0",
                                                     scenario.token])
        spec["root"] = {"path": rootfs, "readonly": False}
        spec["mounts"].append({"destination": "/dev/nvidia0", "type": "bind",
                               "source": node.path, "options": ["bind"]})
        spec["linux"]["cgroupsPath"] = f"/gttest-{scenario.token}"
        scenario.created("cgroup", f"gttest-{scenario.token}")
        with open(os.path.join(bundle, "config.json"), "w", encoding="utf-8") as f:
            json.dump(spec, f)
        cid = f"gttest-runc-{scenario.token}"
        started = time.time()
        t0 = time.monotonic()
        done = subprocess.run(["runc", "run", "--bundle", bundle, cid], capture_output=True,
                              text=True, timeout=30)
        lifetime_ms = (time.monotonic() - t0) * 1000
        assert "errno=1 " in done.stdout, done.stdout + done.stderr
        event = denial_of(bpf_sensor, node, started, "/dev/nvidia0")
        facts, verdict = explained(event, store)  # the node and group still exist
    snap = store.get(cid)
    assert snap is not None and snap.died is not None
    container_ms = (snap.died - snap.created) * 1000  # runc's created .. its state removed
    with open(RESULTS, "a", encoding="utf-8") as out:
        out.write(json.dumps({"case": "runc run, whole container", "runc_run_ms":
                              round(lifetime_ms, 1), "container_ms": round(container_ms, 1),
                              "found_by": facts.get("container.snapshot_key"),
                              "reason": verdict.reason, "confidence": verdict.confidence,
                              "first_fix": verdict.fixes[0].command if verdict.fixes else None})
                  + "\n")
    assert lifetime_ms < 1000
    assert facts.get("container.id") == cid and facts.get("container.runtime") == "runc"
    assert verdict.reason == "device_cgroup" and verdict.confidence == "high", (
        verdict.to_json(), {n: facts.get(n) for n in (
            "device_cgroup.v1_rules", "device_cgroup.version", "node.major", "node.minor",
            "node.seen_from", "node.mode", "process.fsuid", "cgroup.paths")})
