"""Keys that belong to the container alone (real docker and rootful podman, real
kernel): a `--pid=host` container's pid namespace is every host process's, so it
must not key its snapshot.  While such a container (and a `--privileged` one)
runs, a short-lived host process of a host user is refused a node and exits; its
verdict must not carry the container's name or engine, must keep the `usermod`
fix for that user, and must not be judged by the container's device rules."""

from __future__ import annotations

import errno
import grp
import json
import os
import subprocess
import time
from typing import Iterator

import pytest

from tests.support import podman as podman_support
from tests.support.docker import PrivateDocker
from tests.support.probe import probe_binary
from tests.support.scenario_workspace import (ROOTFUL_GLOBAL_OPTIONS, ROOTFUL_RUN_OPTIONS,
                                              Scenario)
from tests.test_exited_containers import audit_sensor, denial_of  # noqa: F401 (fixture)
from tracer.enrichment.container_store import SnapshotStore
from tracer.enrichment.container_tracker import ContainerTracker
from tracer.enrichment.enricher import Enricher
from tracer.host import HostPaths
from tracer.verdict.explain import explain_facts

pytestmark = [pytest.mark.kernel, pytest.mark.podman]
RESULTS = os.environ.get("GPUTRACE_HOSTNS_RESULTS", "/tmp/gttest-hostns-results.jsonl")


@pytest.fixture(scope="module")
def docker() -> Iterator[PrivateDocker]:
    engine = PrivateDocker()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def tracked(docker: PrivateDocker) -> Iterator[tuple[SnapshotStore, ContainerTracker]]:
    docker.start()
    store = SnapshotStore()
    tracker = ContainerTracker(HostPaths(), store,
                               extra_roots=((docker.runc_root, "runc"),)).start()
    yield store, tracker
    tracker.close()


@pytest.fixture(scope="module")
def image(docker: PrivateDocker, tracked) -> str:
    rootfs = podman_support.build_rootfs(
        os.path.join(docker.base, "rootfs"), probe_binary(), podman_support.RootfsFiles(
            passwd=("root:x:0:0:root:/:/bin/sh",), group=("root:x:0:",)))
    return docker.import_rootfs(rootfs)


def wait_for_snapshot(store: SnapshotStore, name: str, timeout: float = 20) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for snap in list(store._items.values()):
            fact = snap.facts.get("container.name")
            if fact is not None and fact.value == name:
                return snap
        time.sleep(0.05)
    raise AssertionError(f"no snapshot of {name}: {store.stats()}")


def host_user_denied(scenario: Scenario, bpf_sensor, audit_sensor, store: SnapshotStore,
                     case: str) -> list[tuple[str, object, object]]:
    """A host user not in the node's group opens it once and exits: each sensor's
    event, explained after the process is gone."""
    video = grp.getgrnam("video")
    node = scenario.nvidia_node(0o660, video.gr_gid)
    user = scenario.user("hostns")
    started = time.time()
    done = subprocess.run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                           "--init-groups", probe_binary(), node.path, "0", scenario.token],
                          capture_output=True, text=True, timeout=30)
    assert "errno=13" in done.stdout, done.stdout + done.stderr
    out = []
    for sensor, label in ((bpf_sensor, "bpf"), (audit_sensor, "audit")):
        event = denial_of(sensor, node, started)
        assert event.process.uid == user.pw_uid
        facts = Enricher(HostPaths(), snapshots=store).enrich(event)
        verdict = explain_facts(event, facts)
        assert facts.get("process.live") is False
        with open(RESULTS, "a", encoding="utf-8") as results:
            results.write(json.dumps({
                "case": case, "sensor": label, "reason": verdict.reason,
                "engine": facts.get("container.engine"), "name": facts.get("container.name"),
                "found_by": facts.get("container.snapshot_key"),
                "first_fix": verdict.fixes[0].command if verdict.fixes else None}) + "\n")
        out.append((label, facts, verdict, user))
    return out


