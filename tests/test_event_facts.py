"""Event facts have one shape (name, value, source, origin): the sensor's facts
(audit exe/cwd/proctitle/keys, BPF loss markers) and enrichment's sit side by
side, survive explain (on by default in `watch` and the daemon) and the
journal, and are never overwritten by a later stage."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading

import pytest

from tests.test_audit_records import FIXTURES, replay
from tests.test_enrichment_fixtures import fixture_enricher, gentoo_denial
from tracer.event import Event
from tracer.facts import CACHED, KERNEL, LIVE, OLD_AUDIT_ORIGIN, SENSOR, Fact, Facts
from tracer.host import HostPaths
from tracer.pipeline import Pipeline
from tracer.sinks.console import ConsoleSink
from tracer.verdict.explain import explain, explain_records
from tracer.verdict.stage import explain_stages

AUDIT_HOST = HostPaths.under(os.path.join(FIXTURES, "host"))
OLD_JOURNAL = os.path.join(os.path.dirname(__file__), "fixtures", "journal",
                           "facts-before-one-shape.jsonl")
AUDIT_TASK_FACTS = ("audit.exe", "audit.cwd", "audit.proctitle", "audit.keys", "audit.serial")


def audit_event() -> Event:
    events, _ = replay("captured")
    event = events[0]
    assert event.sensor == "audit"
    return event


class ListSensor:
    def __init__(self, events: list[Event]) -> None:
        self._events = events

    def start(self) -> None:
        pass

    def events(self, stop: threading.Event):  # type: ignore[no-untyped-def]
        yield from self._events

    def stats(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


def test_audit_sensor_facts_are_typed_and_named_per_record() -> None:
    facts = audit_event().facts
    for name in AUDIT_TASK_FACTS + ("audit.mode", "audit.ouid"):
        fact = facts.fact(name)
        assert fact is not None and fact.source == SENSOR, name
    assert facts.get("audit.exe") == "/usr/bin/python3.11"
    assert facts.get("audit.keys") == ["gtforeign"]
    assert facts.get("audit.mode") == 0o20660 and facts.get("audit.ouid") == 0  # ints, not text
    assert facts.fact("audit.mode").origin == "audit PATH record"  # type: ignore[union-attr]
    assert facts.fact("audit.cwd").origin == "audit CWD record"  # type: ignore[union-attr]
    assert not facts.enriched()


def test_audit_facts_survive_the_explain_stage_watch_and_the_daemon_run() -> None:
    events, _ = replay("captured")
    before = {e.facts.get("audit.serial"): {n: e.facts.fact(n) for n in AUDIT_TASK_FACTS}
              for e in events}
    out = io.StringIO()
    on_arrival, stage = explain_stages(host=AUDIT_HOST)
    Pipeline(sensor=ListSensor(events), stages=[stage], sinks=[ConsoleSink(out, as_json=True)],
             on_arrival=on_arrival).run(threading.Event())
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == len(events) >= 2
    for line in lines:
        assert line["verdict"] is not None  # explain ran
        facts = Facts.from_json(line["facts"])
        assert facts.enriched() and facts.fact("process.uid") is not None  # enrichment's facts
        for name, fact in before[facts.get("audit.serial")].items():
            assert facts.fact(name) == fact, name  # ... beside the sensor's, unchanged


def test_sensor_facts_are_never_overwritten_by_enrichment() -> None:
    event = gentoo_denial()
    event.facts.put("node.mode", "0600", SENSOR, "node watcher, at the event")
    event.facts.put("sensor.unaggregated", True, SENSOR, "BPF event flag: table full")
    facts = fixture_enricher("gentoo-rootless-podman").enrich(event)
    assert facts is event.facts
    again = fixture_enricher("gentoo-rootless-podman").enrich(event)  # enriched twice
    assert again.fact("node.mode") == Fact("0600", SENSOR, "node watcher, at the event")
    assert again.fact("process.live") == facts.fact("process.live")
    assert facts.fact("node.mode") == Fact("0600", SENSOR, "node watcher, at the event")
    assert facts.get("sensor.unaggregated") is True
    assert facts.fact("process.live").source == LIVE  # type: ignore[union-attr]  # enrichment added
    assert facts.fact("process.fsuid").source == KERNEL  # type: ignore[union-attr]


def test_enriched_facts_round_trip_the_journal_in_one_shape() -> None:
    event = gentoo_denial(pid=4243)
    enricher = fixture_enricher("gentoo-rootless-podman")
    enricher.enrich(gentoo_denial(pid=4242))  # a sibling, seen live: its container is cached
    event.facts.put("sensor.first_event_lost", True, SENSOR, "count without its first event")
    explain(event, enricher)
    recorded = event.to_json()
    assert all(set(f) == {"value", "source", "origin"}
               for name, f in recorded["facts"].items() if name != "_skipped")
    again = Event.from_json(json.loads(json.dumps(recorded)))
    assert again.facts == event.facts
    assert again.facts.fact("userns.gid_map").source == CACHED  # type: ignore[union-attr]
    [result] = explain_records([json.dumps(recorded)])
    assert result.verdict is not None and result.event is not None
    assert result.event.facts.get("sensor.first_event_lost") is True


def test_old_journal_shapes_still_explain() -> None:
    """A journal written before facts had one shape (recorded from the old code):
    audit's facts under "audit", a bare BPF marker, bare node-watch values."""
    with open(OLD_JOURNAL) as fh:
        lines = fh.read().splitlines()
    audit, bpf, node = (Event.from_json(json.loads(line)) for line in lines)
    assert audit.facts.fact("audit.exe") == Fact("/usr/bin/python3.11", SENSOR, OLD_AUDIT_ORIGIN)
    assert audit.facts.get("audit.keys") == ["gtforeign"]
    assert audit.facts.get("audit.cwd") == "/" and len(audit.facts.get("audit.proctitle")) == 4
    assert bpf.facts.fact("sensor.unaggregated") == Fact(True, SENSOR)
    assert node.facts.get("node.change") == "created" and node.facts.get("node.mode") == "0660"
    assert not audit.facts.enriched() and not bpf.facts.enriched()
    with pytest.raises(ValueError):  # only names old sensors wrote may be bare values
        Facts.from_json({"cgroup.paths": [None]})
    for bad in ({"node.mode": -1}, {"node.uid": "0"}, {"sensor.unaggregated": 1}):
        with pytest.raises(ValueError):  # ... with the type those sensors wrote
            Facts.from_json(bad)
    results = list(explain_records(lines))
    assert [r.error for r in results] == [None, None, None]
    explained = results[0].event
    assert results[0].verdict is not None and explained is not None
    assert explained.facts.get("audit.exe") == "/usr/bin/python3.11"
    assert results[1].event is not None
    assert results[1].event.facts.get("sensor.unaggregated") is True


