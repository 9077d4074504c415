"""Names and numbers agree (issue 18 item 3), from fixture facts: a device-cgroup
EPERM where the rules allow another number meant for the node (a stale dynamic
major, another GPU driver's major, the number before a renumbering), told in the
form the user gave the rules; and ENXIO, where no driver answers the node's
number.  The real-kernel case is tests/test_node_numbers_real.py."""

from __future__ import annotations

import errno
from typing import Any, Optional

from tests.support.device_program_styles import Rule, RuleSet, compile_systemd
from tracer.enrichment.device_program import encode
from tracer.enrichment.device_rules import DeviceProgram
from tests.support.fact_events import denial_with_facts
from tracer.facts import Facts
from tracer.verdict.reasons import Verdict

DEVICES = {"1": "mem", "4": "tty", "5": "/dev/tty", "10": "misc", "136": "pts",
           "195": "nvidia", "508": "nvidia-uvm", "509": "nvidia-caps"}
DOCKER_DEFAULTS = ["c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 5:0 rwm", "c 5:1 rwm",
                   "c 136:* rwm", "c 10:200 rwm", "c *:* m", "b *:* m"]


def verdict_for(path: str, major: int, minor: int, *, err: int = errno.EPERM,
                v1_rules: Optional[list[str]] = None, v2_programs: Optional[list[Any]] = None,
                devices: Optional[dict[str, str]] = None, extra: Optional[dict[str, Any]] = None,
                container: bool = True) -> tuple[Facts, Verdict]:
    """A root process (in a docker container unless told otherwise) refused `path`."""
    table = DEVICES if devices is None else devices
    facts: dict[str, Any] = {
        "node.mode": "0666", "node.gid": 0,
        "node.class": "nvidia-uvm" if "uvm" in path else "nvidia-gpu",
        # /proc/devices as read for the event; {}: not read
        "host.char_majors": table or None,
        "host.gpu_char_majors": {k: v for k, v in table.items() if v.startswith("nvidia")}
        if table else None,
        "container.engine": "docker" if container else None,
        "container.id": "f" * 64 if container else None,
        "device_cgroup.version": 1 if v1_rules is not None else None,
        "device_cgroup.v1_rules": v1_rules, "device_cgroup.v2_programs": v2_programs,
        **(extra or {})}
    _, known, verdict = denial_with_facts(path, major, minor, err, facts, caps=0xA80425FB)
    return known, verdict


