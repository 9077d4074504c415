"""Property tests: kernel records (BPF gpu_event bytes, audit text and netlink
datagrams) decode to events or to a bounded error reason, never to another
exception.  Hostile processes control much of what lands in these records
(comm, paths, the timing of their exit); the daemon reads them as root."""

from __future__ import annotations

import errno
import json
import struct

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.example_counts import fuzz, print_example_counts, ran  # noqa: F401
from tracer.event import Event
from tracer.host import HostPaths
from tracer.sensors import bpf_event
from tracer.sensors.audit_marshal import (AUDIT_CWD, AUDIT_EOE, AUDIT_PATH, AUDIT_PROCTITLE,
                                          AUDIT_SYSCALL)
from tracer.sensors.audit_pipeline import AuditConfig, AuditPipeline, replay_datagrams
from tracer.sensors.audit_records import (PARSE_ERROR_REASONS, RecordAssembler, RecordError,
                                          parse_record)
from tracer.sensors.bpf_constants import SYSCALL_NAMES
from tracer.sinks.console import denial_line, update_line
from tests.test_hostile_strings import assert_terminal_safe

DECODE_REASONS = {"short_record", "bad_syscall", "bad_kind", "bad_dev_prog"}
NO_PROC = HostPaths(proc="/nonexistent-gttest-proc", dev="/nonexistent-gttest-dev")




# ------------------------------------------------------------- BPF records

