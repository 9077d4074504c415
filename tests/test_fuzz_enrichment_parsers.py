"""Property tests for the enrichment parsers.  A container's /etc/group and
/etc/passwd are written by whoever built its image, and mount points, cgroup
names and id maps are chosen by unprivileged users in their own namespaces:
each parser must return well-formed results and count what it skipped, for any
text at all, and never raise."""

from __future__ import annotations

import struct

from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz.example_counts import fuzz, print_example_counts, ran  # noqa: F401
from tracer.enrichment import device_rules, parse_files, parse_proc, procfs
from tracer.facts import SkipCounter
from tracer.enrichment.id_map import IdMap
from tracer.enrichment.posix_acl import (ACL_TAGS, ACL_UNDEFINED_ID, AclEntry, build_posix_acl,
                                         parse_posix_acl)

# Pieces that look like numbers to str.isdigit() but not to int(), huge numbers,
# separators and whitespace of every kind, plus plain printable text.
ATOMS = st.one_of(
    st.integers(0, 2**33).map(str),
    st.sampled_from(["²", "٣", "０", "-1", "+1", "1_0", "9" * 25, "9" * 5000, "0x10", "\\999",
                     "\\040", "\\", ":", "::", ",", " ", "\t", "-", "=", "#", "/", "\"", "",
                     "\x00", "\x85", "\u2028", "\r"]),
    st.text(max_size=8),
)
LINE = st.lists(ATOMS, max_size=12).map("".join)
TEXT = st.lists(LINE, max_size=8).map("\n".join)


def structured(sep: str, fields: int) -> st.SearchStrategy[str]:
    """Lines with about the right number of fields, so parsers get past the first check."""
    line = st.lists(ATOMS, min_size=fields - 1, max_size=fields + 1).map(sep.join)
    return st.lists(line, max_size=6).map("\n".join)


@fuzz(1000)
@given(TEXT | structured(" ", 3))
@example("0 ² 1")
@example("0 " + "9" * 5000 + " 1")
def test_id_map(text: str) -> None:
    ran("parse_id_map")
    skips = SkipCounter()
    for inside, outside, count in IdMap.parse(text, skips).rows():
        assert count > 0 and inside + count <= 2**32 and outside + count <= 2**32
        assert IdMap.from_rows([[inside, outside, count]]).to_outside(inside) == outside


@fuzz(1000)
@given(TEXT | structured(" ", 11))
@example("² 2 0:1 / / rw - x y z")
@example("1 2 0:1 / /a\\999 rw - x y z")
def test_mountinfo(text: str) -> None:
    ran("parse_mountinfo")
    mounts = parse_proc.parse_mountinfo(text, SkipCounter())
    for mount in mounts:
        assert mount.mount_id >= 0 and mount.parent_id >= 0
    parse_proc.mount_holding("/dev/nvidia0", mounts)


def test_mountinfo_octal_escapes_still_decode() -> None:
    line = "36 35 98:0 /mnt1 /mnt\\040a\\134b rw - ext3 /dev/root rw"
    (mount,) = parse_proc.parse_mountinfo(line, SkipCounter())
    assert mount.mount_point == "/mnt a\\b" and mount.mount_id == 36


@fuzz(1000)
@given(TEXT | structured(":", 2))
def test_status(text: str) -> None:
    ran("parse_status")
    skips = SkipCounter()
    status = parse_proc.parse_status(text, skips)
    for key in list(status)[:4]:
        ints = parse_proc.status_ints(status, key, skips)
        assert ints is None or all(isinstance(i, int) for i in ints)
        parse_proc.status_hex(status, key, skips)


@fuzz(1000)
@given(TEXT | structured(":", 3))
@example("²::/")
def test_proc_cgroup(text: str) -> None:
    ran("parse_proc_cgroup")
    for line in parse_proc.parse_proc_cgroup(text, SkipCounter()):
        assert line.hierarchy >= 0 and line.path.startswith("/")


@fuzz(800)
@given(TEXT | structured(" ", 2).map(lambda t: "Character devices:\n" + t))
@example("Character devices:\n² x")
def test_proc_devices(text: str) -> None:
    ran("parse_proc_devices")
    assert all(m >= 0 for m in parse_proc.parse_proc_devices(text, SkipCounter()))


@fuzz(800)
@given(TEXT | structured(" ", 3))
def test_devices_list(text: str) -> None:
    ran("parse_devices_list")
    rules = device_rules.parse_devices_list(text, SkipCounter())
    device_rules.V1DeviceList.from_rules(rules).may("c", 195, 0, "rw")


@fuzz(1500)
@given(TEXT | structured(":", 4))
@example("video:x:²:alice")
@example("video:x:" + "9" * 5000 + ":")
def test_container_etc_group(text: str) -> None:
    ran("parse_group_file")
    skips = SkipCounter()
    groups = parse_files.parse_group_file(text, skips)
    assert all(g.gid >= 0 and g.name for g in groups)
    lines = [l for l in text.splitlines() if l.strip() and not l.startswith("#")]
    assert len(groups) + skips.total() == len(lines)  # every line is used or counted


