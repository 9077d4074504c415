"""CDI specs as one model (issue 18 item 4), on fixture trees: YAML and JSON specs
in the injected spec directories, the device that names a refused node, whether
its spec is stale for this host (nodes gone or renumbered, a number no driver
has, a missing gid, another driver version, unreadable by a rootless user), and
the verdict's story.  Real podman: tests/test_cdi_real.py."""

from __future__ import annotations

import errno
import json
import os
from typing import Any

from tracer.enrichment.cdi_facts import cdi_device_facts
from tracer.enrichment.cdi_specs import devices_naming, parse_spec, read_specs
from tracer.enrichment.host_snapshot import cdi_specs
from tracer.enrichment.node import FixtureNodeStats
from tests.support.fact_events import denial_with_facts
from tracer.facts import Facts
from tracer.host import HostPaths

SPEC = """cdiVersion: 0.5.0
kind: nvidia.com/gpu
containerEdits:
  deviceNodes:
  - path: /dev/nvidiactl
  - path: /dev/nvidia-uvm
    type: c
    major: 240
    minor: 0
  mounts:
  - hostPath: /usr/lib/x86_64-linux-gnu/libcuda.so.550.54.14
    containerPath: /usr/lib/x86_64-linux-gnu/libcuda.so.550.54.14
devices:
- name: "0"
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia0
- name: gone
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia7
"""
STATS = {"/dev/nvidia0": {"mode": "020660", "uid": 0, "gid": 44, "major": 195, "minor": 0},
         "/dev/nvidiactl": {"mode": "020666", "uid": 0, "gid": 0, "major": 195, "minor": 255},
         "/dev/nvidia-uvm": {"mode": "020666", "uid": 0, "gid": 0, "major": 508, "minor": 0}}
DEVICES = "Character devices:\n  1 mem\n  5 /dev/tty\n195 nvidia\n508 nvidia-uvm\n"


def host_tree(tmp_path: Any, specs: dict[str, str]) -> tuple[HostPaths, FixtureNodeStats]:
    for sub in ("proc/driver/nvidia", "etc/cdi", "var/run/cdi", "dev", "sys"):
        os.makedirs(tmp_path / sub, exist_ok=True)
    (tmp_path / "proc/devices").write_text(DEVICES)
    (tmp_path / "proc/driver/nvidia/version").write_text(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  560.35.03  Fri Aug 16 2024\n")
    for name, text in specs.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "stats.json").write_text(json.dumps(STATS))
    return HostPaths.under(str(tmp_path)), FixtureNodeStats(str(tmp_path / "stats.json"))


def test_yaml_and_json_specs_are_one_model(tmp_path) -> None:
    json_spec = {"cdiVersion": "0.6.0", "kind": "vendor.example/accel",
                 "devices": [{"name": "a", "containerEdits": {"deviceNodes": [
                     {"path": "/dev/accel0", "hostPath": "/dev/accel/accel0", "gid": 44}]}}]}
    host, _ = host_tree(tmp_path, {"etc/cdi/nvidia.yaml": SPEC,
                                   "var/run/cdi/accel.json": json.dumps(json_spec),
                                   "etc/cdi/broken.yaml": "kind: [unclosed",
                                   "etc/cdi/notes.txt": "not a spec"})
    specs = {os.path.basename(s.path): s for s in read_specs(host)}
    assert set(specs) == {"nvidia.yaml", "accel.json", "broken.yaml"}
    assert specs["broken.yaml"].error and not specs["broken.yaml"].devices
    nvidia = specs["nvidia.yaml"]
    assert [nvidia.qualified(d) for d in nvidia.devices] == ["nvidia.com/gpu=0", "nvidia.com/gpu=gone"]
    assert nvidia.common.nodes[1].number_as_written == (240, 0)
    assert nvidia.common.nodes[0].number_as_written is None      # the runtime stats the host
    assert nvidia.driver_versions() == ["550.54.14"]
    accel = devices_naming(read_specs(host), "/dev/accel0")
    assert [(m.device, m.node.host_path, m.node.gid) for m in accel] == \
        [("vendor.example/accel=a", "/dev/accel/accel0", 44)]
    # the report's host snapshot reads the same model
    summary = {os.path.basename(s["path"]): s for s in cdi_specs(host)}
    assert summary["accel.json"]["devices"][0]["device_nodes"][0]["host_path"] == "/dev/accel/accel0"
    assert "error" in summary["broken.yaml"]


