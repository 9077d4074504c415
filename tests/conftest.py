"""Shared fixtures.  Real-kernel tests need root; CI runs them as root."""

from __future__ import annotations

import os

import pytest

from tests.support.sensor_harness import SensorHarness
from tracer.sensors.bpf_sensor import BpfConfig

pytest_plugins = ["tests.support.nodes", "tests.support.ci_skips", "tests.support.unit_caps"]

URANDOM = (1, 9)  # ioctl RNDADDTOENTCNT on it needs CAP_SYS_ADMIN: a real EPERM
SCENARIO_PREFIXES = ("/dev/dri-gttest/", "/tmp/gttest-nodev-")  # where tests/support/scenarios.py puts nodes


@pytest.fixture(scope="session", autouse=True)
def _no_stale_scenarios():
    """Undo what a killed earlier run left behind (users, nodes, mounts, containers)."""
    if os.geteuid() == 0:
        from tests.support.scenarios import sweep_stale_scenarios
        sweep_stale_scenarios()
    yield


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if os.geteuid() != 0 and not os.environ.get("CI"):
        skip = pytest.mark.skip(reason="needs root (CI runs as root)")
        for item in items:
            if "kernel" in item.keywords or "podman" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def bpf_sensor():
    """One live sensor for the session: default errnos, plus /dev/urandom's device
    so a real driver-level EPERM from ioctl can be provoked without a GPU."""
    harness = SensorHarness(BpfConfig(extra_devs=(URANDOM,), extra_prefixes=SCENARIO_PREFIXES,
                                      aggregate_interval_s=0.5,
                                      sweep_interval_s=0.5)).start()
    yield harness
    harness.close()
