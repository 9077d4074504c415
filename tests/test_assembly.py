"""`watch` and the daemon build their pipeline with the same functions
(tracer/assembly.py) from one `Config`; `watch`'s flags only replace the
sensor section and the explain switch."""

from __future__ import annotations

import io
import json
import threading

from tests.test_event_facts import AUDIT_HOST, ListSensor
from tests.test_audit_records import replay
from tracer import config as config_mod
from tracer.assembly import Sources, bpf_config, build_pipeline, explain_stages_for
from tracer.sinks.console import ConsoleSink

FILE = ("sensor:\n  ringbuf_pages: 256\n  aggregate_max: 4096\n  errnos: [EACCES]\n"
        "pipeline:\n  queue_size: 50\n  rate_limit_per_cgroup: 1\n  rate_limit_burst: 1\n")


def watch_settings(explain: bool = True) -> config_mod.Config:
    return config_mod.with_sensor(
        config_mod.parse(FILE, "x.yaml"), kind="audit", errnos=("EACCES", "ENOENT"),
        extra_prefixes=("/dev/gttest-",), extra_devices=("195:7", "226"), hook="tracepoint",
        transport="perf", tracefs="/sys/kernel/tracing", btf=None, watch_nodes=False,
        explain=explain)


def test_watch_flags_replace_the_sensor_section_and_keep_the_rest() -> None:
    settings = watch_settings()
    config = bpf_config(settings)
    assert config.errnos == (13, 2) and config.extra_devs == ((195, 7), (226, None))
    assert (config.hook, config.transport, config.extra_prefixes) == \
        ("tracepoint", "perf", ("/dev/gttest-",))
    assert config.ringbuf_pages == 256 and config.aggregate_max == 4096  # from the file
    assert settings.pipeline.queue_size == 50 and settings.sensor.kind == "audit"


def test_one_build_gives_the_configured_bounds_and_stages() -> None:
    for explain in (True, False):
        events, _ = replay("captured")
        assert len(events) >= 2 and len({e.process.cgroup_id for e in events}) == 1
        settings = watch_settings(explain)
        out = io.StringIO()
        stages = explain_stages_for(settings, AUDIT_HOST)
        assert (len(stages.stages), stages.on_arrival is not None) == \
            ((1, True) if explain else (0, False))
        pipeline = build_pipeline(settings, Sources(ListSensor(events), "test"), stages,
                                  [ConsoleSink(out, as_json=True)], lambda e, exc: None)
        assert pipeline.queue_size == 50
        summary = pipeline.run(threading.Event())
        assert summary.sensor_stats["dropped_rate_limited"] == len(events) - 1  # burst 1
        [line] = [json.loads(text) for text in out.getvalue().splitlines()]
        assert (line.get("verdict") is not None) == explain