@st.composite
def gpu_event_bytes(draw: st.DrawFn) -> bytes:
    """Random bytes shaped like a record: plausible kind and syscall most of the
    time, random NUL placement in comm/path, any length around the two sizes."""
    fixed = bpf_event.EVENT_GROUPS_OFFSET
    size = draw(st.sampled_from([fixed, fixed + 4 * 40, bpf_event.UPDATE_SIZE,
                                 bpf_event.DEV_PROG.size + 8 * 12])
                | st.integers(0, fixed + 4 * 64))
    raw = bytearray(draw(st.binary(min_size=size, max_size=size)))
    if size >= 8:
        kind = draw(st.sampled_from([1, 2, 3]) | st.integers(0, 2**32 - 1))
        sys_id = draw(st.sampled_from(sorted(SYSCALL_NAMES)) | st.integers(0, 2**32 - 1))
        struct.pack_into("<II", raw, 0, kind, sys_id)
    if size >= fixed and draw(st.booleans()):
        # ngroups within the tail sent, and a path of the drawn length, as the probe writes them
        struct.pack_into("<I", raw, 120, draw(st.integers(0, (size - fixed) // 4)))
        path = draw(st.binary(max_size=256))
        raw[fixed - 512:fixed - 512 + len(path)] = path
    return bytes(raw)


@fuzz(2000)
@given(gpu_event_bytes(), st.floats(0, 2e9))
def test_bpf_decode_any_bytes(data: bytes, offset: float) -> None:
    ran("bpf_event.decode")
    try:
        record = bpf_event.decode(data, offset)
    except bpf_event.DecodeError as exc:
        assert exc.reason in DECODE_REASONS
        return
    if isinstance(record, bpf_event.Update):
        assert record.count >= 0 and record.key.label()  # the key is checked when counted
        return
    if isinstance(record, bpf_event.DevProgRecord):
        assert len(record.insns) % 8 == 0 and len(record.insns) <= 8 * bpf_event.MAX_PROG_INSNS
        return
    assert isinstance(record, bpf_event.Denial) and isinstance(record.event, Event)
    assert record.event.key == record.key.label()
    record = record.event
    assert record.syscall in SYSCALL_NAMES.values()
    assert len(record.process.comm) <= 16 and b"\0" not in record.process.comm
    assert record.node.path is None or (len(record.node.path) <= 256 and b"\0" not in record.node.path)
    assert len(record.process.groups or []) <= bpf_event.MAX_GROUPS
    # whatever the kernel sent must render and survive the JSON journal
    wire = json.loads(json.dumps(record.to_json()))
    back = Event.from_json(wire)
    assert (back.process.comm, back.node.path) == (record.process.comm, record.node.path)
    assert (back.count, back.errno, back.key) == (record.count, record.errno, record.key)
    assert_terminal_safe(denial_line(record))
    assert_terminal_safe(update_line(record))


# ------------------------------------------------------------- audit text

VALUE = st.one_of(
    st.integers(-2**63, 2**64).map(str),
    st.from_regex(r"[0-9a-fA-F]{1,16}", fullmatch=True),
    st.just("(null)"),
    st.binary(max_size=24).map(lambda b: '"' + b.decode("latin-1") + '"'),
    st.text(st.characters(codec="utf-8", exclude_characters=" "), max_size=12),
    st.binary(max_size=12).map(lambda b: b.hex().upper()),
)
SYSCALL_KEYS = ("arch", "syscall", "success", "exit", "a0", "a1", "a2", "a3", "items", "ppid",
                "pid", "auid", "uid", "gid", "euid", "suid", "fsuid", "egid", "sgid", "fsgid",
                "tty", "ses", "comm", "exe", "subj", "key")
PATH_KEYS = ("item", "name", "inode", "dev", "mode", "ouid", "ogid", "rdev", "nametype")
PLAUSIBLE = {"arch": "c000003e", "syscall": "257", "exit": "-13", "success": "no",
             "a0": "ffffff9c", "a2": "2", "items": "1", "rdev": "c3:4d", "nametype": "NORMAL",
             "name": '"/dev/nvidia0"', "comm": '"x"', "key": '"gputrace"', "cwd": '"/"',
             "a1": "80002", "a3": "0", "ppid": "1", "pid": "4242", "auid": "4294967295",
             "uid": "1000", "gid": "1000", "euid": "1000", "suid": "1000", "fsuid": "1000",
             "egid": "1000", "sgid": "1000", "fsgid": "1000", "ses": "4294967295",
             "tty": "pts0", "exe": '"/usr/bin/cat"', "item": "0", "inode": "12",
             "dev": "00:05", "mode": "020660", "ouid": "0", "ogid": "44", "subj": "unconfined"}


@st.composite
def record_body(draw: st.DrawFn, keys: tuple[str, ...], damage: int) -> str:
    """Fields of one record; each one is missing or random with odds `damage`/30."""
    parts = []
    for key in keys:
        roll = draw(st.integers(0, 59))
        if roll < damage:
            continue  # a missing field
        plausible = PLAUSIBLE.get(key) if roll >= 2 * damage else None
        parts.append(f"{key}={plausible if plausible is not None else draw(VALUE)}")
    if draw(st.integers(0, 29)) < damage:
        parts.insert(draw(st.integers(0, len(parts))), draw(st.text(max_size=10)))
    return " ".join(parts)


@st.composite
def audit_event(draw: st.DrawFn) -> list[tuple[int, bytes]]:
    """One serial's records (sometimes damaged), as (type, text) pairs."""
    serial = draw(st.integers(0, 50).map(str) | st.just("9" * 4400))
    head = f"audit({draw(st.integers(0, 2**40))}.{draw(st.integers(0, 999)):03d}:{serial}): "
    damage = draw(st.sampled_from([0, 1, 4, 15]))
    records = [(AUDIT_SYSCALL, head + draw(record_body(SYSCALL_KEYS, damage)))]
    for _ in range(draw(st.integers(0, 3))):
        records.append((AUDIT_PATH, head + draw(record_body(PATH_KEYS, damage))))
    if draw(st.booleans()):
        records.append((AUDIT_CWD, head + draw(record_body(("cwd",), damage))))
    if draw(st.booleans()):
        records.append((AUDIT_PROCTITLE, head + "proctitle=" + draw(VALUE)))
    if draw(st.booleans()):
        records.append((AUDIT_EOE, head))
    records = draw(st.permutations(records))
    out = [(kind, text.encode("utf-8", "surrogateescape")) for kind, text in records]
    if draw(st.integers(0, 29)) < damage:  # raw damage anywhere
        i = draw(st.integers(0, len(out) - 1))
        kind, text = out[i]
        cut = draw(st.integers(0, len(text)))
        out[i] = (kind, text[:cut] + draw(st.binary(max_size=8)) + text[cut + 1:])
    return out


@fuzz(1500)
@given(st.integers(0, 2000), st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_audit_parse_record_any_bytes(kind: int, text: bytes) -> None:
    ran("audit_records.parse_record(bytes)")
    try:
        record = parse_record(kind, text)
    except RecordError as exc:
        assert exc.reason in PARSE_ERROR_REASONS
        return
    assert all(isinstance(k, bytes) for k in record.fields)


def datagram(kind: int, text: bytes) -> bytes:
    body = struct.pack("=IHHII", 16 + len(text), kind, 0, 0, 0) + text
    return body + b"\0" * (-len(body) % 4)


@fuzz(1200)
@given(st.lists(audit_event(), min_size=1, max_size=3))
def test_audit_records_group_and_map_without_raising(events: list) -> None:
    ran("audit pipeline (records -> events)")
    pipeline = AuditPipeline(AuditConfig(), NO_PROC)
    grams = [datagram(kind, text) for records in events for kind, text in records]
    out = replay_datagrams(pipeline, grams)
    stats = pipeline.stats()
    assert stats["events_emitted"] == len(out)
    assert stats["records_read"] == len(grams)
    reasons = {k.split(".", 1)[1] for k in stats if k.startswith("parse_errors.")}
    assert reasons <= set(PARSE_ERROR_REASONS)
    for event in out:
        ran("audit pipeline: events emitted")
        assert event.sensor == "audit" and event.errno in (errno.EACCES, errno.EPERM)
        json.dumps(event.to_json())
        assert_terminal_safe(denial_line(event))


@fuzz(600)
@given(st.lists(st.binary(max_size=80), max_size=6))
def test_audit_netlink_datagrams_any_bytes(grams: list[bytes]) -> None:
    ran("audit netlink datagrams (bytes)")
    pipeline = AuditPipeline(AuditConfig(), NO_PROC)
    for event in replay_datagrams(pipeline, grams):
        json.dumps(event.to_json())


@fuzz(800)
@given(st.lists(st.tuples(st.sampled_from([AUDIT_SYSCALL, AUDIT_PATH, AUDIT_EOE]),
                          st.integers(0, 40)), max_size=300),
       st.integers(1, 8))
def test_audit_assembler_bounded_memory(records: list, max_open: int) -> None:
    """Whatever order records come in, open serials stay within `max_open` and
    remembered closed serials within 4x that."""
    ran("audit RecordAssembler bounds")
    assembler = RecordAssembler(timeout=1.0, max_open=max_open)
    for kind, serial in records:
        assembler.add(kind, f"audit(1.000:{serial}): a=b".encode(), 0.0)
        assert len(assembler.open) <= max_open
        assert len(assembler.closed_serials) <= 4 * max_open
