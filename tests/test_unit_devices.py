"""A systemd unit's device sandboxing, from fixture unit files (issue 18): the unit
named from the cgroup, files and drop-ins merged in systemd's order, and the
verdict naming the property that refused with the DeviceAllow= line that fixes
it, by the major's current /proc/devices name (nixpkgs#331069)."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from tracer.enrichment.systemd_unit import (properties_from_files, systemd_unit_facts,
                                            unit_of_cgroup)
from tracer.event import Event, Node, Process, UserNs
from tracer.facts import KERNEL, LIVE, Facts
from tracer.host import HostPaths
from tracer.verdict.explain import explain_facts

UNIT = """[Unit]
Description=ollama
[Service]
ExecStart=/usr/bin/ollama serve
DynamicUser=yes
DevicePolicy=closed
DeviceAllow=char-nvidiactl
DeviceAllow=char-nvidia-caps
DeviceAllow=char-nvidia-frontend
DeviceAllow=char-nvidia-uvm
"""


@pytest.mark.parametrize("path,expected", [
    ("/system.slice/ollama.service", ("ollama.service", None)),
    ("/user.slice/user-1000.slice/user@1000.service/app.slice/comfy.service",
     ("comfy.service", 1000)),
    ("/user.slice/user-1000.slice/session-3.scope", None),
    ("/machine.slice/libpod-0123abcd.scope", None),
    ("/", None),
])
def test_unit_of_cgroup(path: str, expected: object) -> None:
    assert unit_of_cgroup(path) == expected


def test_drop_ins_override_in_order_and_an_empty_assignment_resets(tmp_path) -> None:
    main = tmp_path / "a.service"
    main.write_text(UNIT)
    first = tmp_path / "10-gpu.conf"
    first.write_text("[Service]\nDeviceAllow=\nDeviceAllow=/dev/nvidia0 rw\nPrivateDevices=yes\n")
    later = tmp_path / "20-no.conf"
    later.write_text("[Service]\nPrivateDevices=no\nNoNewPrivileges=true\n")
    props = properties_from_files([str(main), str(first), str(later)])
    assert props == {"PrivateDevices": False, "NoNewPrivileges": True, "DevicePolicy": "closed",
                     "DeviceAllow": [["/dev/nvidia0", "rw"]]}


def _host(tmp_path, devices: str) -> HostPaths:
    for sub in ("proc", "sys", "dev", "etc/systemd/system/ollama.service.d", "run"):
        os.makedirs(tmp_path / sub, exist_ok=True)
    (tmp_path / "proc/devices").write_text(devices)
    (tmp_path / "etc/systemd/system/ollama.service").write_text(UNIT)
    (tmp_path / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    return HostPaths.under(str(tmp_path))


def _eperm(host: HostPaths, v1_rules: "list[str] | None",
           names: "dict[str, str] | None" = None) -> tuple[Facts, object]:
    proc = Process(pid=4321, tid=4321, comm=b"ollama", uid=61234, gid=61234, euid=61234,
                   egid=61234, fsuid=61234, fsgid=61234, userns=UserNs(4026531837, 0, 0))
    event = Event(time=1.0, sensor="bpf", syscall="openat", errno=errno.EPERM, process=proc,
                  node=Node(path=b"/dev/nvidia0", major=195, minor=0), open_flags=os.O_RDWR)
    facts = Facts()
    for name, value in (("node.path", "/dev/nvidia0"), ("node.major", 195), ("node.minor", 0),
                        ("node.mode", "0666"), ("node.uid", 0), ("node.gid", 0),
                        ("node.mount_nodev", False), ("node.class", "nvidia-gpu"),
                        ("process.fsuid", 61234), ("process.fsgid", 61234),
                        ("process.groups", []), ("process.cap_effective", "0"),
                        ("userns.level", 0),
                        ("host.gpu_char_majors", names or {"195": "nvidia"})):
        facts.put(name, value, KERNEL, "fixture")
    if v1_rules is not None:
        facts.put("device_cgroup.v1_rules", v1_rules, LIVE, "fixture devices.list")
    else:
        facts.put("device_cgroup.v2_unreadable", "BPF_PROG_GET_FD_BY_ID needs CAP_SYS_ADMIN",
                  LIVE, "fixture")
    systemd_unit_facts(host, {"unified": "/system.slice/ollama.service"}, facts)
    return facts, explain_facts(event, facts)


def test_nvidia_frontend_on_a_driver_that_says_nvidia(tmp_path) -> None:
    """550.40+: major 195 is 'nvidia'; DeviceAllow=char-nvidia-frontend allows nothing."""
    host = _host(tmp_path, "Character devices:\n  1 mem\n195 nvidia\n508 nvidia-uvm\n")
    facts, verdict = _eperm(host, ["c 1:3 rwm", "c 508:* rwm"])  # what systemd wrote (v1)
    assert facts.get("systemd.unit") == "ollama.service"
    assert facts.fact("systemd.unit_properties").origin.startswith("unit files: ")
    assert verdict.reason == "device_cgroup" and verdict.confidence == "high"
    assert "ollama.service" in verdict.summary and "DeviceAllow=" in verdict.summary
    assert any("char-nvidia-frontend matches no driver" in n and "550.40" in n
               for n in verdict.notes), verdict.notes
    assert verdict.fixes[0].command == "[Service]\nDeviceAllow=char-nvidia rw"
    assert verdict.fixes[1].command == "systemctl daemon-reload && systemctl restart ollama.service"
    assert not any("--device" in f.command for f in verdict.fixes)


def test_older_driver_that_says_nvidia_frontend_is_covered(tmp_path) -> None:
    """Before 550.40 the same unit allows major 195: the unit is not blamed."""
    host = _host(tmp_path, "Character devices:\n195 nvidia-frontend\n508 nvidia-uvm\n")
    _, verdict = _eperm(host, ["c 195:* rw", "c 508:* rwm"], {"195": "nvidia-frontend"})
    assert verdict.reason != "device_cgroup"  # the unit allows it: this EPERM is not its
    assert "ollama.service" not in verdict.summary


def test_unreadable_program_is_medium_from_the_configuration(tmp_path) -> None:
    host = _host(tmp_path, "Character devices:\n195 nvidia\n")
    _, verdict = _eperm(host, None)
    assert verdict.reason == "device_cgroup" and verdict.confidence == "medium"
    assert any("configuration (DeviceAllow=) shows" in n for n in verdict.notes)


@pytest.mark.parametrize("path", ["/dev/a b\"c", "/dev/x%i", "/dev/../etc/passwd", "/dev/a\nb"])
def test_hostile_node_path_in_the_drop_in_is_quoted_or_refused(path: str) -> None:
    from tracer.verdict.fixes import ranked_fixes
    ctx = {"unit": "ollama.service", "unit_prop": "DeviceAllow", "allow_name": None,
           "node_path": path, "path": path, "node_class": "nvidia-gpu", "runtime": "host"}
    fix = ranked_fixes("device_cgroup", ctx)[0]
    if fix.command.startswith("#"):
        assert path not in fix.command and "cannot be written safely" in fix.summary
    else:
        line = fix.command.splitlines()[-1]
        assert line.startswith('DeviceAllow="/dev/') or line == "DeviceAllow=/dev/x%%i rw", line


def test_a_user_unit_s_files_cannot_block_or_speak_for_another_user(tmp_path) -> None:
    """A user unit's drop-ins live in the user's home: a FIFO there would block the
    reader for good (an open for reading waits for a writer), and a file another
    user put there is not this user's configuration."""
    home = tmp_path / "home/al"
    drop_ins = home / ".config/systemd/user/comfy.service.d"
    drop_ins.mkdir(parents=True)
    (home / ".config/systemd/user/comfy.service").write_text(UNIT)
    os.mkfifo(drop_ins / "10-fifo.conf")
    other = drop_ins / "20-other.conf"
    other.write_text("[Service]\nDevicePolicy=auto\n")
    os.chown(other, 4242, 4242)
    mine = drop_ins / "30-mine.conf"
    mine.write_text("[Service]\nDeviceAllow=/dev/nvidia0 rw\n")
    os.chown(mine, 1000, 1000)
    for sub in ("etc", "run", "proc", "sys", "dev"):
        (tmp_path / sub).mkdir(exist_ok=True)
    (tmp_path / "etc/passwd").write_text(f"al:x:1000:1000::{'/home/al'}:/bin/sh\n")
    facts = Facts()
    reader = threading.Thread(target=systemd_unit_facts, daemon=True, args=(
        HostPaths.under(str(tmp_path)),
        {"unified": "/user.slice/user-1000.slice/user@1000.service/app.slice/comfy.service"},
        facts))
    reader.start()
    reader.join(20)
    assert not reader.is_alive(), "the reader blocked on the FIFO"
    props = facts.get("systemd.unit_properties")
    assert props["DevicePolicy"] == "closed"       # 20-other.conf (uid 4242) was not read
    assert [e["spec"] for e in props["DeviceAllow"]][-1] == "/dev/nvidia0"