def test_a_later_directory_wins_for_the_same_device(tmp_path) -> None:
    dynamic = SPEC.replace("major: 240", "major: 508")
    host, _ = host_tree(tmp_path, {"etc/cdi/nvidia.yaml": SPEC,
                                   "var/run/cdi/nvidia.yaml": dynamic})
    matches = devices_naming(read_specs(host), "/dev/nvidia-uvm")
    by_dir = {m.spec.path.split("/")[-3]: m for m in matches}
    assert by_dir["etc"].shadowed_by == str(tmp_path / "var/run/cdi/nvidia.yaml")
    assert by_dir["run"].shadowed_by is None


def test_a_fifo_or_an_oversized_file_is_never_read(tmp_path) -> None:
    host, _ = host_tree(tmp_path, {})
    os.mkfifo(tmp_path / "etc/cdi/fifo.yaml")
    (tmp_path / "etc/cdi/huge.json").write_text(" " * (5 << 20))
    assert read_specs(host) == []  # returned at once: the FIFO did not block


def test_malformed_specs_do_not_raise() -> None:
    for text in ("", "[]", "kind: 5", "devices: 7", "a: &a [*a]", "{" * 5000,
                 "kind: x/y\ndevices: [{name: 1}, {name: z, containerEdits: {deviceNodes: [1, {}]}}]"):
        spec = parse_spec(text, "/x.yaml")
        assert spec.error is not None or spec.kind is not None


def cdi_facts_for(tmp_path: Any, path: str, number: Any) -> list[dict[str, Any]]:
    host, statter = host_tree(tmp_path, {"etc/cdi/nvidia.yaml": SPEC})
    facts = Facts()
    cdi_device_facts(host, statter, path, number, facts, {1: "mem", 5: "/dev/tty", 195: "nvidia",
                                                           508: "nvidia-uvm"})
    return facts.get("cdi.devices")


def test_stale_spec_renumbered_node_and_other_driver(tmp_path) -> None:
    found = cdi_facts_for(tmp_path, "/dev/nvidia-uvm", (240, 0))
    assert [e["device"] for e in found] == ["nvidia.com/gpu=0", "nvidia.com/gpu=gone"]
    entry = found[0]
    assert entry["from_common_edits"] is True
    assert set(entry["stale"]) == {"renumbered", "no_driver", "other_driver_version"}
    assert entry["host_node"]["major"] == 508
    assert (entry["driver_versions"], entry["driver_loaded"]) == (["550.54.14"], "560.35.03")


def test_stale_spec_missing_gid_and_gone_node(tmp_path) -> None:
    assert "no_gid" in cdi_facts_for(tmp_path, "/dev/nvidia0", (195, 0))[0]["stale"]
    gone = cdi_facts_for(tmp_path, "/dev/nvidia7", None)[0]
    assert gone["device"] == "nvidia.com/gpu=gone" and "gone" in gone["stale"]
    assert gone["host_node"] is None


def test_a_spec_writing_the_host_nodes_own_number_is_not_stale_without_a_driver(tmp_path) -> None:
    """No driver has major 195 (none loaded): the spec writes c 195:0 and the host node
    is c 195:0, so the spec is right; the driver is what is missing."""
    host, statter = host_tree(tmp_path, {"etc/cdi/nvidia.yaml": SPEC.replace(
        "    - path: /dev/nvidia0\n",
        "    - path: /dev/nvidia0\n      type: c\n      major: 195\n      minor: 0\n      gid: 44\n")})
    facts = Facts()
    cdi_device_facts(host, statter, "/dev/nvidia0", (195, 0), facts, {1: "mem", 508: "nvidia-uvm"})
    entry = facts.get("cdi.devices")[0]
    assert entry["node"]["major"] == 195 and entry["host_node"]["major"] == 195
    assert "no_driver" not in entry["stale"] and "renumbered" not in entry["stale"]


