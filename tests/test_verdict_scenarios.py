"""The six real scenarios of the verdict issue, end to end: a real denial (podman,
runc, crun, ACLs, device cgroups, mounts), caught by the BPF sensor, enriched
from the live host and explained."""

from __future__ import annotations

import errno

import pytest

from tests.conftest import SCENARIO_PREFIXES, URANDOM
from tests.support import scenarios
from tests.support.unit_caps import Explainer, explainer_fixture
from tracer.enrichment.enricher import Enricher
from tracer.event import Event
from tracer.host import HostPaths
from tracer.verdict.explain import explain
from tracer.verdict.reasons import Verdict

pytestmark = [pytest.mark.kernel, pytest.mark.podman]


@pytest.fixture(scope="module")
def enricher() -> Enricher:
    return Enricher(HostPaths())


# each test taking `explainer` runs twice: as root in this process, and by `gputrace
# watch` under the systemd unit's capability bounding set (tests/support/unit_caps.py)
explainer = explainer_fixture(SCENARIO_PREFIXES, (f"{URANDOM[0]}:{URANDOM[1]}",))


def explained(explainer: Explainer, enricher, attempt) -> tuple[Event, Verdict]:
    def in_process(event: Event) -> Verdict:
        verdict = explain(event, enricher)  # the process still holds: facts are live
        assert event.verdict == verdict.to_json()
        return verdict
    return explainer.explain(lambda e: e.process.pid == attempt.host_pid, in_process)


def commands(verdict: Verdict) -> str:
    return "\n".join(f.command for f in verdict.fixes)


def test_rootless_podman_runc_drops_the_video_group(explainer, enricher):
    with scenarios.rootless_podman(runtime="runc", keep_groups=True) as attempt:
        assert attempt.errno == errno.EACCES  # runc cannot keep groups, even when asked
        event, verdict = explained(explainer, enricher, attempt)
    assert event.process.userns.level == 1
    assert verdict.reason == "group_dropped_in_userns", verdict.to_json()
    text = commands(verdict)
    assert "--group-add keep-groups" in text and "crun" in text
    assert "run.oci.keep_original_groups=1" in text
    assert "--userns keep-id" in text or "--userns=keep-id" in text
    mode_fix = [f for f in verdict.fixes if "NVreg_DeviceFileMode=0666" in f.command]
    assert mode_fix and mode_fix[0].security_note
    said = " ".join([verdict.summary, *verdict.notes, *(f.summary for f in verdict.fixes)])
    assert "runc" in said
    facts = event.facts
    assert "podman" in str(facts) and "runc" in str(facts)


def test_rootless_podman_crun_keep_groups_is_not_denied(bpf_sensor):
    with scenarios.rootless_podman(runtime="crun", keep_groups=True) as attempt:
        assert attempt.errno == errno.ENXIO  # permission granted; no driver behind the node
        with pytest.raises(AssertionError):
            bpf_sensor.wait_for(lambda e: e.process.pid == attempt.host_pid, timeout=2)


def test_seat_acl_for_another_user(explainer, enricher):
    with scenarios.seat_acl(opener="ssh", acl=True) as attempt:
        assert attempt.errno == errno.EACCES
        event, verdict = explained(explainer, enricher, attempt)
    # the sensor caught the scenario's DRM render node, and enrichment stat'ed that node
    assert event.node.path == attempt.node.path.encode()
    assert (attempt.node.major, attempt.node.minor) == (226, attempt.node.minor)
    assert (event.facts.get("node.major"), event.facts.get("node.minor")) == \
        (attempt.node.major, attempt.node.minor)
    assert verdict.reason == "seat_acl_only", verdict.to_json()


def test_render_group_without_acl_is_not_in_group(explainer, enricher):
    with scenarios.seat_acl(opener="ssh", acl=False) as attempt:
        assert attempt.errno == errno.EACCES
        _event, verdict = explained(explainer, enricher, attempt)
        gid = attempt.details["render_gid"]
        group = attempt.details["render_group"]
    assert verdict.reason == "not_in_group", verdict.to_json()
    assert group in verdict.summary and str(gid) in verdict.summary


def test_device_cgroup_deny_rule(explainer, enricher):
    with scenarios.device_cgroup_v1() as attempt:
        assert attempt.errno == errno.EPERM
        event, verdict = explained(explainer, enricher, attempt)
    assert event.errno == errno.EPERM
    # devices.list of a default-allow cgroup hides its deny rules: nothing shows the
    # refusal, so the verdict does not claim it, and says where to look
    assert verdict.reason == "unknown", verdict.to_json()
    assert any("devices.list hides" in n for n in verdict.notes)


def test_rootful_bind_mount_without_device_is_device_cgroup(explainer, enricher):
    with scenarios.rootful_podman(via="bind") as attempt:
        assert attempt.errno == errno.EPERM
        _event, verdict = explained(explainer, enricher, attempt)
    assert verdict.reason == "device_cgroup", verdict.to_json()
    assert "--device" in commands(verdict)


def test_nodev_mount(explainer, enricher):
    with scenarios.nodev_mount() as attempt:
        assert attempt.errno == errno.EACCES
        _event, verdict = explained(explainer, enricher, attempt)
    assert verdict.reason == "nodev_mount", verdict.to_json()


def test_container_group_gid_differs_from_the_host(explainer, enricher):
    with scenarios.container_gid_mismatch() as attempt:
        assert attempt.errno == errno.EACCES
        _event, verdict = explained(explainer, enricher, attempt)
        host_gid = attempt.details["host_gid"]
    assert verdict.reason == "gid_mismatch_in_container", verdict.to_json()
    assert f"--group-add {host_gid}" in commands(verdict)


@pytest.mark.parametrize("runtime,keep_groups,check_runtime", [
    ("runc", True, "podman-runc"), ("crun", True, "podman-crun-keep-groups")])
def test_check_predicts_what_the_real_runtime_did(runtime, keep_groups, check_runtime):
    """`gputrace check` (no tracing, the access model only) agrees with the kernel's
    answer to the real container."""
    from tracer.verdict.check import check_access

    with scenarios.rootless_podman(runtime=runtime, keep_groups=keep_groups) as attempt:
        rows = check_access(HostPaths(), attempt.user, check_runtime)
        row = next(r for r in rows if r.node == attempt.node.path)
        really_allowed = attempt.errno == errno.ENXIO  # granted; no driver behind it
    assert row.allowed == really_allowed, (row, attempt.errno_name)
