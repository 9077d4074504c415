"""The pure parsers: good input, malformed input counted and skipped, never raising."""

from __future__ import annotations

import struct

from hypothesis import given, settings, strategies as st

from tracer.enrichment.container import ContainerClues, detect_container
from tracer.facts import SkipCounter
from tracer.enrichment.node import classify_node
from tracer.enrichment.posix_acl import AclEntry, build_posix_acl, parse_posix_acl
from tracer.enrichment.parse_files import (parse_group_file,
                                           parse_logind_session, parse_nvidia_params,
                                           parse_passwd_file, user_gids)
from tracer.enrichment.device_rules import V1DeviceList, parse_devices_list
from tracer.enrichment.id_map import IdMap
from tracer.enrichment.parse_proc import (mount_holding,
                                          parse_mountinfo, parse_proc_cgroup, parse_proc_devices,
                                          parse_status)


def test_id_map() -> None:
    skips = SkipCounter()
    m = IdMap.parse("         0       1000          1\n1 100000 65536\nbad line\n5 5 0\n", skips)
    assert m.rows() == [[0, 1000, 1], [1, 100000, 65536]]
    assert skips.counts == {"id_map:bad_line": 1, "id_map:bad_range": 1}
    assert m.to_inside(1000) == 0 and m.to_inside(100026) == 27
    assert m.to_inside(27) is None and m.to_outside(27) == 100026
    assert IdMap.from_rows(m.rows()) == m


def test_mountinfo_escapes_and_holding_mount() -> None:
    skips = SkipCounter()
    text = ("22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
            "60 22 0:40 / /srv/my\\040dir rw,nodev shared:3 master:1 - tmpfs tmpfs rw\n"
            "61 22 0:41 / /srv/my\\040dir/sub ro - tmpfs tmpfs ro\n"
            "garbage\n")
    mounts = parse_mountinfo(text, skips)
    assert [m.mount_point for m in mounts] == ["/", "/srv/my dir", "/srv/my dir/sub"]
    assert skips.counts == {"mountinfo:no_separator": 1}
    assert mount_holding("/srv/my dir/nvidia0", mounts).mount_id == 60
    assert mount_holding("/srv/my dir/sub/x", mounts).mount_id == 61
    assert mount_holding("/srv/my dirx", mounts).mount_id == 22


def test_status_and_cgroup() -> None:
    skips = SkipCounter()
    status = parse_status("Name:\tsleep\nGroups:\t27 1000 \nNoNewPrivs:\t1\nno colon here\n", skips)
    assert status["Groups"] == "27 1000" and status["NoNewPrivs"] == "1"
    assert skips.counts == {"status:bad_line": 1}
    lines = parse_proc_cgroup("12:devices:/docker/abc\n0::/user.slice\n1:name=systemd:/x\nbad\n",
                              skips)
    assert [(c.hierarchy, c.controllers, c.path) for c in lines] == [
        (12, ("devices",), "/docker/abc"), (0, (), "/user.slice"), (1, ("name=systemd",), "/x")]
    assert skips.counts["cgroup:bad_line"] == 1


def test_proc_devices_and_devices_list() -> None:
    skips = SkipCounter()
    majors = parse_proc_devices("Character devices:\n195 nvidia-frontend\n234 nvidia-uvm\n"
                                "\nBlock devices:\n  8 sd\nxx yy\n", skips)
    assert majors == {195: "nvidia-frontend", 234: "nvidia-uvm"}
    rules = parse_devices_list("c 195:* rw\nc 1:3 rwm\nb *:* m\nc 1:x rwm\nz 1:1 r\nc 2:2 rq\n", skips)
    assert [r.to_text() for r in rules] == ["c 195:* rw", "c 1:3 rwm", "b *:* m"]
    assert skips.counts["devices_list:bad_line"] == 3
    allowlist = V1DeviceList.from_rules(rules)
    assert allowlist.may("c", 195, 0, "rw").allowed
    assert not allowlist.may("c", 195, 0, "rwm").allowed
    assert not allowlist.may("c", 226, 128, "r").allowed


