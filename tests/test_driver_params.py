"""The NVIDIA driver's device-file parameters and the container toolkit's
config.toml (issue 18 item 5), on fixture trees (no driver is loaded here):
modprobe.d in kmod's precedence, the kernel's reading of a value (the
decimal-mode trap: 666 without its leading 0 is mode 01232), /proc/driver/
nvidia/params in decimal, and `no-cgroups`; then the verdicts they explain."""

from __future__ import annotations

import errno
import json
import os
import shutil
from typing import Any, Optional

import pytest

from tests.test_enrichment_fixtures import HOSTS, denial
from tracer.enrichment.driver_params import (device_file_policy, kernel_uint,
                                             loaded_driver_version, modprobe_files,
                                             parse_modprobe_conf)
from tracer.enrichment.enricher import Enricher
from tracer.enrichment.node import FixtureNodeStats
from tracer.enrichment.toolkit_config import read_toolkit_config, toolkit_settings
from tests.support.fact_events import denial_with_facts
from tracer.event import UserNs
from tracer.facts import SkipCounter
from tracer.host import HostPaths
from tracer.verdict.explain import explain


@pytest.mark.parametrize("text,value", [
    ("0666", 0o666), ("666", 666), ("0x1b6", 0o666), ("0X1B6", 0o666), ("+0660", 0o660),
    ("438", 438), ("0", 0), ("08", None), ("abc", None), ("", None), ("4294967296", None),
    ("-1", None), ("6 6", None)])
def test_kernel_reads_module_parameters_with_base_0(text: str, value: Optional[int]) -> None:
    assert kernel_uint(text) == value


def test_modprobe_conf_lines() -> None:
    text = ("# the driver's defaults\n"
            "options nvidia NVreg_DeviceFileGID=44 \\\n"
            "    NVreg_DeviceFileMode=0660 # trailing comment\n"
            "options nvidia-drm modeset=1 NVreg_DeviceFileMode=0600\n"
            "options nvidia-current NVreg_DeviceFileUID=\"0\" NVreg_EnableMSI=1\n"
            "options nvidia broken\n"
            "install nvidia /bin/true\n")
    skips = SkipCounter()
    found = parse_modprobe_conf(text, "/etc/modprobe.d/nv.conf", skips)
    assert [(o.source, o.param, o.raw) for o in found] == [
        ("/etc/modprobe.d/nv.conf:2", "NVreg_DeviceFileGID", "44"),
        ("/etc/modprobe.d/nv.conf:2", "NVreg_DeviceFileMode", "0660"),
        ("/etc/modprobe.d/nv.conf:5", "NVreg_DeviceFileUID", "0")]
    assert skips.counts == {"modprobe_conf:bad_option": 1}


def tree(tmp_path: Any, files: dict[str, str]) -> HostPaths:
    for name, text in files.items():
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_text(text)
    return HostPaths.under(str(tmp_path))


def test_precedence_and_the_decimal_trap(tmp_path) -> None:
    host = tree(tmp_path, {
        "usr/lib/modprobe.d/nvidia.conf": "options nvidia NVreg_DeviceFileMode=0600\n",
        "etc/modprobe.d/nvidia.conf": "options nvidia NVreg_DeviceFileGID=44\n"
                                      "options nvidia NVreg_DeviceFileMode=666\n",
        "usr/lib/modprobe.d/50-distro.conf": "options nvidia NVreg_DeviceFileGID=27\n",
        "proc/cmdline": "BOOT_IMAGE=/vmlinuz ro quiet\n"})
    assert [os.path.relpath(p, tmp_path) for p in modprobe_files(host)] == \
        ["usr/lib/modprobe.d/50-distro.conf", "etc/modprobe.d/nvidia.conf"]
    policy, origin = device_file_policy(host)
    assert policy is not None and origin == "modprobe.d and /proc/cmdline"
    mode = policy["mode"]
    assert (mode["value"], mode["octal"], mode["loaded"]) == (666, "1232", False)
    assert mode["decimal_trap"] is True and mode["intended"] == "0666"
    assert mode["configured"]["source"] == str(tmp_path / "etc/modprobe.d/nvidia.conf") + ":2"
    assert policy["gid"]["value"] == 44  # nvidia.conf is read after 50-distro.conf


