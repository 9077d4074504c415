"""Untrusted strings: whoever runs the denied process picks its comm and the path
it opens.  On a terminal they must be shown escaped (no control byte, escape
sequence, bidi override or line separator gets through, and distinct inputs stay
distinct); in JSON they must come back byte for byte."""

from __future__ import annotations

import base64
import json
import os
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.example_counts import fuzz, print_example_counts, ran  # noqa: F401
from tracer.event import Event, Node, Process
from tracer.sinks import console, terminal_text
from tracer.sinks.console import denial_line, update_line, verdict_lines
from tracer.sinks.terminal_text import escape

FORBIDDEN_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Cs"}

# Bytes and characters an attacker would reach for first.
NASTY = [b"\x1b[2J", b"\x1b]0;owned\x07", b"\r", b"\n", b"\x00", b"\x7f", b"\x9b31m",
         b"\xc2\x9b", "\u202e".encode(), "\u2066".encode(), "\u200b".encode(),
         "\u2028".encode(), "\u2029".encode(), "\ufeff".encode(), b"\xff\xfe", b"\xed\xa0\x80",
         b"\\x1b", b"\\", "\U000e0041".encode(), b"\xf4\x90\x80\x80"]
HOSTILE_BYTES = st.lists(st.sampled_from(NASTY) | st.binary(max_size=6), max_size=12).map(b"".join)
HOSTILE_TEXT = st.text(st.characters(codec="utf-8") | st.characters(categories=["Cs"]),
                       max_size=40)


def assert_terminal_safe(text: str) -> None:
    """Nothing in `text` can move the cursor, change colours, reorder or split the line."""
    for ch in text:
        code = ord(ch)
        assert code >= 0x20 and code != 0x7F, f"raw control {code:#x} in {text!r}"
        assert unicodedata.category(ch) not in FORBIDDEN_CATEGORIES, \
            f"U+{code:04X} ({unicodedata.category(ch)}) in {text!r}"




def event_with(comm: bytes, path: bytes, kind: str = "denial") -> Event:
    return Event(time=1_700_000_000.5, sensor="bpf", syscall="openat", errno=13,
                 process=Process(pid=42, tid=42, comm=comm, uid=1000),
                 node=Node(path=path, major=195, minor=0, path_as_given=path[:7]),
                 kind=kind, count=3, key="42:3:13:00000000000000ff")


# ------------------------------------------------------------- terminal

@fuzz(2000)
@given(HOSTILE_BYTES | HOSTILE_TEXT)
def test_escape_output_is_terminal_safe(raw: "bytes | str") -> None:
    ran("terminal_text.escape (safe)")
    assert_terminal_safe(escape(raw))


@fuzz(2000)
@given(HOSTILE_BYTES, HOSTILE_BYTES)
def test_escape_is_injective_on_bytes(a: bytes, b: bytes) -> None:
    ran("terminal_text.escape (injective)")
    if a != b:
        assert escape(a) != escape(b), (a, b)


@fuzz(1000)
@given(HOSTILE_TEXT, HOSTILE_TEXT)
def test_escape_is_injective_on_text(a: str, b: str) -> None:
    ran("terminal_text.escape (injective, str)")
    if a != b:
        assert escape(a) != escape(b), (a, b)


def test_escape_examples_by_hand() -> None:
    assert escape(b"a\x1b[31mb") == "a\\x1b[31mb"
    assert escape(b"\xff") == "\\xff" != escape("\\xff") == "\\\\xff"
    assert escape("\u202eabc") == "\\u202eabc"
    assert escape(b"x" * 5000).endswith("...(+904 chars)")


@fuzz(1000)
@given(HOSTILE_BYTES, HOSTILE_BYTES, st.text(max_size=30), st.text(max_size=30))
def test_console_lines_are_terminal_safe(comm: bytes, path: bytes, reason: str,
                                         command: str) -> None:
    ran("console lines (denial/update/verdict)")
    event = event_with(comm, path)
    assert_terminal_safe(denial_line(event))
    assert_terminal_safe(update_line(event_with(comm, path, "update")))
    verdict = {"reason": reason, "summary": reason + command,
               "fixes": [{"applies_to": reason, "command": command, "security_note": command}]}
    for line in verdict_lines(verdict):
        assert_terminal_safe(line)