def test_group_passwd_and_login_groups() -> None:
    skips = SkipCounter()
    groups = parse_group_file("video:x:27:alice,bob\nrender:x:109:\nbroken:x:zz:\n", skips)
    users = parse_passwd_file("alice:x:1000:1000:A:/home/alice:/bin/sh\nshort:x:1\n", skips)
    assert skips.counts == {"group:bad_line": 1, "passwd:bad_line": 1}
    assert user_gids(users[0], groups) == [27, 1000]


def test_nvidia_params_are_decimal() -> None:
    skips = SkipCounter()
    params = parse_nvidia_params('DeviceFileMode: 432\nRegistryDwords: ""\nbad line here\n', skips)
    assert params == {"DeviceFileMode": 432, "RegistryDwords": ""}
    assert oct(params["DeviceFileMode"]) == "0o660"  # type: ignore[arg-type]
    assert skips.counts == {"nvidia_params:bad_line": 1}


def test_logind_session() -> None:
    skips = SkipCounter()
    fields = parse_logind_session("# comment\nUID=1000\nSEAT=seat0\nno equals\n", skips)
    assert fields == {"UID": "1000", "SEAT": "seat0"}
    assert skips.counts == {"logind_session:bad_line": 1}


def test_posix_acl_binary_format() -> None:
    skips = SkipCounter()
    entries = [AclEntry("user_obj", 6, None), AclEntry("user", 6, 1000),
               AclEntry("group_obj", 6, None), AclEntry("mask", 6, None),
               AclEntry("other", 0, None)]
    raw = build_posix_acl(entries)
    assert raw[:4] == b"\x02\x00\x00\x00" and len(raw) == 4 + 8 * 5
    assert raw[12:20] == struct.pack("<HHI", 0x02, 6, 1000)
    assert parse_posix_acl(raw, skips) == entries
    assert parse_posix_acl(raw[:-3], skips) is None
    assert parse_posix_acl(b"\x01\x00\x00\x00" + raw[4:], skips) is None
    assert parse_posix_acl(raw[:4] + struct.pack("<HHI", 0x40, 6, 0), skips) is None
    assert parse_posix_acl(raw[:4] + struct.pack("<HHI", 0x02, 6, 0xFFFFFFFF), skips) is None
    assert skips.counts == {"acl:bad_length": 1, "acl:bad_version": 1, "acl:bad_entry": 1,
                            "acl:bad_id": 1}


def test_node_classes() -> None:
    majors = {195: "nvidia-frontend", 234: "nvidia-uvm", 235: "nvidia-caps",
              236: "nvidia-nvswitch", 226: "drm", 490: "nvhost-ctrl-gpu"}
    cases = [("/dev/nvidia0", 195, 0, "nvidia-gpu"), ("/dev/nvidiactl", 195, 255, "nvidiactl"),
             ("/dev/nvidia-modeset", 195, 254, "nvidia-modeset"),
             ("/dev/nvidia-uvm", 234, 0, "nvidia-uvm"),
             ("/dev/nvidia-uvm-tools", 234, 1, "nvidia-uvm-tools"),
             ("/dev/nvidia-caps/nvidia-cap1", 235, 1, "nvidia-caps"),
             ("/dev/nvidia-nvswitch0", 236, 0, "nvidia-nvswitch"),
             ("/dev/dri/renderD128", 226, 128, "drm-render"), ("/dev/dri/card0", 226, 0, "drm-card"),
             ("/dev/nvmap", 10, 120, "tegra-nvmap"), ("/dev/nvhost-ctrl-gpu", 490, 0, "tegra-nvhost"),
             ("/dev/nvgpu/igpu0/power", None, None, "tegra-nvgpu"),
             ("/dev/gttest-renamed", 226, 129, "drm-render"), ("/dev/null", 1, 3, "unknown")]
    for path, major, minor, cls in cases:
        assert classify_node(path, major, minor, majors) == cls, path


