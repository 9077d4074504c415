"""Every reason code, decided from recorded host trees."""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest

from tests.test_enrichment_fixtures import HOSTS, denial, fixture_enricher, gentoo_denial
from tracer.verdict import reasons as R
from tracer.verdict.explain import explain
from tracer.verdict.reasons import Fix, Verdict


def _commands(verdict: Verdict) -> list[str]:
    return [f.command for f in verdict.fixes]


def test_group_dropped_in_userns_rootless_podman_runc() -> None:
    event = gentoo_denial()
    verdict = explain(event, fixture_enricher("gentoo-rootless-podman"))
    assert verdict.reason == R.GROUP_DROPPED_IN_USERNS and verdict.confidence == "high"
    assert verdict.check == "dac_other"
    commands = _commands(verdict)
    assert commands[0] == "podman run --runtime crun --group-add keep-groups ..."
    assert any("run.oci.keep_original_groups=1" in c for c in commands)
    assert "podman run --userns keep-id ..." in commands
    mode_fix = next(f for f in verdict.fixes if "NVreg_DeviceFileMode=0666" in f.command)
    assert mode_fix.applies_to == "host" and mode_fix.security_note
    assert any("runc cannot keep supplementary groups" in n for n in verdict.notes)
    evidence = {e.fact: e for e in verdict.evidence}
    assert evidence["host.user_groups"].value == [10, 27, 1000]
    assert evidence["node.gid_in_container"].value == 65534
    assert evidence["process.groups"].source == "kernel"
    assert event.verdict is not None and event.verdict["reason"] == R.GROUP_DROPPED_IN_USERNS
    assert "video" in verdict.summary and "27" in verdict.summary


def test_capability_required_root_in_rootless_userns() -> None:
    event = gentoo_denial(pid=4250, path="/dev/nvidia-caps/nvidia-cap1", flags=os.O_RDONLY)
    verdict = explain(event, fixture_enricher("gentoo-rootless-podman"))
    assert verdict.reason == R.CAPABILITY_REQUIRED
    assert "not mapped" in verdict.model_detail


def test_seat_acl_only_for_ssh_user() -> None:
    event = denial(500, "/dev/dri/renderD128", uid=1001, gid=1001, groups=(1001,),
                   mntns=4026531841)
    verdict = explain(event, fixture_enricher("jetson-jp61"))
    assert verdict.reason == R.SEAT_ACL_ONLY and verdict.confidence == "high"
    assert verdict.fixes[0].command == "usermod -aG render bob"
    assert "logind.sessions" in {e.fact for e in verdict.evidence}


def test_not_in_group_without_acl_names_group_and_gid() -> None:
    event = denial(500, "/dev/dri/renderD128", uid=1001, gid=1001, groups=(1001,),
                   mntns=4026531841)
    verdict = explain(event, fixture_enricher("jetson-jp61", "node-stats-noacl.json"))
    assert verdict.reason == R.NOT_IN_GROUP
    assert "render" in verdict.summary and "109" in verdict.summary
    assert verdict.fixes[0].applies_to == "host"


def test_a_node_of_the_root_group_is_never_fixed_by_joining_root() -> None:
    """0660 root:root: the user is 'not in the group', but joining gid 0 would open
    every root-group file; the fix gives the node a GPU group instead."""
    event = denial(500, "/dev/dri/renderD128", uid=1001, gid=1001, groups=(1001,),
                   mntns=4026531841)
    verdict = explain(event, fixture_enricher("jetson-jp61", "node-stats-rootgroup.json"))
    assert verdict.reason == R.NOT_IN_GROUP
    commands = _commands(verdict)
    assert not any("usermod -aG root" in c or "--group-add 0 " in c
                   or "supplementalGroups: [0]" in c for c in commands), commands
    assert commands[0] == 'KERNEL=="renderD128", GROUP="render", MODE="0660"'


def test_gid_mismatch_in_container() -> None:
    event = denial(600, "/dev/dri/renderD128", uid=1000, gid=1000, groups=(995,),
                   mntns=4026532610)
    verdict = explain(event, fixture_enricher("jetson-jp61", "node-stats-noacl.json"))
    assert verdict.reason == R.GID_MISMATCH_IN_CONTAINER and verdict.confidence == "high"
    assert verdict.fixes[0].command == "docker run --group-add 109 ..."
    assert "995" in verdict.summary and "109" in verdict.summary


def test_device_cgroup_eperm() -> None:
    event = denial(700, "/dev/nvidia0", errno.EPERM, caps=0xA80425FB, mntns=4026532700)
    verdict = explain(event, fixture_enricher("cgroup-v1-host"))
    assert verdict.reason == R.DEVICE_CGROUP and verdict.confidence == "high"
    assert verdict.check == "device_cgroup"
    assert verdict.fixes[0].command == "docker run --device /dev/nvidia0 ..."


def test_nodev_mount() -> None:
    event = denial(710, "/srv/gttest/nvidia0", uid=1000, gid=1000, groups=(44, 1000),
                   mntns=4026531841)
    verdict = explain(event, fixture_enricher("cgroup-v1-host"))
    assert verdict.reason == R.NODEV_MOUNT
    assert any(f.command == "mount -o remount,dev /srv/gttest" for f in verdict.fixes)


def test_lsm_denied_selinux_container() -> None:
    event = denial(720, "/dev/nvidia0", caps=0xA80425FB, uid=0, mntns=4026532720)
    verdict = explain(event, fixture_enricher("cgroup-v1-host"))
    assert verdict.reason == R.LSM_DENIED and verdict.confidence == "medium"
    assert "setsebool -P container_use_devices true" in _commands(verdict)
    evidence = {e.fact: e.value for e in verdict.evidence}
    assert evidence["node.selinux"].startswith("system_u:object_r:xserver_misc_device_t")


