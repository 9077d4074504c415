"""`gputrace explain` and `gputrace check` from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.nodes import NodeSpec, make_node, unique

GPUTRACE = [sys.executable, "-m", "tracer"]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(GPUTRACE + list(args), input=stdin, capture_output=True, text=True,
                          timeout=60)


RECORDED = {
    "time": "2026-11-22T10:00:00.000000Z", "kind": "denial", "sensor": "bpf",
    "syscall": "openat", "errno": "EACCES", "count": 1, "key": "1:3:13:0",
    "process": {"pid": 999999, "tid": 999999, "comm": "nvidia-smi", "uid": 1000, "gid": 1000,
                "fsuid": 1000, "fsgid": 1000, "groups": [1000], "cap_effective": "0",
                "userns": {"inum": 4026531837, "level": 0, "owner_uid": 0}},
    "node": {"path": "/dev/nvidia0", "major": 195, "minor": 0},
}


def test_explain_reads_recorded_events_and_counts_bad_lines(tmp_path):
    src = tmp_path / "events.jsonl"
    src.write_text(json.dumps(RECORDED) + "\n{not json\n" + json.dumps({"time": 1}) + "\n")
    proc = run("explain", "--json", str(src))
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(out) == 1 and out[0]["verdict"]["reason"]
    assert out[0]["process"]["pid"] == 999999
    assert "skipped 2 unreadable lines" in proc.stderr and "bad_json 1" in proc.stderr


def test_explain_from_stdin_prints_the_why():
    proc = run("explain", "-", stdin=json.dumps(RECORDED) + "\n")
    assert proc.returncode == 0, proc.stderr
    assert "openat /dev/nvidia0 (195:0) EACCES" in proc.stdout and "why: [" in proc.stdout


@pytest.mark.parametrize("content", ["garbage\n", "[1, 2]\n"])
def test_explain_of_a_file_with_no_event_is_a_one_line_error(tmp_path, content):
    src = tmp_path / "bad.jsonl"
    src.write_text(content)
    proc = run("explain", str(src))
    assert proc.returncode == 5 and proc.stderr.strip().splitlines()[-1].startswith("gputrace: error:")
    assert "Traceback" not in proc.stderr


def test_explain_missing_file_is_a_one_line_error():
    proc = run("explain", "/nonexistent/events.jsonl")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("gputrace: error:") and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.kernel
def test_check_predicts_a_group_node_for_a_user_outside_the_group():
    path = f"/dev/nvidia-{unique()}"
    make_node(path, NodeSpec(major=195, minor=91, mode=0o660, gid=44))
    try:
        proc = run("check", "--user", "nobody", "--runtime", "host", "--json")
        assert proc.returncode == 0, proc.stderr
        rows = [json.loads(line) for line in proc.stdout.splitlines()]
        mine = [r for r in rows if r["node"] == path]
        assert mine and mine[0]["allowed"] is False and mine[0]["errno"] == "EACCES"
        assert mine[0]["reason"] == "not_in_group"
        assert "dac: refuses (dac_other)" in mine[0]["ladder"]
        root = run("check", "--user", "root", "--runtime", "host", "--json")
        assert [json.loads(l) for l in root.stdout.splitlines() if path in l][0]["allowed"] is True
        bind = run("check", "--user", "nobody", "--runtime", "docker-bind-mount")
        lines = bind.stdout.splitlines()
        at = next(n for n, line in enumerate(lines) if line.startswith(path))
        assert "device_cgroup" in lines[at] and "device_cgroup_v1: refuses" in " ".join(lines[at:at + 4])
    finally:
        os.unlink(path)


def test_check_unknown_user_is_a_one_line_error():
    proc = run("check", "--user", "gt-no-such-user-xyz")
    assert proc.returncode == 5 and "Traceback" not in proc.stderr