def test_container_detection_clues() -> None:
    cid = "a" * 64
    found = detect_container(ContainerClues(
        cgroup_paths=[f"/kubepods.slice/kubepods-besteffort.slice/cri-containerd-{cid}.scope"]))
    assert found["engine"][0] == "containerd" and found["kubernetes"][0] is True
    assert found["id"][0] == cid
    found = detect_container(ContainerClues(cgroup_paths=[f"/machine.slice/crio-{cid}.scope"]))
    assert found["engine"][0] == "cri-o"
    found = detect_container(ContainerClues(cgroup_paths=["/lxc.payload.web1/init.scope"],
                                            userns_level=1, userns_owner_uid=0))
    assert found["engine"][0] == "lxc" and found["name"][0] == "web1"
    assert found["rootless"][0] is False
    found = detect_container(ContainerClues(env_container="podman",
                                            state_dirs={"crun": "/run/user/1000/crun"},
                                            userns_level=1, userns_owner_uid=1000))
    assert found["engine"][0] == "podman" and found["runtime"][0] == "crun"
    assert found["rootless"] == (True, "userns level and owner uid (kernel)")
    assert detect_container(ContainerClues(cgroup_paths=["/user.slice/session-2.scope"])) == {}


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_text_parsers_never_raise(text: str) -> None:
    skips = SkipCounter()
    for parse in (IdMap.parse, parse_mountinfo, parse_status, parse_proc_cgroup,
                  parse_proc_devices, parse_devices_list, parse_group_file, parse_passwd_file,
                  parse_nvidia_params, parse_logind_session):
        parse(text, skips)  # type: ignore[operator]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_acl_parser_never_raises(raw: bytes) -> None:
    parse_posix_acl(raw, SkipCounter())


def test_text_memo_parses_a_text_once_and_counts_its_skips_for_every_caller() -> None:
    from tracer.enrichment.parse_files import TextMemo
    calls: list[str] = []

    def pairs(text: str, skips: SkipCounter) -> tuple[tuple[str, int], ...]:
        calls.append(text)
        return tuple((g.name, g.gid) for g in parse_group_file(text, skips))
    memo = TextMemo(pairs, max_entries=2, max_bytes=1 << 10)
    text = "video:x:44:\nbad line\nrender:x:105:\n"
    first, second = SkipCounter(), SkipCounter()
    assert memo(text, first) == (("video", 44), ("render", 105))
    assert memo(text, second) == (("video", 44), ("render", 105))
    assert calls == [text]  # parsed once
    assert first.counts == second.counts == {"group:bad_line": 1}  # each caller's own count
    assert memo(text + "gpu:x:7:\n", SkipCounter())[-1] == ("gpu", 7)  # another text: parsed
    memo("a:x:1:\n", SkipCounter())  # a third text: the oldest goes (2 entries)
    memo(text, SkipCounter())
    assert calls.count(text) == 2 and len(memo) == 2
    big = "g:x:1:\n" * 2000  # larger than the memo keeps: parsed every time, never held
    memo(big, SkipCounter())
    memo(big, SkipCounter())
    assert calls.count(big) == 2 and big not in memo._items


def test_procfs_reads_to_the_end_or_the_limit(tmp_path) -> None:
    from tracer.enrichment import procfs
    path = tmp_path / "f"
    data = bytes(range(256)) * 300  # larger than one read
    path.write_bytes(data)
    assert procfs.read_bytes(str(path)) == data
    assert procfs.read_bytes(str(path), 1000) == data[:1000]
    assert procfs.read_bytes(str(path), 70000) == data[:70000]
    assert procfs.read_bytes(str(tmp_path / "absent")) is None
    assert procfs.read_bytes(str(tmp_path)) is None  # a directory
    status = procfs.read_text("/proc/self/status")
    assert status is not None and status.startswith("Name:") and "\nGroups:" in status
