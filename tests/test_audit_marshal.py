"""MarshalAudit and the rule encoding, on captured datagrams and encoded rules."""

from __future__ import annotations

import errno
import os
import stat
import struct

import pytest

from tracer.errors import EnvironmentProblem
from tracer.sensors.audit_marshal import (AUDIT_ADD_RULE, AUDIT_GET, AUDIT_PATH, AUDIT_SYSCALL,
                                          MarshalAudit, audit_status, is_record)
from tracer.sensors.audit_rules import (AUDIT_EXIT, AUDIT_FILETYPE, AUDIT_FILTERKEY, ARCHES,
                                        AuditRule, current_arch, gputrace_rules, rule_keys)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "audit")


def captured() -> list[bytes]:
    with open(os.path.join(FIXTURES, "captured.hex")) as fh:
        return [bytes.fromhex(line.strip()) for line in fh if line.strip()]


def test_unicast_records_have_payload_only_length_and_parse_whole() -> None:
    record = next(d for d in captured() if struct.unpack_from("=H", d, 4)[0] == AUDIT_SYSCALL)
    assert struct.unpack_from("=I", record)[0] == len(record) - 16  # the kernel's quirk
    (msg,) = MarshalAudit().parse(record)
    assert is_record(msg)
    assert msg["text"].startswith(b"audit(") and msg["text"].endswith(b"key=(null)")


def test_multicast_framing_parses_the_same_text() -> None:
    record = next(d for d in captured() if struct.unpack_from("=H", d, 4)[0] == AUDIT_PATH)
    fixed = bytearray(record)
    struct.pack_into("=I", fixed, 0, len(record))
    assert [m["text"] for m in MarshalAudit().parse(bytes(fixed))] == \
        [m["text"] for m in MarshalAudit().parse(record)]


def test_ack_in_stream_is_not_a_record() -> None:
    (ack,) = MarshalAudit().parse(captured()[0])
    assert ack["header"]["type"] == 2 and ack["error"] == 0
    assert not is_record(ack)


@pytest.mark.parametrize("size", [36, 40, 44])
def test_status_reply_of_older_kernels_decodes(size: int) -> None:
    payload = struct.pack("=11I", 0, 1, 1, 4242, 0, 64, 7, 0, 127, 15000, 0)[: size]
    data = struct.pack("=IHHII", 16 + size, AUDIT_GET, 0, 5, 0) + payload
    (msg,) = MarshalAudit().parse(data)
    assert isinstance(msg, audit_status)
    assert (msg["enabled"], msg["pid"], msg["lost"]) == (1, 4242, 7)
    assert msg["backlog_wait_time_actual"] == 0


def encoded(rule: AuditRule) -> bytes:
    msg = rule.to_message()
    msg["header"]["type"] = AUDIT_ADD_RULE
    msg.encode()
    return bytes(msg.data)


def test_rule_encodes_to_audit_rule_data_and_decodes_back() -> None:
    rules = gputrace_rules(ARCHES["x86_64"])
    data = encoded(rules[0])
    assert len(data) == 16 + 1040 + len(b"gputrace")
    (msg,) = MarshalAudit().parse(data)
    assert msg["flags"] == 0x04 and msg["action"] == 2 and msg["field_count"] == 4
    assert msg["mask"][0] & (1 << 2) and msg["mask"][2] & (1 << 21)  # open(2), creat(85)
    assert msg["mask"][257 // 32] & (1 << (257 % 32)) and msg["mask"][437 // 32] & (1 << 21)
    assert not msg["mask"][0] & (1 << 16)  # ioctl has its own rule
    assert msg["fields"][:4] == (11, AUDIT_EXIT, AUDIT_FILETYPE, AUDIT_FILTERKEY)
    assert msg["values"][1] == (-errno.EACCES) & 0xFFFFFFFF
    assert msg["values"][2] == stat.S_IFCHR
    assert rule_keys(msg) == [b"gputrace"]


def test_gputrace_rules_cover_both_errnos_and_ioctl_per_arch() -> None:
    for arch in ARCHES.values():
        rules = gputrace_rules(arch, key="k")
        exits = sorted(v for r in rules for f, _, v in r.fields if f == AUDIT_EXIT)
        assert exits == [-errno.EACCES, -errno.EACCES, -errno.EPERM, -errno.EPERM]
        assert {r.syscalls for r in rules if len(r.syscalls) == 1} == {(arch.syscalls["ioctl"],)}
    assert "open" not in ARCHES["aarch64"].syscalls


def test_unknown_architecture_is_a_one_line_error() -> None:
    with pytest.raises(EnvironmentProblem, match="sparc64"):
        current_arch("sparc64")


def test_multiple_keys_are_split() -> None:
    rule = AuditRule((2,), ((AUDIT_FILTERKEY, 0x40000000, b"gtforeign\x01gputrace"),))
    (msg,) = MarshalAudit().parse(encoded(rule))
    assert rule_keys(msg) == [b"gtforeign", b"gputrace"]
