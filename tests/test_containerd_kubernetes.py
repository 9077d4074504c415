"""containerd and Kubernetes for real: a private containerd (its own root, state and
socket), containers run by `ctr` in namespace k8s.io through the real shim and
runc, with the annotations and labels containerd's CRI plugin writes and in a
kubepods cgroup path.  Each container is `--rm`: its process opens /dev/nvidia0
(a bind mount its device cgroup does not allow: EPERM) and exits, and the
container is removed before its event is explained.  The pod, namespace and
container names must come out of that run."""

from __future__ import annotations

import json
import os
import time
from typing import Iterator

import pytest

from tests.support import podman as podman_support
from tests.support.containerd import PrivateContainerd, new_pod
from tests.support.followed_sensor import explained, followed_sensor
from tests.support.probe import probe_binary
from tests.support.scenario_workspace import Scenario
from tests.support.sensor_harness import SensorHarness
from tracer.enrichment.start_follower import StartFollower

pytestmark = pytest.mark.kernel
RESULTS = os.environ.get("GPUTRACE_KUBERNETES_RESULTS", "/tmp/gttest-kubernetes-results.jsonl")


@pytest.fixture(scope="module")
def followed() -> Iterator[tuple[SensorHarness, StartFollower]]:
    with followed_sensor() as both:
        yield both


@pytest.fixture(scope="module")
def containerd() -> Iterator[PrivateContainerd]:
    engine = PrivateContainerd().start()
    try:
        rootfs = podman_support.build_rootfs(os.path.join(engine.base, "rootfs"), probe_binary(),
                                             podman_support.RootfsFiles())
        engine.import_rootfs(rootfs)
        yield engine
    finally:
        engine.stop()


def run_and_explain(followed, containerd: PrivateContainerd, container: str):
    sensor, follower = followed
    with Scenario("k8s") as scenario:
        node = scenario.nvidia_node(0o666, 0)
        pod = new_pod(scenario.token)
        started = time.time()
        cid, done = containerd.run_pod_container(
            pod, container, [f"type=bind,src={node.path},dst=/dev/nvidia0,options=rbind"],
            ["/gtprobe", "/dev/nvidia0", "0", scenario.token])
        assert "errno=1 " in done.stdout, done.stdout + done.stderr
        # --rm: the task, its bundle and its runc state are gone before we explain
        assert containerd.ctr("containers", "info", cid, check=False).returncode != 0
        event = sensor.wait_for(lambda e: e.kind == "denial" and e.time >= started - 0.05
                                and e.process.comm == b"gtprobe", timeout=15)[-1]
        facts, verdict = explained(event, follower)
    with open(RESULTS, "a", encoding="utf-8") as out:
        out.write(json.dumps({"case": f"ctr run --rm, k8s.io, {container}", "container": cid,
                              "engine": facts.get("container.engine"),
                              "pod": facts.get("container.pod"),
                              "name": facts.get("container.name"), "reason": verdict.reason,
                              "first_fix": verdict.fixes[0].command if verdict.fixes else None,
                              "found_by": facts.get("container.snapshot_key")}) + "\n")
    return pod, cid, facts, verdict


def test_pod_namespace_and_container_names_of_a_gone_container(followed, containerd):
    pod, cid, facts, verdict = run_and_explain(followed, containerd, "trainer")
    assert facts.get("process.live") is False
    assert facts.get("container.id") == cid
    assert facts.get("container.kubernetes") is True
    found = facts.get("container.pod")
    assert (found.get("pod"), found.get("namespace"), found.get("container"), found.get("pod_uid")) \
        == (pod.name, pod.namespace, "trainer", pod.uid), facts.get("container.pod")
    assert facts.get("container.engine") == "kubernetes"
    assert facts.get("container.name") == "trainer"
    assert verdict.reason == "device_cgroup" and verdict.confidence == "high", verdict.to_json()
    assert not any("usermod" in f.command for f in verdict.fixes)


def test_each_container_of_a_burst_gets_its_own_names(followed, containerd):
    """Back to back: no container borrows the names of the one before."""
    seen = [run_and_explain(followed, containerd, f"step-{i}") for i in range(3)]
    for i, (pod, cid, facts, _) in enumerate(seen):
        assert facts.get("container.id") == cid
        assert facts.get("container.pod", {}).get("pod") == pod.name
        assert facts.get("container.name") == f"step-{i}"