def test_loaded_params_are_decimal_and_win(tmp_path) -> None:
    host = tree(tmp_path, {
        "proc/driver/nvidia/params": "ModifyDeviceFiles: 1\nDeviceFileUID: 0\n"
                                     "DeviceFileGID: 44\nDeviceFileMode: 438\n",
        "proc/driver/nvidia/version": "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64"
                                      "  560.35.03  Release Build\n",
        "etc/modprobe.d/nvidia.conf": "options nvidia NVreg_DeviceFileMode=0660\n",
        "proc/cmdline": "nvidia.NVreg_DeviceFileGID=27\n"})
    policy, origin = device_file_policy(host)
    assert policy is not None and origin.endswith("proc/driver/nvidia/params")
    assert policy["mode"]["octal"] == "0666" and policy["mode"]["loaded"] is True
    assert "decimal_trap" not in policy["mode"]
    assert policy["mode"]["configured"]["value"] == 0o660  # configured, not what was loaded
    assert policy["gid"]["configured"]["source"] == str(tmp_path / "proc/cmdline")
    assert loaded_driver_version(host) == "560.35.03"


def test_params_alone_show_the_trap(tmp_path) -> None:
    host = tree(tmp_path, {"proc/driver/nvidia/params": "DeviceFileMode: 666\n"})
    policy, _ = device_file_policy(host)
    assert policy is not None and policy["mode"]["decimal_trap"] is True
    host = tree(tmp_path / "b", {"proc/driver/nvidia/params": "DeviceFileMode: 420\n"})
    policy, _ = device_file_policy(host)
    assert policy is not None and "decimal_trap" not in policy["mode"]  # 420 is 0644


def gpubox_with(tmp_path: Any, params: str, modprobe: Optional[str], mode: str) -> Enricher:
    """report-gpubox (Gentoo, driver 550) with other driver parameters and /dev/nvidia0
    as the driver made it with them."""
    root = tmp_path / "host"
    shutil.copytree(os.path.join(HOSTS, "report-gpubox"), root, symlinks=True)
    (root / "proc/driver/nvidia/params").write_text(params)
    if modprobe is not None:
        os.makedirs(root / "etc/modprobe.d", exist_ok=True)
        (root / "etc/modprobe.d/nvidia.conf").write_text(modprobe)
    stats = json.loads((root / "node-stats.json").read_text())
    stats["/dev/nvidia0"] = {"mode": mode, "uid": 0, "gid": 27, "major": 195, "minor": 0}
    (root / "node-stats.json").write_text(json.dumps(stats))
    return Enricher(HostPaths.under(str(root)), stat_node=FixtureNodeStats(str(root / "node-stats.json")))


def test_decimal_mode_trap_explains_the_node_s_mode(tmp_path) -> None:
    """NVreg_DeviceFileMode=666: nodes get 01232 (-w--wx-w-, sticky); alice (video)
    cannot read /dev/nvidia0.  The first fix is the same line with its leading 0."""
    enricher = gpubox_with(tmp_path, "DeviceFileGID: 27\nDeviceFileMode: 666\n",
                           "options nvidia NVreg_DeviceFileGID=27 NVreg_DeviceFileMode=666\n",
                           "021232")
    event = denial(100, "/dev/nvidia0", uid=1000, gid=1000, groups=(27, 1000))
    verdict = explain(event, enricher)
    assert event.facts.get("node.mode") == "1232"
    assert verdict.reason == "mode_restrictive" and verdict.confidence == "high"
    assert "NVreg_DeviceFileMode=666" in verdict.summary and "has no leading 0" in verdict.summary
    assert "octal 1232, not 0666" in verdict.summary
    assert verdict.fixes[0].command == "options nvidia NVreg_DeviceFileMode=0666"
    assert verdict.fixes[0].where.endswith("etc/modprobe.d/nvidia.conf")
    assert verdict.fixes[1].command == "chmod 0666 /dev/nvidia0"
    assert any("gives its nodes group 27" in n for n in verdict.notes)


