"""Record parsing, grouping by serial, and golden replays of captured streams."""

from __future__ import annotations

import json
import os

import pytest

from tracer.event import Event, Node
from tracer.host import HostPaths
from tracer.sensors.audit_events import GpuNodeFilter
from tracer.sensors.audit_marshal import AUDIT_CONFIG_CHANGE, AUDIT_EOE, AUDIT_PATH, AUDIT_SYSCALL
from tracer.sensors.audit_pipeline import AuditConfig, AuditPipeline, replay_datagrams
from tracer.sensors.audit_records import (PARSE_ERROR_REASONS, RecordAssembler, RecordError,
                                          parse_fields, parse_record)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "audit")
HOST = HostPaths.under(os.path.join(FIXTURES, "host"))
STREAMS = ["captured", "interleaved", "missing_path", "truncated", "malformed"]


def load_stream(name: str) -> list[bytes]:
    with open(os.path.join(FIXTURES, f"{name}.hex")) as fh:
        return [bytes.fromhex(line.strip()) for line in fh if line.strip()]


def load_expected(name: str) -> dict:  # type: ignore[type-arg]
    with open(os.path.join(FIXTURES, f"{name}.expected.json")) as fh:
        return json.load(fh)  # type: ignore[no-any-return]


def replay(name: str) -> tuple[list[Event], dict[str, int]]:
    pipeline = AuditPipeline(AuditConfig(), HOST)
    return replay_datagrams(pipeline, load_stream(name)), pipeline.stats()


def test_field_forms_quoted_hex_null_plain() -> None:
    fields = parse_fields(b'name="/dev/nvidia0" cwd=2F746D702F6120622063 key=(null) '
                          b'exe=(null) mode=020660 op="add_rule" rdev=c3:00')
    assert fields == {b"name": b"/dev/nvidia0", b"cwd": b"/tmp/a b c", b"key": None,
                      b"exe": None, b"mode": b"020660", b"op": b"add_rule", b"rdev": b"c3:00"}


@pytest.mark.parametrize("body,reason", [
    (b'name="/dev/nvid', "unterminated_quote"),
    (b"name=2F6", "bad_hex"),
    (b"name=ZZ", "bad_hex"),
    (b"pid=1 junk", "bad_token"),
    (b"=5", "bad_token"),
])
def test_bad_fields_raise_a_bounded_reason(body: bytes, reason: str) -> None:
    with pytest.raises(RecordError) as caught:
        parse_fields(body)
    assert caught.value.reason == reason and reason in PARSE_ERROR_REASONS


def test_record_header_gives_time_and_serial() -> None:
    record = parse_record(AUDIT_PATH, b"audit(1700000000.250:77): item=0 name=\"x\"")
    assert (record.time, record.serial, record.get("name")) == (1700000000.25, 77, b"x")
    with pytest.raises(RecordError, match="bad_header"):
        parse_record(AUDIT_PATH, b"audit(1700000000:77): item=0")


def test_assembler_groups_by_serial_until_eoe_and_times_out_the_rest() -> None:
    assembler = RecordAssembler(timeout=2.0)
    assert assembler.add(AUDIT_SYSCALL, b"audit(1.000:1): pid=1", now=0.0) == []
    assert assembler.add(AUDIT_SYSCALL, b"audit(1.000:2): pid=2", now=0.5) == []
    assert assembler.add(AUDIT_PATH, b"audit(1.000:1): item=0", now=0.6) == []
    assert assembler.add(AUDIT_CONFIG_CHANGE, b"audit(1.000:3): op=x", now=0.6) == []
    (done,) = assembler.add(AUDIT_EOE, b"audit(1.000:1): ", now=0.7)
    assert (done.serial, [r.type for r in done.records], done.ended) == \
        (1, [AUDIT_SYSCALL, AUDIT_PATH], True)
    assert assembler.expire(now=2.4) == []
    (late,) = assembler.expire(now=2.5)
    assert (late.serial, late.ended) == (2, False)
    assert assembler.add(AUDIT_PATH, b"audit(1.000:1): item=1", now=3.0) == []
    assert assembler.errors == {"late_record": 1}
    assert assembler.counts["records_ignored"] == 1
    assert assembler.counts["events_without_eoe"] == 1


def test_assembler_bounds_open_serials() -> None:
    assembler = RecordAssembler(max_open=2)
    closed = [g for n in range(5)
              for g in assembler.add(AUDIT_SYSCALL, b"audit(1.000:%d): pid=1" % n, now=0.0)]
    assert [g.serial for g in closed] == [0, 1, 2] and len(assembler.open) == 2


@pytest.mark.parametrize("name", STREAMS)
def test_golden_replay(name: str) -> None:
    events, stats = replay(name)
    expected = load_expected(name)
    assert [e.to_json() for e in events] == expected["events"]
    errors = {k.split(".", 1)[1]: v for k, v in stats.items() if k.startswith("parse_errors.")}
    assert errors == expected["parse_errors"]
    assert stats["parse_errors"] == sum(expected["parse_errors"].values())