def test_no_spec_names_the_node(tmp_path) -> None:
    assert cdi_facts_for(tmp_path, "/dev/dri/renderD128", (226, 128)) is None


# ------------------------------------------------------------- the verdict's story

def explained(err: int, path: str, number: tuple[int, int], node_gid: int, groups: list[int],
              cdi: list[dict[str, Any]], rootless: bool = False) -> Any:
    """User 1000 in a rootful or rootless podman container refused `path` (mode 0660)."""
    facts = {"node.mode": "0660", "node.gid": node_gid, "node.class": "nvidia-gpu",
             "host.char_majors": {"195": "nvidia", "508": "nvidia-uvm"},
             "container.engine": "podman", "container.runtime": "runc",
             "container.rootless": rootless, "host.user_uid": 1000,
             "host.user_groups": [1000, 44], "cdi.devices": cdi,
             "device_cgroup.v1_rules": ["c 195:* rwm"]}
    return denial_with_facts(path, number[0], number[1], err, facts, uid=1000,
                             groups=tuple(groups))[2]


def entry(stale: list[str], gid: Any = None, mode: str = "0644") -> dict[str, Any]:
    return {"device": "nvidia.com/gpu=0", "spec": "/etc/cdi/nvidia.yaml",
            "node": {"path": "/dev/nvidia0", "host_path": "/dev/nvidia0", "gid": gid,
                     "major": None, "minor": None},
            "host_node": {"major": 195, "minor": 0, "gid": 44, "uid": 0, "mode": "0660"},
            "stale": stale, "spec_file": {"mode": mode, "uid": 0, "gid": 0},
            "container_node": {"major": 195, "minor": 0, "gid": None, "uid": None}}


def test_missing_gid_is_told_and_fixed_in_the_spec() -> None:
    """NVIDIA/nvidia-container-toolkit#1631: the container's node has group 0; the
    process holds 44, the host node's group."""
    verdict = explained(errno.EACCES, "/dev/nvidia0", (195, 0), 0, [1000, 44],
                        [entry(["no_gid"])])
    assert "not to the host node's gid 44" in verdict.summary
    assert "CDI device nvidia.com/gpu=0 (/etc/cdi/nvidia.yaml) lists it without a gid" \
        in verdict.summary
    assert verdict.confidence == "high"
    assert verdict.fixes[0].command == "gid: 44"
    assert verdict.fixes[0].where == "/etc/cdi/nvidia.yaml, the deviceNodes entry for /dev/nvidia0"
    assert verdict.fixes[1].command == "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml"


def test_a_spec_with_the_gid_is_not_blamed() -> None:
    verdict = explained(errno.EACCES, "/dev/nvidia0", (195, 0), 44, [1000],
                        [entry([], gid=44)])
    assert "without a gid" not in verdict.summary
    assert any("the node the CDI device nvidia.com/gpu=0" in n for n in verdict.notes)
    assert not verdict.fixes[0].command.startswith("gid:")


def test_spec_unreadable_by_the_rootless_user() -> None:
    verdict = explained(errno.EACCES, "/dev/nvidia0", (195, 0), 44, [1000],
                        [entry([], gid=44, mode="0600")], rootless=True)
    assert any("cannot be read by the rootless container's user" in n for n in verdict.notes)