@fuzz(1500)
@given(TEXT | structured(":", 7))
@example("alice:x:²:1::/home/alice:/bin/sh")
def test_container_etc_passwd(text: str) -> None:
    ran("parse_passwd_file")
    skips = SkipCounter()
    users = parse_files.parse_passwd_file(text, skips)
    assert all(u.uid >= 0 and u.gid >= 0 for u in users)
    if users:
        parse_files.user_gids(users[0], parse_files.parse_group_file(text, skips))


@fuzz(800)
@given(TEXT | structured(": ", 2))
@example("ModifyDeviceFiles: ²")
@example("DeviceFileMode: --5")
def test_nvidia_params(text: str) -> None:
    ran("parse_nvidia_params")
    for value in parse_files.parse_nvidia_params(text, SkipCounter()).values():
        assert isinstance(value, (int, str))


@fuzz(800)
@given(TEXT | structured("=", 2))
def test_logind_session(text: str) -> None:
    ran("parse_logind_session")
    fields = parse_files.parse_logind_session(text, SkipCounter())
    assert all("\n" not in k and "=" not in k for k in fields)


@fuzz(600)
@given(st.text(max_size=30) | st.sampled_from(["user:[²]", "user:[" + "9" * 5000 + "]"]))
def test_ns_link_target(target: str) -> None:
    ran("procfs.ns_inum")
    inum = procfs.ns_inum(target)
    assert inum is None or inum >= 0


ACL_ENTRY = st.tuples(st.sampled_from(sorted(ACL_TAGS)) | st.integers(0, 0xFFFF),
                      st.integers(0, 9), st.sampled_from([0, 1000, ACL_UNDEFINED_ID])
                      | st.integers(0, 2**32 - 1))


@fuzz(1500)
@given(st.binary(max_size=80)
       | st.lists(ACL_ENTRY, max_size=8).map(
           lambda es: struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in es)))
def test_posix_acl_xattr(raw: bytes) -> None:
    ran("parse_posix_acl")
    entries = parse_posix_acl(raw, SkipCounter())
    if entries is None:
        return
    assert any(e.tag == "user_obj" for e in entries)
    assert all(0 <= e.perm <= 7 and (e.id is not None) == (e.tag in ("user", "group"))
               for e in entries)
    assert build_posix_acl(entries) == raw  # accepted input is exactly what it means


@fuzz(500)
@given(st.lists(st.builds(AclEntry, st.sampled_from(sorted(ACL_TAGS.values())),
                          st.integers(0, 7), st.integers(0, 2**32 - 2)), max_size=6))
def test_posix_acl_round_trip(entries: list[AclEntry]) -> None:
    ran("posix ACL build/parse round trip")
    entries = [AclEntry(e.tag, e.perm, e.id if e.tag in ("user", "group") else None)
               for e in entries] + [AclEntry("user_obj", 6, None)]
    assert parse_posix_acl(build_posix_acl(entries), SkipCounter()) == entries


@fuzz(800)
@given(TEXT | structured(" ", 4).map(lambda t: "options nvidia " + t))
@example("options nvidia NVreg_DeviceFileMode=²")
@example("options nvidia NVreg_DeviceFileMode=0x" + "f" * 5000 + " \\")
def test_modprobe_conf_and_kernel_uint(text: str) -> None:
    """modprobe.d lines and the kernel's reading of a parameter value (issue 18)."""
    ran("parse_modprobe_conf + kernel_uint")
    from tracer.enrichment.driver_params import kernel_uint, parse_modprobe_conf
    for option in parse_modprobe_conf(text, "/etc/modprobe.d/x.conf", SkipCounter()):
        assert option.param.startswith("NVreg_") and len(option.raw) <= 64
        value = kernel_uint(option.raw)
        assert value is None or 0 <= value < 2**32


CDI_KEYS = st.sampled_from(["cdiVersion", "kind", "devices", "name", "containerEdits",
                            "deviceNodes", "path", "hostPath", "type", "major", "minor", "gid",
                            "additionalGids", "mounts", "permissions", "fileMode"])
CDI_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.text(max_size=12)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(CDI_KEYS, inner, max_size=5),
    max_leaves=40)


@fuzz(800)
@given(st.one_of(TEXT, CDI_VALUES.map(repr), st.dictionaries(CDI_KEYS, CDI_VALUES, max_size=6)
                 .map(lambda d: __import__("json").dumps(d))))
@example('{"kind": "a/b", "devices": [{"name": "x", "containerEdits": {"deviceNodes": '
         '[{"path": "/dev/x", "major": true, "minor": 1e400}]}}]}')
def test_cdi_spec_parser(text: str) -> None:
    """Any text as a CDI spec: a spec or an error, never an exception (issue 18)."""
    ran("cdi_specs.parse_spec")
    from tracer.enrichment.cdi_specs import devices_naming, parse_spec, summary
    spec = parse_spec(text, "/etc/cdi/x.yaml")
    assert spec.error is not None or spec.kind is not None
    for node in [n for d in spec.devices for n in d.edits.nodes] + list(spec.common.nodes):
        assert isinstance(node.path, str) and isinstance(node.host_path, str)
        assert all(v is None or (isinstance(v, int) and not isinstance(v, bool))
                   for v in (node.major, node.minor, node.gid, node.uid, node.file_mode))
    summary(spec)
    devices_naming([spec], "/dev/x", [(1, 2)])
