"""Property tests for what reads recorded events back: `Event.from_json`,
`explain_records` and the console sink behind `gputrace explain`, the journal
reader, and the YAML configuration loader.  Recorded files travel (bug
tickets, support bundles): any content must give an event or the errors their
callers catch, and the CLI must answer with exit 0 or 5 and one line."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import tempfile
from collections import Counter

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz.example_counts import fuzz, print_example_counts, ran  # noqa: F401
from tests.test_hostile_strings import assert_terminal_safe
from tracer import cli
from tracer import config
from tracer.event import Event, Node, Process, UserNs
from tracer.facts import Facts
from tracer.sinks import journal
from tracer.sinks.console import ConsoleSink
from tracer.verdict.explain import explain_records

# What explain_records and read_journal catch around Event.from_json.
CALLER_CATCHES = (KeyError, ValueError, TypeError)

JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=True, allow_infinity=True),
                        st.sampled_from([1e308, -1e308, 1e19, 2**64, "0x10", "EACCES", "13",
                                         "2024-01-01T00:00:00Z", "9999-12-31T23:59:59Z",
                                         "\x1b[31m", "", "AAAA", "!!"]),
                        st.text(max_size=12))
JSON_VALUE = st.recursive(JSON_SCALAR, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                          max_leaves=8)


@functools.lru_cache(maxsize=1)
def live_facts_json() -> str:
    """Facts as enrichment really writes them (this test process, /dev/null)."""
    from tracer.enrichment.enricher import Enricher
    from tracer.host import HostPaths
    me = os.getpid()
    event = Event(time=1_700_000_000.0, sensor="bpf", syscall="openat", errno=13,
                  process=Process(pid=me, tid=me, uid=os.getuid(), gid=os.getgid()),
                  node=Node(path=b"/dev/null", major=1, minor=3))
    Enricher(HostPaths()).enrich(event)
    return json.dumps(event.facts.to_json())


def valid_event_json() -> dict:
    event = Event(time=1_700_000_000.25, sensor="bpf", syscall="ioctl", errno=1,
                  process=Process(pid=7, tid=8, comm=b"c\xff", groups=[44], ngroups=1,
                                  userns=UserNs(4026531837, 0, 0), loginuid=1000, sessionid=3),
                  node=Node(path=b"/dev/nvidia0", major=195, minor=0, path_as_given=b"nvidia0"),
                  count=2, open_flags=2, ioctl_cmd=0xC020462A, key="7:5:1:8000000000c30000",
                  missing=["process.cgroup_id"], facts=Facts.from_json(json.loads(live_facts_json())))
    return json.loads(json.dumps(event.to_json()))


def all_paths(value: object, here: tuple = ()) -> list[tuple]:
    out = [here]
    if isinstance(value, dict):
        for key, child in value.items():
            out += all_paths(child, here + (key,))
    return out


@st.composite
def mutated_event(draw: st.DrawFn) -> object:
    """A valid event with a few fields replaced by any JSON value or removed."""
    doc = valid_event_json()
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in all_paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.integers(0, 4)) == 0:
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON_VALUE)
    return doc


def check_from_json(doc: object) -> None:
    """Either an event that every consumer can handle, or what callers catch."""
    try:
        event = Event.from_json(doc)  # type: ignore[arg-type]
    except CALLER_CATCHES:
        return
    line = json.dumps(event.to_json())  # NaN inside recorded facts stays NaN
    assert json.dumps(Event.from_json(json.loads(line)).to_json()) == line
    out = io.StringIO()
    ConsoleSink(out).consume(event)
    for text in out.getvalue().splitlines():
        assert_terminal_safe(text)


@fuzz(1500)
@given(mutated_event())
@example({"time": 1e400, "syscall": "openat", "process": {"pid": 1}})
@example({"time": 0, "syscall": "openat", "process": {"pid": 1e400}})
@example({"time": 0, "syscall": "\x1b[2J", "process": {"pid": 1}})
@example({"time": 0, "syscall": "openat", "process": {"pid": 1, "userns": []}})
@example({"time": 0, "syscall": "openat", "process": {"pid": 1},
          "node": {"major": "\x1b[31m"}})
@example({"time": 0, "syscall": "ioctl", "process": {"pid": 1}, "ioctl_cmd": 1.5})
@example({"time": 0, "syscall": "openat", "process": {"pid": 1}, "kind": "x",
          "verdict": [1]})
def test_from_json_mutated_events(doc: object) -> None:
    ran("Event.from_json (mutated events)")
    check_from_json(doc)


@fuzz(1000)
@given(JSON_VALUE)
def test_from_json_any_json(doc: object) -> None:
    ran("Event.from_json (any JSON)")
    check_from_json(doc)


@fuzz(800)
@given(st.lists(st.one_of(mutated_event().map(json.dumps), st.text(max_size=40),
                          st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape"))),
                max_size=5))
def test_explain_records_and_console(lines: list[str]) -> None:
    """What `gputrace explain` does with each line, in process."""
    ran("explain_records + console sink")
    errors: Counter[str] = Counter()
    out = io.StringIO()
    sink = ConsoleSink(out)
    records = list(explain_records(lines, errors=errors))
    for record in records:
        if record.event is not None:
            sink.consume(record.event)
        else:
            assert record.error in ("bad_json", "missing_field", "bad_event", "bad_facts")
    for text in out.getvalue().splitlines():
        assert_terminal_safe(text)


@pytest.fixture(scope="module")
def scratch_dir():
    with tempfile.TemporaryDirectory(prefix="gttest-fuzz-") as path:
        yield path


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(argv)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def jsonl_files(max_lines: int) -> st.SearchStrategy[bytes]:
    """File contents: up to `max_lines` lines, each a mutated event or raw bytes."""
    return st.lists(st.one_of(mutated_event().map(lambda d: json.dumps(d).encode()),
                              st.binary(max_size=60)), max_size=max_lines).map(b"\n".join)


@fuzz(500)
@given(jsonl_files(4))
def test_explain_cli_on_any_file(scratch_dir: str, content: bytes) -> None:
    """`gputrace explain FILE`: exit 0 or 5, errors on one line, no traceback."""
    ran("gputrace explain FILE (in process)")
    path = os.path.join(scratch_dir, "events.jsonl")
    with open(path, "wb") as handle:
        handle.write(content)
    for argv in (["explain", path], ["explain", "--json", path]):
        code, out, err = run_cli(argv)
        assert code in (0, 5), (code, err)
        assert "Traceback" not in err and "internal error" not in err, err
        assert len([l for l in err.splitlines() if l.startswith("gputrace: error")]) <= 1
        if "--json" not in argv:
            for text in out.splitlines():
                assert_terminal_safe(text)


@fuzz(400)
@given(jsonl_files(5))
def test_journal_reader_on_any_file(scratch_dir: str, content: bytes) -> None:
    ran("journal.read_journal")
    directory = os.path.join(scratch_dir, "journal")
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))
    with open(os.path.join(directory, journal.CURRENT), "wb") as handle:
        handle.write(content)
    got = journal.read_journal(directory)
    lines = [l for l in content.split(b"\n") if l]
    assert len(got.events) + got.lost_total == len(lines)


YAML_ATOMS = st.sampled_from(["sensor:", "journal:", "metrics:", "  errnos:", "  - EACCES",
                              "  - 1e999", "  port: 99999", "  port: -1", "  dir: ", "&a", "*a",
                              "!!python/object:os.system", "{", "[", "'", '"', ": ", "- ",
                              "\t", "?", "%YAML 1.1", "---", "...", "~", "\x00", "\ufeff",
                              "9" * 5000, "<<: *a", "devices: [195:*]", "  prefixes: [1]"])
YAML_TEXT = st.lists(st.one_of(YAML_ATOMS, st.text(max_size=8)), max_size=12).map("".join)
YAML_LINES = st.lists(st.lists(st.one_of(YAML_ATOMS, st.text(max_size=6)), max_size=4)
                      .map("".join), max_size=8).map("\n".join)


@fuzz(800)
@given(YAML_TEXT | YAML_LINES)
def test_config_loader_on_any_text(text: str) -> None:
    from tracer.errors import BadInput
    ran("config.parse (YAML)")
    try:
        parsed = config.parse(text, "fuzz.yaml")
    except BadInput as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith("fuzz.yaml"), message
        return
    assert parsed.sensor.errnos
