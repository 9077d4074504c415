"""Every command, given bad arguments, missing files or files of the wrong
format, exits non-zero with one `gputrace: error:` line and no traceback; and
`gputrace explain` on hostile files answers 0 or 5, never an internal error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

GPUTRACE = [sys.executable, "-m", "tracer"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(GPUTRACE + list(args), input=stdin, capture_output=True, timeout=120,
                          cwd=REPO, env={**os.environ, "GPUTRACE_DEBUG": ""})


def assert_one_line_error(proc: subprocess.CompletedProcess, status: int) -> str:
    err = proc.stderr.decode("utf-8", "replace")
    lines = [l for l in err.splitlines() if l.strip()]
    assert proc.returncode == status, (proc.returncode, err)
    assert "Traceback" not in err and "internal error" not in err, err
    errors = [l for l in lines if l.startswith("gputrace: error: ")]
    assert len(errors) == 1, err
    assert all(l.startswith("gputrace: ") for l in lines), err  # nothing else leaks out
    return errors[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gttest-cli")
    paths = {
        "binary": d / "binary.jsonl", "deep": d / "deep.jsonl", "nan": d / "nan.jsonl",
        "yaml_bad": d / "bad.yaml", "yaml_key": d / "key.yaml", "yaml_type": d / "type.yaml",
        "yaml_bin": d / "bin.yaml", "empty_journal": d / "journal",
    }
    paths["binary"].write_bytes(bytes(range(256)) * 4)
    paths["deep"].write_text("[" * 100000 + "\n")
    paths["nan"].write_text(json.dumps({"time": float("nan"), "syscall": "openat",
                                        "process": {"pid": 1}}) + "\n")
    paths["yaml_bad"].write_text("sensor: [\n")
    paths["yaml_key"].write_text("sensor:\n  no_such_key: 1\n")
    paths["yaml_type"].write_text("metrics:\n  port: many\n")
    paths["yaml_bin"].write_bytes(b"\xff\xfe\x00garbage")
    return {k: str(v) for k, v in paths.items()}


CASES = [
    # (name, argv, status); `{x}` is replaced by files[x]
    ("no such command", ["frobnicate"], 2),
    ("watch unknown option", ["watch", "--bogus"], 2),
    ("watch bad errno", ["watch", "--errno", "ENOTANERRNO"], 2),
    ("watch empty errno", ["watch", "--errno", ","], 2),
    ("watch bad device", ["watch", "--device", "x:y"], 2),
    ("watch bad duration", ["watch", "--duration", "soon"], 2),
    ("watch bad sensor", ["watch", "--sensor", "magic"], 2),
    ("explain missing file", ["explain", "/nonexistent/gttest.jsonl"], 2),
    ("explain a directory", ["explain", "/"], 2),
    ("explain binary", ["explain", "{binary}"], 5),
    ("explain deep nesting", ["explain", "{deep}"], 5),
    ("explain NaN time", ["explain", "{nan}"], 5),
    ("explain no argument", ["explain"], 2),
    ("check bad option", ["check", "--bogus"], 2),
    ("daemon missing config", ["daemon", "--config", "/nonexistent/gttest.yaml"], 5),
    ("daemon config is a dir", ["daemon", "--config", "/", "--check-config"], 5),
    ("daemon bad yaml", ["daemon", "--config", "{yaml_bad}", "--check-config"], 5),
    ("daemon unknown key", ["daemon", "--config", "{yaml_key}", "--check-config"], 5),
    ("daemon wrong type", ["daemon", "--config", "{yaml_type}", "--check-config"], 5),
    ("daemon binary config", ["daemon", "--config", "{yaml_bin}", "--check-config"], 5),
    ("report missing config", ["report", "--config", "/nonexistent/gttest.yaml"], 5),
    ("report bad format", ["report", "--format", "xml"], 2),
    ("report bad yaml", ["report", "--config", "{yaml_bad}"], 5),
]


@pytest.mark.parametrize("name,argv,status", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_error(files, name: str, argv: list[str], status: int) -> None:
    argv = [a.format(**files) for a in argv]
    assert_one_line_error(run(*argv), status)


def test_report_bad_since_is_one_line_error(tmp_path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"journal:\n  dir: {tmp_path}/journal\n")
    proc = run("report", "--config", str(config), "--since", "yesterday-ish")
    assert proc.returncode != 0
    assert_one_line_error(proc, proc.returncode)


def test_report_unwritable_output_is_one_line_error(tmp_path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"journal:\n  dir: {tmp_path}/journal\n")
    assert_one_line_error(run("report", "--config", str(config), "-o",
                              "/nonexistent/gttest/report.md"), 5)


def test_check_unknown_user_is_one_line_error() -> None:
    proc = run("check", "--user", "gtnosuchuser")
    assert proc.returncode != 0
    assert_one_line_error(proc, proc.returncode)


def test_explain_stdin_garbage_then_good_line_exits_zero() -> None:
    good = {"time": 1_700_000_000, "syscall": "openat", "errno": "EACCES",
            "process": {"pid": 1, "comm": "x\u001b[2J"}, "node": {"path": "/dev/nvidia0"}}
    proc = run("explain", "-", stdin=b"\xff\xfe\n" + b"[" * 5000 + b"\n" +
               json.dumps(good).encode() + b"\n")
    assert proc.returncode == 0, proc.stderr
    assert b"\x1b" not in proc.stdout and b"comm=x\\x1b[2J" in proc.stdout
    assert proc.stderr.decode().strip() == "gputrace: skipped 2 unreadable lines (bad_json 2)"


def test_one_line_check_fails_on_a_traceback() -> None:
    """The helper above can fail: a command that crashes is caught."""
    crash = subprocess.run([sys.executable, "-c", "raise RuntimeError('x')"],
                           capture_output=True)
    with pytest.raises(AssertionError):
        assert_one_line_error(crash, 1)


def test_journal_reader_survives_deep_nesting(tmp_path) -> None:
    from tracer.sinks import journal
    directory = tmp_path / "journal"
    directory.mkdir()
    good = {"time": 1_700_000_000, "syscall": "openat", "process": {"pid": 1}}
    (directory / journal.CURRENT).write_text("[" * 100000 + "\n" + json.dumps(good) + "\n")
    read = journal.read_journal(str(directory))
    assert len(read.events) == 1 and read.lost_total == 1
