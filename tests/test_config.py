"""The YAML configuration: defaults, file:line errors, the docs table, and the
one-line errors `gputrace daemon` gives for bad files."""

from __future__ import annotations

import dataclasses
import os
import typing

import pytest
import yaml

from tests.support.daemon_proc import REPO, run_cli
from tracer import config as config_mod
from tracer.config import Config, parse
from tracer.errors import BadInput

BAD = {
    "unknown key": ("journal:\n  max_file: 10\n", "x.yaml:2: unknown key 'journal.max_file'"),
    "unknown top key": ("state_dir: /tmp\nverbose: true\n", "x.yaml:2: unknown key 'verbose'"),
    "wrong type": ("metrics:\n  port: high\n", "x.yaml:2: 'metrics.port' must be an integer, not 'high'"),
    "bool for int": ("journal:\n  max_files: true\n", "x.yaml:2: 'journal.max_files' must be an integer"),
    "not a list": ("sensor:\n  errnos: EACCES\n", "x.yaml:2: 'sensor.errnos' must be a list"),
    "section scalar": ("sensor: 3\n", "x.yaml:1: sensor must be a mapping of keys"),
    "bad choice": ("\nsensor:\n  hook: kprobe\n", "x.yaml:3: 'sensor.hook' must be one of auto, fexit, tracepoint"),
    "bad errno": ("sensor:\n  errnos: [EACCES, ENOPE]\n", "x.yaml:2: 'sensor.errnos': unknown errno name 'ENOPE'"),
    "bad device": ("sensor:\n  extra_devices: [\"195:x\"]\n", "x.yaml:2: 'sensor.extra_devices': '195:x'"),
    "below minimum": ("journal:\n  max_file_bytes: 10\n", "x.yaml:2: 'journal.max_file_bytes' must be at least 4096"),
    "ringbuf not a power of two": ("sensor:\n  hook: auto\n  ringbuf_pages: 1000\n",
                                   "x.yaml:3: 'sensor.ringbuf_pages' must be a power of two, not 1000"),
    "relative prefix": ("sensor:\n  extra_prefixes:\n    - /dev/ok\n    - dev/x\n",
                        "x.yaml:4: 'sensor.extra_prefixes': 'dev/x' must be an absolute path"),
    "long prefix": ("sensor:\n  extra_prefixes: [/dev/%s]\n" % ("x" * 40),
                    "x.yaml:2: 'sensor.extra_prefixes': '/dev/xxxx"),
    "port too high": ("metrics:\n  port: 99999\n", "x.yaml:2: 'metrics.port' must be at most 65535"),
    "duplicate": ("metrics:\n  port: 1\n  port: 2\n", "x.yaml:3: duplicate key 'metrics.port'"),
    "bad yaml": ("metrics:\n  port: [1\n", "x.yaml:3: not valid YAML"),
    "huge yaml version": ("%YAML 1." + "9" * 5000 + "\n", "x.yaml: not valid YAML"),
    "tab indent": ("metrics:\n\tport: 1\n", "x.yaml:2: not valid YAML"),
    "top list": ("- a\n", "x.yaml:1: the configuration must be a mapping"),
}


def test_empty_file_and_comments_are_the_defaults():
    assert parse("") == Config()
    assert parse("# nothing set\n") == Config()


def test_values_are_read_with_types():
    cfg = parse("state_dir: /srv/gt\nsensor:\n  errnos: [EACCES, ENOENT]\n  extra_devices: [195, '226:128']\n"
                "  aggregate_interval_s: 2\n  btf: null\nmetrics:\n  port: 9999\n  enabled: false\n")
    assert cfg.state_dir == "/srv/gt" and cfg.journal_dir == "/srv/gt/journal"
    assert cfg.errno_numbers() == (13, 2) and cfg.device_pairs() == ((195, None), (226, 128))
    assert cfg.sensor.aggregate_interval_s == 2.0 and isinstance(cfg.sensor.aggregate_interval_s, float)
    assert cfg.metrics.port == 9999 and cfg.metrics.enabled is False
    assert cfg.socket_path == "/run/gputrace/events.sock" and cfg.lock_path == "/run/gputrace/daemon.lock"


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_configs_name_file_line_and_reason(name):
    text, expected = BAD[name]
    with pytest.raises(BadInput) as info:
        parse(text, "x.yaml")
    message = str(info.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_every_key_is_documented_in_the_table_and_docs_file():
    table = config_mod.docs_table()
    def keys(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from keys(hints[f.name], f.name + ".")
            else:
                assert f.metadata.get("doc"), f"{prefix}{f.name} has no documentation"
                yield prefix + f.name
    names = list(keys(Config))
    assert len(names) >= 20
    for name in names:
        assert f"| `{name}` |" in table
    with open(os.path.join(REPO, "docs", "configuration.md"), encoding="utf-8") as handle:
        assert table in handle.read(), "docs/configuration.md is stale: python -m tracer.config"


def test_example_yaml_round_trips():
    assert parse(config_mod.example_yaml()) == Config()


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(BadInput, match="no such configuration file"):
        config_mod.load(str(tmp_path / "none.yaml"))


@pytest.mark.parametrize("name", ["unknown key", "wrong type", "bad yaml",
                                  "ringbuf not a power of two"])
def test_daemon_refuses_bad_config_with_one_line(tmp_path, name):
    text, expected = BAD[name]
    path = tmp_path / "x.yaml"
    path.write_text(text)
    done = run_cli("daemon", "--config", str(path), timeout=60)
    assert done.returncode == 5, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gputrace: error: {path}:")
    assert expected.split(": ", 1)[1] in lines[0]
    report = run_cli("report", "--config", str(path), timeout=60)
    assert report.returncode == 5 and report.stderr.strip().splitlines() == lines
    check = run_cli("daemon", "--config", str(path), "--check-config", timeout=60)
    assert check.returncode == 5 and check.stderr.strip().splitlines() == lines  # they agree


def test_check_config_prints_the_effective_configuration(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("metrics:\n  port: 9555\n")
    done = run_cli("daemon", "--config", str(path), "--check-config")
    assert done.returncode == 0, done.stderr
    effective = yaml.safe_load(done.stdout)
    assert effective["metrics"]["port"] == 9555 and effective["journal"]["max_files"] == 8