def test_a_mode_written_right_is_only_a_note(tmp_path) -> None:
    enricher = gpubox_with(tmp_path, "DeviceFileGID: 27\nDeviceFileMode: 432\n", None, "020660")
    verdict = explain(denial(100, "/dev/nvidia0", uid=1001, gid=1001, groups=(1001,)), enricher)
    assert verdict.reason == "not_in_group"
    assert "leading 0" not in verdict.summary
    assert any("gives its nodes mode 0660" in n for n in verdict.notes)


def toolkit(tmp_path: Any, text: str) -> dict[str, Any]:
    host = tree(tmp_path, {"etc/nvidia-container-runtime/config.toml": text})
    config = read_toolkit_config(host)
    assert config is not None
    return toolkit_settings(config)


def test_toolkit_settings_and_defaults(tmp_path) -> None:
    assert toolkit(tmp_path / "a", "[nvidia-container-cli]\nno-cgroups = true\nuser = 'root:video'\n") \
        == {"path": str(tmp_path / "a/etc/nvidia-container-runtime/config.toml"),
            "no_cgroups": True, "mode": "auto", "user": "root:video", "defaults": ["mode"]}
    settings = toolkit(tmp_path / "b", "disable-require = false\n")
    assert settings["no_cgroups"] is False and settings["defaults"] == ["no_cgroups", "mode"]
    # a value of the wrong type is no setting the toolkit runs with: unknown, not the default
    odd = toolkit(tmp_path / "d", "[nvidia-container-cli]\nno-cgroups = \"true\"\n"
                                  "[nvidia-container-runtime]\nmode = 1\n")
    assert odd["no_cgroups"] is None and odd["mode"] is None and odd["defaults"] == []
    broken = toolkit(tmp_path / "c", "[nvidia-container-cli\n")
    assert "error" in broken and "no_cgroups" not in broken


def eperm_in_container(config: dict[str, Any], rootless: bool = False) -> Any:
    """Root in a docker container refused /dev/nvidia0 by a device cgroup without 195."""
    facts = {"node.mode": "0666", "node.gid": 0, "node.class": "nvidia-gpu",
             "userns.level": 1 if rootless else 0,
             "userns.uid_map": [[0, 1000, 1]] if rootless else None,
             "userns.gid_map": [[0, 1000, 1]] if rootless else None,
             "container.engine": "docker", "container.rootless": rootless,
             "device_cgroup.v1_rules": ["c 1:3 rwm", "c 136:* rwm"],
             "nvidia.toolkit_config": config}
    userns = UserNs(4026532999, 1, 1000) if rootless else None
    return denial_with_facts("/dev/nvidia0", 195, 0, errno.EPERM, facts, caps=0xA80425FB,
                             userns=userns)[2]


def test_no_cgroups_true_with_a_rootful_container() -> None:
    config = {"path": "/etc/nvidia-container-runtime/config.toml", "no_cgroups": True,
              "mode": "legacy", "user": None, "defaults": []}
    verdict = eperm_in_container(config)
    assert verdict.reason == "device_cgroup"
    assert "sets no-cgroups = true" in verdict.summary and "rootful" in verdict.summary
    assert verdict.fixes[0].command == "[nvidia-container-cli]\nno-cgroups = false"
    assert verdict.fixes[1].command == "docker run --device nvidia.com/gpu=all ..."
    cdi_mode = eperm_in_container(dict(config, mode="cdi"))  # the hook is not used in CDI mode
    assert "no-cgroups" not in cdi_mode.summary


def test_no_cgroups_false_in_a_rootless_container_is_a_note() -> None:
    config = {"path": "/etc/nvidia-container-runtime/config.toml", "no_cgroups": False,
              "mode": "auto", "user": None, "defaults": ["mode"]}
    verdict = eperm_in_container(config, rootless=True)
    assert "no-cgroups" not in verdict.summary
    assert any("no-cgroups = false: the NVIDIA hook fails in rootless" in n for n in verdict.notes)
