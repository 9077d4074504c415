"""The verdict scenarios again, through the audit sensor: the verdict stage does
not care which sensor saw the denial.  Each test runs as root in this process and
by `gputrace watch --sensor audit` under the unit's bounding set plus the audit
drop-in's capabilities (tests/support/unit_caps.py)."""

from __future__ import annotations

import errno

import pytest

from tests.support import scenarios
from tests.support.unit_caps import Explainer, explainer_fixture
from tracer.enrichment.enricher import Enricher
from tracer.host import HostPaths
from tracer.verdict.explain import explain

pytestmark = [pytest.mark.kernel, pytest.mark.podman]
explainer = explainer_fixture(("/dev/dri-gttest/",), sensor="audit")


def explained(explainer: Explainer, attempt):
    event, verdict = explainer.explain(lambda e: e.process.pid == attempt.host_pid,
                                       lambda e: explain(e, Enricher(HostPaths())))
    assert event.sensor == "audit" and event.missing  # says what audit cannot see
    return event, verdict


def test_not_in_group_through_audit(explainer):
    with scenarios.seat_acl(opener="ssh", acl=False) as attempt:
        assert attempt.errno == errno.EACCES
        event, verdict = explained(explainer, attempt)
        gid = attempt.details["render_gid"]
    assert event.errno == errno.EACCES and event.node.path == attempt.node.path.encode()
    assert verdict.reason == "not_in_group", verdict.to_json()
    assert str(gid) in verdict.summary


def test_group_dropped_in_userns_through_audit(explainer):
    with scenarios.rootless_podman(runtime="runc") as attempt:
        assert attempt.errno == errno.EACCES
        event, verdict = explained(explainer, attempt)
    assert verdict.reason == "group_dropped_in_userns", verdict.to_json()


def test_device_cgroup_through_audit(explainer):
    # deny-all ("a"): devices.list shows the (empty) allowlist, so the refusal is shown;
    # a default-allow cgroup's deny rules are not (test_verdict_scenarios covers that)
    with scenarios.device_cgroup_v1(rule="a") as attempt:
        assert attempt.errno == errno.EPERM
        event, verdict = explained(explainer, attempt)
    assert event.errno == errno.EPERM
    assert verdict.reason == "device_cgroup" and verdict.confidence == "high", verdict.to_json()


def test_landlock_refusal_is_shown_by_its_audit_record(explainer):
    """A real Landlock sandbox (no file rights) refuses an open and exits at once; the
    kernel's LANDLOCK_ACCESS record in the same serial names the domain and the blocked
    rights, so Landlock is shown (high), not inferred by elimination (medium)."""
    import os
    import subprocess
    import sys

    from tests.support.nodes import NodeSpec, make_node, unique

    path = make_node(f"/dev/nvidia-{unique()}", NodeSpec(195, 202, 0o666))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        child = subprocess.run([sys.executable, "-m", "tests.support.restricted_open", "landlock",
                                path], cwd=root, capture_output=True, text=True, check=True)
        pid, err = (int(x) for x in child.stdout.split())
        assert err == errno.EACCES
        event, verdict = explainer.explain(lambda e: e.process.pid == pid,
                                           lambda e: explain(e, Enricher(HostPaths())))
    finally:
        os.unlink(path)
    assert set(event.facts.get("audit.landlock_blockers")) >= {"fs.read_file", "fs.write_file"}
    assert event.facts.get("audit.landlock_path") == path
    assert explainer.mode == "unit" or event.facts.get("process.live") is False
    assert verdict.reason == "lsm_denied" and verdict.confidence == "high", verdict.to_json()
    assert "Landlock" in verdict.summary
    assert any("Landlock audit record" in n and "fs.read_file" in n for n in verdict.notes)


def test_device_program_eperm_under_a_container_filter_is_never_blamed_on_seccomp(explainer):
    """The field's most common EPERM: a container's own device program refuses the node,
    and the process carries a seccomp filter (docker and podman always install one)
    that lets openat through.  As root, gputrace reads the program and names it; under
    the unit's capabilities (audit: no probe to read it in the kernel), the v2 device
    cgroup cannot be read, so the verdict is unknown, names that layer and the
    capability bpf() needed, and never calls it seccomp_denied."""
    import os
    import subprocess
    import sys

    from tests.support.nodes import NodeSpec, make_node, unique
    from tests.support.v2_device_cgroup import deny_major, v2_device_cgroup

    path = make_node(f"/dev/nvidia-{unique()}", NodeSpec(195, 203, 0o666))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        with v2_device_cgroup(deny_major(195, "runc")) as cgroup:
            child = subprocess.Popen(
                [sys.executable, "-m", "tests.support.restricted_open", "container-filter", path,
                 "hold"], cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env=dict(os.environ, GTTEST_CGROUP_PROCS=os.path.join(cgroup, "cgroup.procs")))
            assert child.stdout is not None and child.stdin is not None
            pid, err = (int(x) for x in child.stdout.readline().split())
            try:
                assert err == errno.EPERM
                event, verdict = explainer.explain(lambda e: e.process.pid == pid,
                                                   lambda e: explain(e, Enricher(HostPaths())))
            finally:
                child.communicate("x", timeout=10)
    finally:
        os.unlink(path)
    print(f"container filter + v2 program, audit, {explainer.mode}:", verdict.reason,
          verdict.confidence, "|", verdict.summary, "|", " ".join(verdict.notes))
    assert verdict.reason != "seccomp_denied", verdict.to_json()
    facts = {e.fact: e.value for e in verdict.evidence}
    if explainer.mode == "root":
        assert verdict.reason == "device_cgroup" and verdict.confidence == "high", verdict.to_json()
        return
    assert verdict.reason == "unknown", verdict.to_json()
    said = " ".join(verdict.notes)
    assert "v2 device cgroup" in said and "CAP_SYS_ADMIN" in said, said
    assert "seccomp filter is on" in said
    assert str(facts.get("process.seccomp", "")) == "2" or "process.seccomp" not in facts