def test_console_check_fails_against_a_broken_escape(monkeypatch) -> None:
    """The property above can fail: with escaping removed it catches the raw ESC."""
    monkeypatch.setattr(console, "escape", lambda raw, limit=4096: (
        raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)))
    with pytest.raises(AssertionError, match="raw control"):
        assert_terminal_safe(denial_line(event_with(b"gt\x1b[2J", b"/dev/nvidia0")))


def test_injectivity_check_fails_against_a_lossy_escape(monkeypatch) -> None:
    """An escape that maps bad bytes to U+FFFD (as 'replace' would) is caught."""
    lossy = lambda raw, limit=4096: terminal_text.escape(  # noqa: E731
        raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw)
    assert lossy(b"\xff") == lossy(b"\xfe")  # what the injectivity test rejects
    assert escape(b"\xff") != escape(b"\xfe")


# ------------------------------------------------------------- JSON

@fuzz(1500)
@given(st.binary(max_size=64), st.binary(max_size=300) | HOSTILE_BYTES,
       st.booleans())
def test_json_round_trip_is_lossless(comm: bytes, path: bytes, relative: bool) -> None:
    ran("Event JSON round trip (bytes comm/path)")
    event = event_with(comm, path)
    event.node.path_as_given = path[1:] if relative else None
    line = json.dumps(event.to_json())
    assert "\n" not in line  # one event, one journal line
    back = Event.from_json(json.loads(line))
    assert back.process.comm == comm
    assert back.node.path == path
    assert back.node.path_as_given == event.node.path_as_given


def test_json_round_trip_of_a_4096_byte_path() -> None:
    path = b"/dev/nvidia-" + bytes(range(1, 256)) * 16
    path = path[:4096]
    back = Event.from_json(json.loads(json.dumps(event_with(b"\xff\xfe", path).to_json())))
    assert back.node.path == path and back.process.comm == b"\xff\xfe"


def test_json_round_trip_would_catch_lossy_bytes() -> None:
    """Without the `_b64` sibling invalid UTF-8 would come back as U+FFFD."""
    wire = event_with(b"\xff", b"/dev/nvidia\xfe").to_json()
    assert base64.b64decode(wire["process"]["comm_b64"]) == b"\xff"
    del wire["process"]["comm_b64"]
    assert Event.from_json(wire).process.comm != b"\xff"


# ------------------------------------------------------------- real kernel

@pytest.mark.kernel
def test_watch_prints_no_raw_control_byte_for_hostile_comm_and_path() -> None:
    """A real process with escapes, bidi overrides and invalid UTF-8 in its comm
    and in the node path it opens: the BPF sensor catches it and `gputrace watch`
    shows every byte escaped, while `--json` keeps them exactly."""
    from tests.support import actor
    from tests.support.nodes import NodeSpec, make_node, unique
    from tests.test_watch_cli import start_watch, stop_watch

    comm = b"g\x1b[2J\xe2\x80\xae\xff\x07"
    suffix = "-\x1b]0;x\x07\u202e\u2028\r" + os.fsdecode(b"\xfe")
    path = f"/dev/nvidia-{unique()}{suffix}"
    make_node(path, NodeSpec(major=195, minor=94, mode=0o600))
    try:
        text_watch, json_watch = start_watch(), start_watch("--json", "--no-explain")
        try:
            res = actor.spawn({"uid": 1703, "gid": 1703, "groups": [],
                               "comm_b64": base64.b64encode(comm).decode(),
                               "actions": [{"op": "open", "path": path}]}).check()
            assert res.errnos() == [13]
            import time
            time.sleep(1.5)
        finally:
            out, _ = stop_watch(text_watch)
            json_out, _ = stop_watch(json_watch)
    finally:
        os.unlink(path)
    for line in out.splitlines():
        assert_terminal_safe(line)
    mine = [line for line in out.splitlines() if f"pid={res.pid} " in line]
    assert mine, out
    assert "comm=g\\x1b[2J\\u202e\\xff\\x07" in mine[0]
    assert "\\x1b]0;x\\x07\\u202e\\u2028\\x0d\\xfe" in mine[0]
    events = [Event.from_json(json.loads(l)) for l in json_out.splitlines() if l.strip()]
    caught = [e for e in events if e.process.pid == res.pid and e.kind == "denial"]
    assert caught and caught[0].process.comm == comm[:15]
    assert caught[0].node.path == os.fsencode(path)