def assert_host_process(seen: list, container: str) -> None:
    for label, facts, verdict, user in seen:
        where = (label, {n: facts.get(n) for n in ("container.snapshot_key", "container.name",
                                                    "container.engine", "process.host_process")})
        assert facts.get("container.snapshot_key") is None, where
        assert facts.get("container.name") is None and facts.get("container.engine") is None, where
        assert container not in json.dumps(verdict.to_json()), where
        assert verdict.reason != "device_cgroup", where  # not judged by the container's rules
        assert "device_cgroup.v1_rules" not in facts or \
            facts.fact("device_cgroup.v1_rules").source != "cached", where
        if label == "bpf":  # the kernel captured its groups: not in video, a host account
            assert verdict.reason == "not_in_group", (where, verdict.to_json())
            assert f"usermod -aG video {user.pw_name}" in [f.command for f in verdict.fixes]
            assert {f.applies_to for f in verdict.fixes} <= {"host", "any"}


# --privileged asks for every capability; this host's root lacks CAP_SYS_RESOURCE, and
# docker 20.10 ignores --cap-drop beside --privileged (runc then fails), podman honours it
PRIVILEGED = ["--privileged", "--cap-drop=SYS_RESOURCE"]
PODMAN_CASES = {"pid-host": ["--pid=host"], "privileged": PRIVILEGED,
                "pid-host-privileged": ["--pid=host", *PRIVILEGED]}


def test_docker_pid_host_container_claims_no_host_process(
        bpf_sensor, audit_sensor, tracked, docker, image) -> None:
    options = ["--pid=host"]
    store, _ = tracked
    with Scenario("hostns-docker") as scenario:
        name = f"gttest-hostns-{scenario.token}"
        docker.run("run", "-d", "--rm", "--network", "none", "--name", name, *options, image,
                   "/gtprobe", "/dev/null", "120", scenario.token)
        try:
            snap = wait_for_snapshot(store, name)
            if "--pid=host" in options:
                assert snap.pidns is None and snap.facts.get("container.host_pidns") is not None
                assert snap.mntns is not None  # its own mount namespace still keys it
            seen = host_user_denied(scenario, bpf_sensor, audit_sensor, store,
                                    f"docker {' '.join(options)}")
        finally:
            docker.run("rm", "-f", name, check=False)
    assert_host_process(seen, name)


@pytest.mark.parametrize("case", sorted(PODMAN_CASES))
def test_rootful_podman_sharing_host_namespaces_claims_no_host_process(
        bpf_sensor, audit_sensor, tracked, case) -> None:
    store, _ = tracked
    options = PODMAN_CASES[case]
    with Scenario("hostns-podman") as scenario:
        rootfs = podman_support.build_rootfs(
            os.path.join(scenario.workdir, "rootfs"), probe_binary(), podman_support.RootfsFiles())
        engine = podman_support.Podman(runtime="runc", global_options=ROOTFUL_GLOBAL_OPTIONS)
        name = f"gttest-hostns-{scenario.token}"
        scenario.created("cgroup", f"gttest-{scenario.token}")
        scenario.created("rootful-container", name)
        engine.run("run", "-d", "--name", name, "--network=none", *options,
                   f"--cgroup-parent=/gttest-{scenario.token}", *ROOTFUL_RUN_OPTIONS,
                   "--rootfs", rootfs, "/gtprobe", "/dev/null", "120", scenario.token)
        snap = wait_for_snapshot(store, name)
        assert (snap.pidns is None) == ("--pid=host" in options)
        seen = host_user_denied(scenario, bpf_sensor, audit_sensor, store,
                                f"podman {' '.join(options)}")
    assert_host_process(seen, name)


def test_the_pid_host_containers_own_process_is_still_its_own(bpf_sensor, tracked, docker,
                                                              image) -> None:
    """The control: dropping the host pid namespace as a key loses nothing for the
    container's own processes (found by its own mount namespace)."""
    store, _ = tracked
    with Scenario("hostns-own") as scenario:
        node = scenario.nvidia_node(0o666, 0)
        name = f"gttest-hostns-own-{scenario.token}"
        started = time.time()
        done = docker.run_to_exit(name, ["--pid=host", "-v", f"{node.path}:/dev/nvidia0"],
                                  ["/gtprobe", "/dev/nvidia0", "0", scenario.token])
        assert "errno=1 " in done.stdout, done.stdout + done.stderr
        event = denial_of(bpf_sensor, node, started, "/dev/nvidia0", err=errno.EPERM)
        facts = Enricher(HostPaths(), snapshots=store).enrich(event)
    assert facts.get("container.name") == name, facts.get("container.snapshot_key")
    assert str(facts.get("container.snapshot_key")).split()[0] in ("mntns", "cgroup_id",
                                                                    "cgroup")