def test_explain_cli_keeps_audit_facts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    journal = tmp_path / "audit.jsonl"
    journal.write_text("".join(json.dumps(e.to_json()) + "\n" for e in replay("captured")[0]))
    done = subprocess.run([sys.executable, "-m", "tracer", "explain", "--json", str(journal)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines and all(line["verdict"] for line in lines)
    assert all(line["facts"]["audit.exe"]["value"] == "/usr/bin/python3.11" for line in lines)


def test_a_path_that_is_not_utf8_is_a_lossless_fact():
    """os.fsdecode'd paths carry surrogates that no sink can encode: the fact keeps the
    text with U+FFFD and the exact bytes in `<name>_b64`; nested values and origins too."""
    import base64
    import json
    import os

    from tracer.facts import SENSOR, Facts

    raw = b"/dev/nvidia-\xfe\xff"
    facts = Facts()
    facts.put("node.path", os.fsdecode(raw), SENSOR, "/proc/1/root" + os.fsdecode(raw))
    facts.put_bytes("audit.exe", b"/bin/\xff", SENSOR, "audit SYSCALL record")
    facts.put_bytes("audit.cwd", b"/tmp", SENSOR)
    facts.put("node.mount", {"mount_point": os.fsdecode(b"/m\xfe")}, SENSOR)
    wire = json.dumps(Facts.from_json(facts.to_json()).to_json(), ensure_ascii=False)
    wire.encode("utf-8")  # strict: no surrogate survives
    assert facts.get("node.path") == "/dev/nvidia-\ufffd\ufffd"
    assert base64.b64decode(facts.get("node.path_b64")) == raw
    assert base64.b64decode(facts.get("audit.exe_b64")) == b"/bin/\xff"
    assert "audit.cwd_b64" not in facts and facts.get("audit.cwd") == "/tmp"
    assert facts.get("node.mount") == {"mount_point": "/m\ufffd"}
    assert facts.fact("node.path").origin == "/proc/1/root/dev/nvidia-\ufffd\ufffd"