def oci(devices: list[dict[str, Any]], rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {"devices": devices, "device_rules": [{"allow": False, "type": "a", "major": None,
                                                  "minor": None, "access": "rwm"}] + rules}


def allow(major: int, minor: Optional[int] = None) -> dict[str, Any]:
    return {"allow": True, "type": "c", "major": major, "minor": minor, "access": "rwm"}


def test_a_rule_for_the_nvidia_major_does_not_allow_nvidia_uvm() -> None:
    """The issue's example: rule c 195:*, the node is c 508:0 (nvidia-uvm)."""
    config = oci([{"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0}], [allow(195)])
    _, verdict = verdict_for("/dev/nvidia-uvm", 508, 0, v1_rules=DOCKER_DEFAULTS + ["c 195:* rwm"],
                             extra={"container.oci": config})
    assert verdict.reason == "device_number_mismatch" and verdict.confidence == "high"
    assert verdict.summary.startswith("The device cgroup allows c 195:* rwm (major 195 is nvidia)")
    assert "/dev/nvidia-uvm is c 508:0 (nvidia-uvm), a major of its own" in verdict.summary
    assert verdict.fixes[0].command == "docker run --device /dev/nvidia-uvm ..."


def test_a_device_cgroup_rule_with_a_stale_major() -> None:
    """`--device-cgroup-rule 'c 240:* rwm'` written when nvidia-uvm was 240: the fix
    is the same flag with the major /proc/devices gives it now."""
    config = oci([], [allow(240)])
    _, verdict = verdict_for("/dev/nvidia-uvm", 508, 0, v1_rules=DOCKER_DEFAULTS + ["c 240:* rwm"],
                             extra={"container.oci": config})
    assert verdict.reason == "device_number_mismatch"
    assert "allows c 240:* rwm, but /proc/devices gives major 240 to no driver now" \
        in verdict.summary
    assert "stale major" in verdict.summary
    assert verdict.fixes[0].command == "docker run --device-cgroup-rule 'c 508:* rwm' ..."
    assert "instead of the stale 240" in verdict.fixes[0].summary
    assert verdict.fixes[1].command == "docker run --device /dev/nvidia-uvm ..."


def test_a_static_major_missing_from_a_partial_devices_table_is_not_stale() -> None:
    """Only dynamic majors go stale: c 5:0 with no tty line is a partial recording."""
    _, verdict = verdict_for("/dev/nvidia0", 195, 0, v1_rules=DOCKER_DEFAULTS,
                             devices={"1": "mem", "195": "nvidia"})
    assert verdict.reason == "device_cgroup"


def test_node_renumbered_since_the_container_was_created() -> None:
    """The OCI config gave /dev/nvidia-uvm c 509:0 at creation; the node is c 508:0 now."""
    config = oci([{"path": "/dev/nvidia-uvm", "type": "c", "major": 509, "minor": 0}],
                 [allow(509, 0)])
    _, verdict = verdict_for("/dev/nvidia-uvm", 508, 0, v1_rules=DOCKER_DEFAULTS + ["c 509:0 rwm"],
                             extra={"container.oci": config})
    assert verdict.reason == "device_number_mismatch"
    assert "the number the container's OCI config (linux.devices)" in verdict.summary
    assert "renumbered" in verdict.summary
    assert verdict.fixes[0].command == "docker run --device /dev/nvidia-uvm ..."
    assert "Re-create the container" in verdict.fixes[0].summary


def test_never_granted_stays_device_cgroup() -> None:
    """No rule names any other GPU number: the plain device-cgroup story."""
    _, verdict = verdict_for("/dev/nvidia-uvm", 508, 0, v1_rules=DOCKER_DEFAULTS)
    assert verdict.reason == "device_cgroup"


def test_unknown_devices_table_tells_no_mismatch() -> None:
    """Without /proc/devices as read for the event, no major is called stale."""
    _, verdict = verdict_for("/dev/nvidia-uvm", 508, 0, v1_rules=["c 240:* rwm"], devices={})
    assert verdict.reason == "device_cgroup"


def _systemd_program(rules: list[Rule]) -> list[dict[str, Any]]:
    insns = compile_systemd(RuleSet("systemd", False, tuple(rules)))
    return [DeviceProgram(41, "sd_devices", "abcdef0123456789", encode(insns)).to_json()]


def test_a_unit_program_built_before_the_driver_reload() -> None:
    """DeviceAllow=char-nvidia-uvm resolved to 240 when the unit started; the driver
    was reloaded and nvidia-uvm is 508: the unit's configuration covers the node,
    its program does not; the fix is a restart (v2 program read by the interpreter)."""
    program = _systemd_program([Rule(True, "c", 195, None, "rw"), Rule(True, "c", 240, None, "rw")])
    props = {"DevicePolicy": "closed", "PrivateDevices": False,
             "DeviceAllow": [{"spec": "char-nvidia-uvm", "access": "rw"},
                             {"spec": "char-nvidia", "access": "rw"}]}
    _, verdict = verdict_for("/dev/nvidia-uvm", 508, 0, v2_programs=program, container=False,
                             extra={"systemd.unit": "ollama.service",
                                    "systemd.unit_properties": props})
    assert verdict.reason == "device_number_mismatch", verdict.summary
    assert verdict.summary.startswith("The device cgroup's program id 41 'sd_devices' tag "
                                      "abcdef0123456789 allows c 240:0, but")
    assert "major 240 to no driver now" in verdict.summary
    assert verdict.fixes[0].command == "systemctl restart ollama.service"


def test_lxc_line_in_the_form_the_user_wrote() -> None:
    _, verdict = verdict_for("/dev/nvidia-uvm", 508, 0, v1_rules=["c 195:* rwm", "c 241:* rwm"],
                             extra={"container.engine": "lxc", "container.name": "gpu1"})
    assert verdict.reason == "device_number_mismatch"
    assert verdict.fixes[0].command == "lxc.cgroup.devices.allow = c 508:* rwm"
    assert verdict.fixes[0].where.startswith("/var/lib/lxc/gpu1/config")


def test_enxio_node_made_with_a_stale_number_in_a_container() -> None:
    config = oci([{"path": "/dev/nvidia-uvm", "type": "c", "major": 240, "minor": 0}],
                 [allow(240, 0)])
    _, verdict = verdict_for("/dev/nvidia-uvm", 240, 0, err=errno.ENXIO,
                             v1_rules=DOCKER_DEFAULTS + ["c 240:0 rwm"],
                             extra={"container.oci": config})
    assert verdict.reason == "no_driver_for_node" and verdict.confidence == "high"
    assert "no driver has major 240 now; nvidia-uvm is major 508" in verdict.summary
    assert "OCI config" in verdict.summary
    assert verdict.fixes[0].command == "docker run --device /dev/nvidia-uvm ..."


def test_enxio_host_node_with_an_old_number() -> None:
    _, verdict = verdict_for("/dev/nvidia-uvm", 240, 0, err=errno.ENXIO, container=False)
    assert verdict.reason == "no_driver_for_node"
    assert verdict.fixes[0].command == "rm -f /dev/nvidia-uvm && nvidia-modprobe -u -c=0"


def test_enxio_driver_not_loaded() -> None:
    _, verdict = verdict_for("/dev/nvidia-uvm", 240, 0, err=errno.ENXIO, container=False,
                             devices={"1": "mem", "195": "nvidia"})
    assert "its driver is not loaded" in verdict.summary
    assert verdict.fixes[0].command == "nvidia-modprobe -u -c=0"


def test_enxio_absent_gpu_of_a_loaded_driver() -> None:
    _, verdict = verdict_for("/dev/nvidia3", 195, 3, err=errno.ENXIO, container=False)
    assert verdict.reason == "no_driver_for_node" and verdict.confidence == "medium"
    assert "no device at minor 3" in verdict.summary
    assert not any(f.command.startswith("rm ") for f in verdict.fixes)  # its number is right
