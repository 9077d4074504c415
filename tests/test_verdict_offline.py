"""`explain` of recorded journals and `check` predictions, on fixture hosts."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

from tests.test_enrichment_fixtures import HOSTS, denial, fixture_enricher, gentoo_denial
from tracer.enrichment.node import FixtureNodeStats
from tracer.errors import BadInput
from tracer.host import HostPaths
from tracer.verdict import reasons as R
from tracer.verdict.check import CHECK_RUNTIMES, check_access
from tracer.verdict.explain import explain_records


def test_explain_records_uses_recorded_facts_and_counts_bad_lines() -> None:
    event = gentoo_denial()
    fixture_enricher("gentoo-rootless-podman").enrich(event)  # facts recorded, no verdict yet
    update = dict(event.to_json(), kind="update", count=5)
    bad_facts = dict(event.to_json(), facts={
        "node.mode": {"value": "zz", "source": "live"}, "node.uid": {"value": 0, "source": "live"},
        "node.gid": {"value": 27, "source": "live"}})
    lines = [json.dumps(event.to_json()), "", "{not json", json.dumps({"time": 1}),
             json.dumps(update), json.dumps(bad_facts)]
    errors: Counter[str] = Counter()
    results = list(explain_records(lines, errors=errors))
    assert [r.line for r in results] == [1, 3, 4, 5, 6]
    assert results[0].verdict is not None
    assert results[0].verdict.reason == R.GROUP_DROPPED_IN_USERNS
    assert results[0].to_json()["verdict"]["reason"] == R.GROUP_DROPPED_IN_USERNS
    assert results[1].error == "bad_json" and results[2].error == "missing_field"
    assert results[3].event is not None and results[3].verdict is None  # updates pass through
    assert results[4].error == "bad_facts"
    assert errors == Counter({"bad_json": 1, "missing_field": 1, "bad_facts": 1})


def test_explain_records_enriches_events_without_facts() -> None:
    line = json.dumps(denial(700, "/dev/nvidia0", 1, caps=0xA80425FB,
                             mntns=4026532700).to_json())
    [plain] = list(explain_records([line]))
    # EPERM alone shows no layer: without the host's devices.list it is not device_cgroup
    assert plain.verdict is not None and plain.verdict.reason == R.UNKNOWN
    assert any("device cgroup policy" in n and "seccomp" in n for n in plain.verdict.notes)
    [enriched] = list(explain_records([line], fixture_enricher("cgroup-v1-host")))
    assert enriched.verdict is not None and enriched.verdict.reason == R.DEVICE_CGROUP
    assert enriched.verdict.confidence == "high"


def _check(tree: str, user: str, stats: str = "node-stats.json",
           runtime: str | None = None) -> dict[tuple[str, str], object]:
    root = os.path.join(HOSTS, tree)
    rows = check_access(HostPaths.under(root), user, runtime,
                        stat_node=FixtureNodeStats(os.path.join(root, stats)))
    return {(r.node, r.runtime): r for r in rows}


def test_check_seat_user_and_ssh_user_on_jetson() -> None:
    seat = _check("jetson-jp61", "nvidia")
    assert seat[("/dev/dri/renderD128", "host")].allowed
    assert seat[("/dev/dri/renderD128", "podman-crun-keep-groups")].allowed
    assert seat[("/dev/dri/renderD128", "docker-device")].allowed
    bind = seat[("/dev/dri/renderD128", "docker-bind-mount")]
    assert not bind.allowed and bind.errno == "EPERM" and bind.reason == R.DEVICE_CGROUP
    ssh = _check("jetson-jp61", "bob")[("/dev/dri/renderD128", "host")]
    assert not ssh.allowed and ssh.reason == R.SEAT_ACL_ONLY
    assert ssh.fix == "usermod -aG render bob"


def test_check_gentoo_rootless_runc_versus_crun_keep_groups() -> None:
    rows = _check("gentoo-rootless-podman", "alice")
    runc = rows[("/dev/nvidia0", "podman-runc")]
    assert not runc.allowed and runc.reason == R.GROUP_DROPPED_IN_USERNS
    assert runc.fix == "podman run --runtime crun --group-add keep-groups ..."
    assert rows[("/dev/nvidia0", "podman-crun-keep-groups")].allowed
    assert rows[("/dev/nvidia0", "host")].allowed
    assert rows[("/dev/nvidia-caps/nvidia-cap1", "host")].reason == R.MODE_RESTRICTIVE
    assert {rt for _, rt in rows} == set(CHECK_RUNTIMES)
    only = _check("gentoo-rootless-podman", "alice", runtime="host")
    assert {rt for _, rt in only} == {"host"}


def test_check_rejects_unknown_user_and_runtime() -> None:
    with pytest.raises(BadInput):
        _check("jetson-jp61", "gtnobody")
    with pytest.raises(BadInput):
        _check("jetson-jp61", "bob", runtime="kata")