def test_enxio_from_a_stale_spec_names_it_and_fixes_the_spec() -> None:
    """The spec writes c 240:0 for /dev/nvidia-uvm (type+major: taken as written); the
    host node is c 508:0 since the driver was reloaded: the container's node answers
    nothing (ENXIO)."""
    stale = {"device": "vendor.example/gpu=0", "spec": "/etc/cdi/vendor.yaml",
             "node": {"path": "/dev/nvidia-uvm", "host_path": "/dev/nvidia-uvm", "type": "c",
                      "major": 240, "minor": 0, "gid": None},
             "host_node": {"major": 508, "minor": 0, "gid": 0, "uid": 0, "mode": "0666"},
             "stale": ["renumbered", "no_driver"], "spec_file": {"mode": "0644", "uid": 0, "gid": 0},
             "container_node": {"major": 240, "minor": 0, "gid": None, "uid": None}}
    verdict = explained(errno.ENXIO, "/dev/nvidia-uvm", (240, 0), 0, [], [stale])
    assert verdict.reason == "no_driver_for_node" and verdict.confidence == "high"
    assert "no driver has major 240 now; the spec's host node /dev/nvidia-uvm is c 508:0 " \
        "(nvidia-uvm): the spec is stale" in verdict.summary
    assert "(the CDI device vendor.example/gpu=0 in /etc/cdi/vendor.yaml wrote it)" \
        in verdict.summary
    assert (verdict.fixes[0].command, verdict.fixes[0].where) == \
        ("major: 508", "/etc/cdi/vendor.yaml, the deviceNodes entry for the node")
    assert verdict.fixes[1].command == "podman run --device vendor.example/gpu=0 ..."
    nvidia = explained(errno.ENXIO, "/dev/nvidia-uvm", (240, 0), 0, [],
                       [dict(stale, device="nvidia.com/gpu=0", spec="/etc/cdi/nvidia.yaml")])
    assert nvidia.fixes[0].command == "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml"


def test_enxio_when_the_spec_and_the_host_node_agree_blames_the_driver_not_the_spec() -> None:
    """Seen by hand (podman --device KIND=0, a spec writing c 195:174 for a host node
    that is c 195:174, no NVIDIA driver loaded): the verdict called the spec stale and
    offered 'major: 195', the number it already has.  A journal from then carries
    "no_driver" in the entry's stale list; the verdict must not follow it."""
    agree = {"device": "vendor.example/gpu=0", "spec": "/etc/cdi/vendor.yaml",
             "node": {"path": "/dev/nvidia0", "host_path": "/dev/nvidia-gt174", "type": "c",
                      "major": 195, "minor": 174, "gid": 44},
             "host_node": {"major": 195, "minor": 174, "gid": 44, "uid": 0, "mode": "0660"},
             "stale": ["no_driver"], "spec_file": {"mode": "0644", "uid": 0, "gid": 0}}
    facts = {"node.mode": "0666", "node.gid": 0, "node.class": "nvidia-gpu",
             "host.char_majors": {"1": "mem", "5": "/dev/tty"}, "container.engine": "podman",
             "container.runtime": "runc", "cdi.devices": [agree],
             "device_cgroup.v1_rules": ["c 195:174 rwm"]}
    verdict = denial_with_facts("/dev/nvidia0", 195, 174, errno.ENXIO, facts, uid=1000)[2]
    assert verdict.reason == "no_driver_for_node"
    assert "its driver is not loaded" in verdict.summary, verdict.summary
    assert "stale" not in verdict.summary
    assert not any(f.command.startswith("major:") for f in verdict.fixes), verdict.fixes


def test_an_aliased_cdi_version_is_not_expanded() -> None:
    """cdiVersion as an alias of a nested list (a billion laughs: 9**8 strings) was
    turned into text whole: 10 s and 350 MiB at 9**8, ten times that at 9**9."""
    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefg", "bcdefgh"):
        levels.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    spec = parse_spec("\n".join(levels) + "\nkind: x.com/y\ncdiVersion: *h\ndevices: []\n", "/x")
    assert spec.kind == "x.com/y" and spec.version is None