def test_captured_stream_agrees_with_what_was_done() -> None:
    """captured.truth.json was written by capture.py from the processes it ran."""
    with open(os.path.join(FIXTURES, "captured.truth.json")) as fh:
        truth = json.load(fh)
    events, stats = replay("captured")
    denials = [t for t in truth if "dropped" not in t]
    assert [(e.process.pid, e.process.uid, e.process.euid, e.node.path, e.errno_name)
            for e in events] == \
        [(t["pid"], t["uid"], t["uid"], t["path"].encode(), t["errno"]) for t in denials]
    assert all(e.sensor == "audit" and e.node.major == 195 for e in events)
    assert events[1].node.path_as_given == denials[1]["path_as_given"].encode()
    for reason in ("not_gpu_node", "ioctl_fd_unresolved"):
        assert stats[f"dropped.{reason}"] == sum(1 for t in truth if t.get("dropped") == reason)
    assert "process.cgroup_id" in events[0].missing and "process.userns" in events[0].missing


def test_events_survive_json_round_trip() -> None:
    events, _ = replay("malformed")
    for event in events:
        assert Event.from_json(json.loads(json.dumps(event.to_json()))).to_json() == \
            event.to_json()
    assert events[2].node.path == b"/dev/nvidia0\xff"


def test_gpu_majors_include_dynamic_nvidia_drivers() -> None:
    assert set(GpuNodeFilter.discover(HOST).nodes.majors) == {195, 226, 234, 508, 509}
    assert set(GpuNodeFilter.discover(HostPaths.under("/nonexistent")).nodes.majors) == \
        {195, 226}


@pytest.mark.parametrize("path,major,kept", [
    (b"/dev/nvidiactl", None, True), (b"/dev/nvhost-ctrl", None, True),
    (b"/dev/nvmap", None, True), (b"/dev/nvgpu/igpu0/ctrl", None, True),
    (b"/dev/dri/renderD128", None, True), (b"/dev/char/195:0", None, True),
    (b"/dev/char/1:3", None, False), (b"/dev/gttest0", 195, True),
    (b"/dev/null", 1, False), (b"/tmp/nvidia0", None, False),
])
def test_gpu_node_filter(path: bytes, major: "int | None", kept: bool) -> None:
    gpu = GpuNodeFilter.discover(HostPaths.under("/nonexistent"))
    assert gpu.matches(Node(path=path, major=major, minor=0)) is kept


# One real Landlock refusal as Linux 6.18 wrote it (records of one serial, then the
# domain's deallocation under its own serial): captured by this project's audit sensor.
LANDLOCK_RECORDS = [
    (1423, b'audit(1796195309.843:372331): domain=1d5a5f984 blockers=fs.write_file,fs.read_file '
           b'path="/dev/nvidia-gtll28178" dev="devtmpfs" ino=17233'),
    (1424, b'audit(1796195309.843:372331): domain=1d5a5f984 status=allocated mode=enforcing '
           b'pid=28189 uid=0 exe="/usr/bin/python3.11" comm="python"'),
    (1300, b'audit(1796195309.843:372331): arch=c000003e syscall=257 success=no exit=-13 '
           b'a0=ffffff9c a1=7f84cbb67950 a2=80902 a3=0 items=1 ppid=28178 pid=28189 '
           b'auid=4294967295 uid=0 gid=0 euid=0 suid=0 fsuid=0 egid=0 sgid=0 fsgid=0 tty=(none) '
           b'ses=4294967295 comm="python" exe="/usr/bin/python3.11" key="gputrace"'),
    (1307, b'audit(1796195309.843:372331): cwd="/work/wt/truth"'),
    (1302, b'audit(1796195309.843:372331): item=0 name="/dev/nvidia-gtll28178" inode=17233 '
           b'dev=00:06 mode=020666 ouid=0 ogid=0 rdev=c3:c9 nametype=NORMAL cap_fp=0 cap_fi=0 '
           b'cap_fe=0 cap_fver=0 cap_frootid=0'),
    (1320, b'audit(1796195309.843:372331): '),
    (1424, b'audit(1796195309.887:372332): domain=1d5a5f984 status=deallocated denials=1'),
]


def test_landlock_records_join_the_syscall_and_a_freed_domain_is_no_error() -> None:
    import os

    from tracer.host import HostPaths
    from tracer.sensors.audit_events import EventMapper, GpuNodeFilter
    from tracer.sensors.audit_records import RecordAssembler

    host = HostPaths.under(os.path.join(os.path.dirname(__file__), "fixtures/audit/host"))
    assembler = RecordAssembler(timeout=2.0)
    mapper = EventMapper(host, GpuNodeFilter.discover(host))
    groups = [g for kind, text in LANDLOCK_RECORDS for g in assembler.add(kind, text, 0.0)]
    groups += assembler.drain()
    events = [e for e in (mapper.map(g) for g in groups) if e is not None]
    assert not assembler.errors and mapper.dropped == {"landlock_without_syscall": 1}
    [event] = events
    assert event.errno == 13 and event.node.path == b"/dev/nvidia-gtll28178"
    assert event.facts.get("audit.landlock_blockers") == ["fs.write_file", "fs.read_file"]
    assert event.facts.get("audit.landlock_domain") == "1d5a5f984"
    assert event.facts.get("audit.landlock_mode") == "enforcing"
    assert event.facts.get("audit.landlock_path") == "/dev/nvidia-gtll28178"
    assert event.facts.fact("audit.landlock_blockers").origin == "audit LANDLOCK_ACCESS record"
