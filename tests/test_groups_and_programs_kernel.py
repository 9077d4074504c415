"""What the BPF probe captures beyond the old 32 groups and beyond what the unit may
ask bpf() for, on the real kernel (issue 19):

* a process with 40 supplementary groups whose GPU group sorts last: every group is
  captured, so membership is decided (the old sensor kept 32 and called a member
  a stranger);
* 1,100 groups: the lowest 1,024 are captured in the kernel's sorted order, which
  decides every gid up to the last one captured, and a gid above them is unknown,
  never "not in group";
* the refused task's effective cgroup v2 device programs, read in the kernel at the
  denial, are the very programs (id, tag, instructions) bpf() shows root.

Each verdict test takes `explainer`: it runs as root in this process and by
`gputrace watch` under the unit's capability bounding set (tests/support/unit_caps.py).
"""

from __future__ import annotations

import base64
import errno
import os
from typing import Any, Iterator

import pytest

from tests.conftest import SCENARIO_PREFIXES, URANDOM
from tests.support import actor
from tests.support.nodes import char195_nodes
from tests.support.unit_caps import Explainer, explainer_fixture
from tests.support.v2_device_cgroup import deny_major, v2_device_cgroup
from tracer.enrichment import bpf_syscall as bpf
from tracer.enrichment.enricher import Enricher
from tracer.event import Event
from tracer.host import HostPaths
from tracer.sensors.bpf_constants import MAX_GROUPS
from tracer.verdict import reasons as R
from tracer.verdict.explain import explain
from tracer.verdict.reasons import Verdict

pytestmark = [pytest.mark.kernel]
explainer = explainer_fixture(SCENARIO_PREFIXES, (f"{URANDOM[0]}:{URANDOM[1]}",))
GPU_GID = 43990            # sorts after every other group of the process
OTHERS = list(range(43001, 43040))  # 39 more: 40 groups in all, the GPU group last


@pytest.fixture
def gpu_node() -> Iterator[Any]:
    with char195_nodes("/dev/nvidia-gtgroups") as make:
        yield make


def _in_process(event: Event) -> Verdict:
    enricher = Enricher(HostPaths())
    enricher.prime(event.process)
    return explain(event, enricher)


def denied(explainer: Explainer, node: str, groups: list[int], flags: str = "O_RDWR",
           **plan: Any) -> tuple[Event, Verdict, actor.ActorResult]:
    result = actor.spawn({"uid": 41201, "gid": 41201, "groups": groups, **plan,
                          "actions": [{"op": "open", "path": node, "flags": flags}]}).check()
    event, verdict = explainer.explain(lambda e: e.process.pid == result.pid, _in_process)
    return event, verdict, result


def test_forty_groups_gpu_group_last_member_is_decided(explainer: Explainer,
                                                        gpu_node: Any) -> None:
    """Mode 0606 owned by the GPU group: its members are refused (group bits ---
    decide for them), strangers are let in.  Only with the 40th group captured can
    the verdict see that this process is a member."""
    node = gpu_node(0o606, GPU_GID)
    event, verdict, result = denied(explainer, node, OTHERS + [GPU_GID])
    assert result.errnos() == [errno.EACCES]
    truth = sorted(int(g) for g in result.truth["status"]["Groups"].split())
    assert event.process.groups == truth and len(truth) == 40 and truth[-1] == GPU_GID
    assert event.process.ngroups == 40
    assert verdict.reason == R.MODE_RESTRICTIVE, verdict.to_json()
    dac = next(step for step in verdict.ladder if step["layer"] == "dac")
    assert dac["refuses"] is True and dac["check"] == "dac_group", dac


def test_forty_groups_without_the_gpu_group_is_not_in_group(explainer: Explainer,
                                                             gpu_node: Any) -> None:
    node = gpu_node(0o660, GPU_GID)
    event, verdict, result = denied(explainer, node, OTHERS + [GPU_GID + 5])
    assert result.errnos() == [errno.EACCES] and event.process.ngroups == 40
    assert verdict.reason == R.NOT_IN_GROUP, verdict.to_json()
    assert not any("inferred" in note for note in verdict.notes)  # captured, all 40


def test_more_groups_than_captured_decide_below_and_leave_above_unknown(
        explainer: Explainer, gpu_node: Any) -> None:
    """1,100 groups: the lowest 1,024 come with the event, in the kernel's sorted order.
    A gid among or below them is decided either way; a gid above them is unknown."""
    many = list(range(44001, 44001 + 1100))
    top = many[MAX_GROUPS - 1]
    cases = [(gpu_node(0o606, many[10]), R.MODE_RESTRICTIVE),   # held, captured: member
             (gpu_node(0o660, many[0] - 500), R.NOT_IN_GROUP),  # below them: not held
             (gpu_node(0o606, many[-5]), R.UNKNOWN)]            # held, above the capture
    for node, reason in cases:
        event, verdict, result = denied(explainer, node, many)
        assert result.errnos() == [errno.EACCES]
        assert event.process.ngroups == 1100 and event.process.groups == many[:MAX_GROUPS]
        assert verdict.reason == reason, (node, verdict.to_json())
        dac = next(step for step in verdict.ladder if step["layer"] == "dac")
        if reason == R.UNKNOWN:
            assert dac["refuses"] is None and f"up to gid {top}" in dac["detail"], dac


def test_device_programs_read_in_the_kernel_are_the_programs_bpf_shows_root(
        bpf_sensor: Any, gpu_node: Any) -> None:
    """Differential: what the probe sent for the refused task equals what
    BPF_PROG_QUERY + BPF_OBJ_GET_INFO_BY_FD give root for its cgroup."""
    node = gpu_node(0o666, 0)
    with v2_device_cgroup(deny_major(195, "crun")) as cgroup:
        result = actor.spawn({"cgroup_procs": [os.path.join(cgroup, "cgroup.procs")],
                              "actions": [{"op": "open", "path": node, "flags": "O_RDWR"}]}).check()
        assert result.errnos() == [errno.EPERM]
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            ids = bpf.prog_query(fd, bpf.BPF_CGROUP_DEVICE, effective=True)
        finally:
            os.close(fd)
        truth = []
        for prog_id in ids:
            prog_fd = bpf.prog_get_fd_by_id(prog_id)
            try:
                info = bpf.prog_info(prog_fd)
            finally:
                os.close(prog_fd)
            truth.append((info.id, info.tag, info.xlated))
        event = bpf_sensor.wait_for(lambda e: e.process.pid == result.pid
                                    and e.kind == "denial", timeout=15)[0]
    fact = event.facts.fact("device_cgroup.v2_programs")
    assert fact is not None and fact.source == "sensor" and "read by the BPF probe" in fact.origin
    seen = [(p["id"], p["tag"], base64.b64decode(p["insns_b64"])) for p in fact.value]
    assert seen == truth and truth and truth[0][2]
    # enrichment keeps the probe's reading (it never asks bpf() over it)
    facts = Enricher(HostPaths()).enrich(event)
    assert facts.fact("device_cgroup.v2_programs") == fact
