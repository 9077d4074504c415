"""CDI devices by real podman 4.3 (issue 18 item 4): a spec written into /etc/cdi
under a kind no one else uses (removed afterwards), `podman run --device
KIND=NAME` (rootful, runc), a denial inside, and the verdict naming the CDI
device and its spec file.

* A spec without the node's gid (NVIDIA/nvidia-container-toolkit#1631): the
  runtime makes /dev/nvidia0 with group 0; an entrypoint that becomes
  1000:GID (as `gosu 1000:video` would) is refused (EACCES), although the host
  node's group GID would let it in.
* A stale spec: it writes the node's type and major (taken as written) from
  before the host node got its number now; the runtime makes the container's
  node with the old number, which no driver answers (ENXIO).
"""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from tests.support import podman as podman_support
from tests.support.held_container import HOLD_S, Tracked, tracked_podman  # noqa: F401
from tests.support.probe import probe_binary
from tests.support.scenario_workspace import Scenario
from tests.test_node_numbers_real import dynamic_majors

pytestmark = [pytest.mark.kernel, pytest.mark.podman]
WATCHED_ERRNOS = (errno.EACCES, errno.EPERM, errno.ENXIO)
CDI_DIR = "/etc/cdi"
DROPGROUPS_C = os.path.join(os.path.dirname(__file__), "fixtures", "rootfs", "dropgroups.c")


def write_spec(scenario: Scenario, nodes: str) -> tuple[str, str]:
    """A spec of kind gttest-TOKEN.example/gpu with device "0"; (its path, the kind)."""
    if not os.path.isdir(CDI_DIR):
        os.makedirs(CDI_DIR, 0o755, exist_ok=True)
        scenario.created("dir", CDI_DIR)
    kind = f"gttest-{scenario.token}.example/gpu"
    path = os.path.join(CDI_DIR, f"gttest-{scenario.name}-{scenario.token}.yaml")
    with open(path, "w", encoding="utf-8") as spec:
        spec.write(f'cdiVersion: "0.5.0"\nkind: {kind}\ndevices:\n- name: "0"\n'
                   f"  containerEdits:\n    deviceNodes:\n{nodes}")
    scenario.created("file", path)
    return path, kind


def rootfs_with_dropgroups(scenario: Scenario) -> str:
    rootfs = podman_support.build_rootfs(os.path.join(scenario.workdir, "rootfs"),
                                         probe_binary(), podman_support.RootfsFiles())
    subprocess.run(["gcc", "-static", "-Os", "-Wall", "-o",
                    os.path.join(rootfs, "bin", "dropgroups"), DROPGROUPS_C],
                   check=True, capture_output=True, timeout=120)
    return rootfs


def test_cdi_spec_without_the_node_s_gid(tracked_podman: Tracked) -> None:
    inside = "/dev/nvidia0"
    with Scenario("h18b-cdi-gid") as scenario:
        group = scenario.group("video")
        node = scenario.nvidia_node(0o660, group.gr_gid)
        spec, kind = write_spec(scenario, f"    - path: {inside}\n"
                                          f"      hostPath: {node.path}\n"
                                          "      fileMode: 432\n")        # 0660, no gid
        rootfs = rootfs_with_dropgroups(scenario)
        event, facts, verdict = tracked_podman.explain_held(
            scenario, rootfs, ["--device", f"{kind}=0"],
            ["/bin/dropgroups", "1000", str(group.gr_gid), "/gtprobe", inside, str(HOLD_S),
             scenario.token], inside)
    assert event.errno == errno.EACCES and event.process.fsgid == group.gr_gid
    assert facts.get("node.gid") == 0                 # the container's node, as runc made it
    entry = facts.get("cdi.devices")[0]
    assert (entry["device"], entry["spec"], entry["host_node"]["gid"]) == \
        (f"{kind}=0", spec, group.gr_gid)
    assert "no_gid" in entry["stale"]
    assert f"the CDI device {kind}=0 ({spec}) lists it without a gid" in verdict.summary
    assert f"not to the host node's gid {group.gr_gid}" in verdict.summary
    assert verdict.confidence == "high"
    assert (verdict.fixes[0].command, verdict.fixes[0].where) == \
        (f"gid: {group.gr_gid}", f"{spec}, the deviceNodes entry for {inside}")
    assert not any("udev" in f.where for f in verdict.fixes)  # the host node is right


def test_stale_cdi_spec_gives_a_node_no_driver_answers(tracked_podman: Tracked) -> None:
    inside = "/dev/nvidia-uvm"
    major, driver, stale = dynamic_majors()
    with Scenario("h18b-cdi-stale") as scenario:
        node = scenario.node(major, range(200, 250), "gttest-h18b-cdi{minor}", 0o666, 0)
        spec, kind = write_spec(scenario, f"    - path: {inside}\n"
                                          f"      hostPath: {node.path}\n"
                                          f"      type: c\n      major: {stale}\n"
                                          f"      minor: {node.minor}\n")
        rootfs = podman_support.build_rootfs(os.path.join(scenario.workdir, "rootfs"),
                                             probe_binary(), podman_support.RootfsFiles())
        event, facts, verdict = tracked_podman.explain_held(
            scenario, rootfs, ["--device", f"{kind}=0"],
            ["/gtprobe", inside, str(HOLD_S), scenario.token], inside)
    assert event.errno == errno.ENXIO
    assert (facts.get("node.major"), facts.get("node.minor")) == (stale, node.minor)
    entry = facts.get("cdi.devices")[0]
    assert entry["device"] == f"{kind}=0" and entry["spec"] == spec
    assert {"renumbered", "no_driver"} <= set(entry["stale"])
    assert verdict.reason == "no_driver_for_node" and verdict.confidence == "high"
    assert (f"{inside} is c {stale}:{node.minor} (the CDI device {kind}=0 in {spec} wrote it), "
            f"but no driver has major {stale} now; the spec's host node {node.path} is "
            f"c {major}:{node.minor} ({driver}): the spec is stale") in verdict.summary
    assert (verdict.fixes[0].command, verdict.fixes[0].where) == \
        (f"major: {major}", f"{spec}, the deviceNodes entry for the node")
    assert verdict.fixes[1].command == f"podman run --device {kind}=0 ..."
