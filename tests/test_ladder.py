"""The access ladder from facts (pure): every layer evaluated, the reason is the
layer that refused, later refusals listed with their fix; EPERM needs a refusing
device layer or a seccomp filter; LSMs named only when consistent."""

from __future__ import annotations

import errno
from typing import Any

from tests.support import device_program_styles as styles
from tests.test_enrichment_fixtures import denial
from tests.test_verdict_offline import _check
from tracer.enrichment import device_program
from tracer.device_programs import DeviceProgram
from tracer.facts import INFERRED, Facts
from tracer.verdict import reasons as R
from tracer.verdict.explain import explain_facts

DENY_195 = styles.RuleSet("runc", True, (styles.Rule(False, "c", 195, None, "rwm"),))


def _program(rules: styles.RuleSet = DENY_195, name: str = "sd_devices") -> dict[str, Any]:
    raw = device_program.encode(styles.COMPILERS[rules.style](rules))
    return DeviceProgram(41, name, "0123456789abcdef", raw).to_json()


def _facts(**extra: Any) -> Facts:
    base = {"node.path": "/dev/nvidia0", "node.mode": "0660", "node.uid": 0, "node.gid": 44,
            "node.major": 195, "node.minor": 0, "node.type": "char", "node.exists": True,
            "node.mount_nodev": False, "node.group_name": "video", "process.fsuid": 1000,
            "process.fsgid": 1000, "process.groups": [1000], "process.cap_effective": "0",
            "userns.level": 0}
    facts = Facts()
    for name, value in dict(base, **extra).items():
        facts.put(name, value, INFERRED, "test")
    return facts


def _explain(err: int, facts: Facts) -> R.Verdict:
    return explain_facts(denial(1, "/dev/nvidia0", err), facts)


def test_not_in_group_then_both_device_layers_refuse_in_kernel_order() -> None:
    facts = _facts(**{"device_cgroup.v2_programs": [_program()],
                      "device_cgroup.v1_rules": ["c 1:3 rwm", "c 226:* rw"]})
    verdict = _explain(errno.EACCES, facts)
    assert verdict.reason == R.NOT_IN_GROUP
    assert [t["layer"] for t in verdict.then] == ["device_cgroup_v2", "device_cgroup_v1"]
    assert all(t["errno"] == "EPERM" and t["fix"] for t in verdict.then)
    assert verdict.then[0]["program"]["name"] == "sd_devices"
    assert [(s["layer"], s["refuses"]) for s in verdict.ladder] == [
        ("nodev", False), ("dac", True), ("device_cgroup_v2", True), ("device_cgroup_v1", True)]


def test_nothing_later_when_the_device_layers_allow() -> None:
    allow = styles.RuleSet("crun", False, (styles.Rule(True, "c", 195, None, "rw"),))
    facts = _facts(**{"device_cgroup.v2_programs": [_program(allow)]})
    verdict = _explain(errno.EACCES, facts)
    assert verdict.reason == R.NOT_IN_GROUP and verdict.then == []


def test_eperm_is_device_cgroup_only_when_a_device_layer_refuses() -> None:
    shown = _explain(errno.EPERM, _facts(**{"node.mode": "0666", "device_cgroup.v2_programs": [_program()]}))
    assert shown.reason == R.DEVICE_CGROUP and shown.confidence == "high"
    assert any("sd_devices" in n for n in shown.notes)
    allowing = _facts(**{"node.mode": "0666", "device_cgroup.v2_programs": [],
                         "device_cgroup.v1_rules": ["c 195:* rwm"], "process.seccomp": "0"})
    assert _explain(errno.EPERM, allowing).reason == R.UNKNOWN
    filtered = _facts(**{"node.mode": "0666", "device_cgroup.v2_programs": [],
                         "device_cgroup.v1_rules": ["c 195:* rwm"], "process.seccomp": "2"})
    verdict = _explain(errno.EPERM, filtered)
    assert verdict.reason == R.SECCOMP_DENIED and "seccomp" in verdict.summary


def test_seccomp_lists_every_layer_that_would_refuse_after_it() -> None:
    facts = _facts(**{"process.seccomp": "2", "device_cgroup.v1_rules": ["c 1:3 rwm"],
                      "node.mode": "0666"})
    verdict = _explain(errno.EPERM, facts)
    assert verdict.reason == R.DEVICE_CGROUP  # a device layer is shown to refuse
    facts = _facts(**{"process.seccomp": "2", "device_cgroup.v2_programs": []})
    verdict = _explain(errno.EPERM, facts)  # DAC would refuse once seccomp lets openat run
    assert verdict.reason == R.SECCOMP_DENIED
    assert [t["layer"] for t in verdict.then] == ["dac"]


def test_lsm_named_only_when_consistent() -> None:
    open_node = {"node.mode": "0666", "device_cgroup.v2_programs": []}
    landlock = _explain(errno.EACCES, _facts(**open_node, **{"lsm.active": ["capability", "landlock", "bpf"],
                                                             "lsm.bpf_programs": 0}))
    assert landlock.reason == R.LSM_DENIED and "Landlock" in landlock.summary
    assert landlock.confidence == "medium"
    either = _explain(errno.EACCES, _facts(**open_node, **{"lsm.active": ["landlock", "bpf"],
                                                           "lsm.bpf_programs": 2}))
    assert either.reason == R.LSM_DENIED and either.confidence == "low"
    none = _explain(errno.EACCES, _facts(**open_node, **{"lsm.active": ["capability", "lockdown"]}))
    assert none.reason == R.UNKNOWN


def test_undecided_program_is_not_a_refusal() -> None:
    call = device_program.encode([device_program.Insn(0x85, 0, 0, 0, 14),
                                  device_program.Insn(0x95, 0, 0, 0, 0)])
    prog = DeviceProgram(9, "x", "00" * 8, call).to_json()
    verdict = _explain(errno.EPERM, _facts(**{"node.mode": "0666", "device_cgroup.v2_programs": [prog]}))
    assert verdict.reason == R.UNKNOWN
    assert next(s for s in verdict.ladder if s["layer"] == "device_cgroup_v2")["refuses"] is None


def test_check_shows_the_ladder_per_runtime() -> None:
    rows = _check("jetson-jp61", "nvidia")
    bind = rows[("/dev/dri/renderD128", "docker-bind-mount")]
    assert "device_cgroup_v1: refuses (device_cgroup)" in bind.ladder
    device = rows[("/dev/dri/renderD128", "docker-device")]
    assert device.allowed and "device_cgroup_v1: allows (device_cgroup)" in device.ladder