def test_mode_restrictive_tegra_nvmap() -> None:
    event = denial(730, "/dev/nvmap", uid=1000, gid=1000, groups=(44, 1000), mntns=4026531841)
    verdict = explain(event, fixture_enricher("cgroup-v1-host"))
    assert verdict.reason == R.MODE_RESTRICTIVE
    assert 'KERNEL=="nvmap", GROUP="video", MODE="0660"' in _commands(verdict)


def test_node_missing_enoent() -> None:
    event = denial(730, "/dev/nvidia-uvm", errno.ENOENT, uid=1000, gid=1000, mntns=4026531841)
    verdict = explain(event, fixture_enricher("cgroup-v1-host"))
    assert verdict.reason == R.NODE_MISSING
    # the fixture host has neither /dev/nvidia-uvm nor nvidia-modprobe: install it, then run it
    assert [f.command for f in verdict.fixes[:2]] == ["apt-get install nvidia-modprobe",
                                                      "nvidia-modprobe -u -c=0"]
    evidence = {e.fact: e.value for e in verdict.evidence}
    assert "234" not in evidence["host.gpu_char_majors"]  # nvidia-uvm not loaded


@pytest.mark.parametrize("err", [errno.EACCES, errno.EPERM])
def test_node_removed_after_a_refusal_is_never_node_missing(err: int) -> None:
    """EACCES/EPERM prove the kernel found the node; gone at enrichment means removed
    since: unknown, with the node's missing metadata listed, never node_missing."""
    event = denial(730, "/dev/nvidia-uvm", err, uid=1000, gid=1000, mntns=4026531841)
    verdict = explain(event, fixture_enricher("cgroup-v1-host"))
    assert event.facts.get("node.exists") is False
    assert verdict.reason == R.UNKNOWN and verdict.confidence == "low"
    assert "existed when it was checked" in verdict.notes[0]
    assert "nvidia-modprobe -u -c=0" not in _commands(verdict)
    if err == errno.EACCES:
        assert "node.mode" in verdict.notes[1] and "node.acl" in verdict.notes[1]
        assert "removed after the refusal" in verdict.summary
    else:
        assert "seccomp" in verdict.summary


def test_unknown_keeps_every_fact() -> None:
    event = denial(9999, None)  # no path, process gone
    verdict = explain(event, fixture_enricher("cgroup-v1-host"))
    assert verdict.reason == R.UNKNOWN and verdict.confidence == "low"
    assert {e.fact for e in verdict.evidence} >= {"process.fsuid", "process.groups"}


def test_every_reason_has_a_summary_and_fixes() -> None:
    from tracer.verdict.explain import SUMMARIES
    from tracer.verdict.fixes import FIXES
    assert set(SUMMARIES) == set(R.REASONS) == set(FIXES)


def test_verdict_rejects_unknown_codes() -> None:
    with pytest.raises(ValueError):
        Verdict(reason="nope", summary="", confidence="high")
    with pytest.raises(ValueError):
        Fix("x", "y", applies_to="kubectl")


def test_a_process_that_exits_while_it_is_read_is_read_again_as_gone(tmp_path) -> None:
    """Seen under watch: `cat` was alive when its denial was picked up and gone before
    its root was opened; the node 'was removed before gputrace examined it' (unknown),
    and in a podman container an unread device cgroup let seccomp take the blame.  Here
    the process exits as its node is looked up through its root."""
    import shutil
    from tracer.enrichment.enricher import Enricher
    from tracer.enrichment.node import FixtureNodeStats
    from tracer.host import HostPaths
    tree = tmp_path / "host"
    shutil.copytree(os.path.join(HOSTS, "cgroup-v1-host"), tree, symlinks=True)
    fixture = FixtureNodeStats(str(tree / "node-stats.json"))

    def exits_while_read(root: str, path: str) -> Any:
        if "/proc/730/" in root + "/":
            shutil.rmtree(tree / "proc/730")   # it exited just now
            return None                        # its root is gone with it
        return fixture(root, path)
    enricher = Enricher(HostPaths.under(str(tree)), stat_node=exits_while_read)
    event = denial(730, "/dev/nvmap", uid=1000, gid=1000, groups=(44, 1000), mntns=4026531841)
    verdict = explain(event, enricher)
    assert enricher.counters["exited_while_enriched"] == 1
    assert event.facts.get("process.live") is False
    assert event.facts.get("node.exists") is True
    assert verdict.reason == R.MODE_RESTRICTIVE, verdict.to_json()


def test_a_container_reading_cut_short_by_an_exit_is_not_cached(tmp_path) -> None:
    """prime() and the live path cache a process's container-wide facts for its
    userns and cgroup; a reading its exit cut short must not stand for them."""
    import shutil
    from tracer.enrichment.enricher import Enricher
    from tracer.host import HostPaths
    tree = tmp_path / "host"
    shutil.copytree(os.path.join(HOSTS, "cgroup-v1-host"), tree, symlinks=True)

    class ExitsWhileRead(Enricher):
        def _read_shared(self, proc: Any) -> Any:
            shutil.rmtree(tree / "proc/700")   # it exits as its cgroup is read
            return Enricher._read_shared(self, proc)
    enricher = ExitsWhileRead(HostPaths.under(str(tree)))
    event = denial(700, "/dev/nvidia0", errno.EPERM, caps=0xA80425FB, mntns=4026532700,
                   cgroup_id=9700)
    assert not enricher.prime(event.process) or len(enricher.by_cgroup) == 0
    assert len(enricher.by_cgroup) == 0 and enricher.counters["snapshot_not_kept_exited"] == 1
