"""The verdict scenarios again, through the audit sensor: the verdict stage does
not care which sensor saw the denial."""

from __future__ import annotations

import errno

import pytest

from tests.support import scenarios
from tests.support.sensor_harness import SensorHarness
from tracer.enrichment.enricher import Enricher
from tracer.host import HostPaths
from tracer.sensors.audit_pipeline import AuditConfig
from tracer.sensors.audit_sensor import AuditSensor
from tracer.verdict.explain import explain

pytestmark = [pytest.mark.kernel, pytest.mark.podman]


@pytest.fixture(scope="module")
def audit_sensor():
    harness = SensorHarness(sensor=AuditSensor(AuditConfig(
        extra_prefixes=("/dev/dri-gttest/",)))).start()
    yield harness
    harness.close()


def explained(sensor, attempt):
    events = sensor.wait_for(lambda e: e.process.pid == attempt.host_pid, timeout=15)
    event = events[0]
    assert event.sensor == "audit" and event.missing  # says what audit cannot see
    return event, explain(event, Enricher(HostPaths()))


def test_not_in_group_through_audit(audit_sensor):
    with scenarios.seat_acl(opener="ssh", acl=False) as attempt:
        assert attempt.errno == errno.EACCES
        event, verdict = explained(audit_sensor, attempt)
        gid = attempt.details["render_gid"]
    assert event.errno == errno.EACCES and event.node.path == attempt.node.path.encode()
    assert verdict.reason == "not_in_group", verdict.to_json()
    assert str(gid) in verdict.summary


def test_group_dropped_in_userns_through_audit(audit_sensor):
    with scenarios.rootless_podman(runtime="runc") as attempt:
        assert attempt.errno == errno.EACCES
        event, verdict = explained(audit_sensor, attempt)
    assert verdict.reason == "group_dropped_in_userns", verdict.to_json()


def test_device_cgroup_through_audit(audit_sensor):
    # deny-all ("a"): devices.list shows the (empty) allowlist, so the refusal is shown;
    # a default-allow cgroup's deny rules are not (test_verdict_scenarios covers that)
    with scenarios.device_cgroup_v1(rule="a") as attempt:
        assert attempt.errno == errno.EPERM
        event, verdict = explained(audit_sensor, attempt)
    assert event.errno == errno.EPERM
    assert verdict.reason == "device_cgroup" and verdict.confidence == "high", verdict.to_json()
