"""`gputrace watch` as a user runs it: a real process, real denials, Ctrl-C."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support import actor
from tests.support.nodes import NodeSpec, make_node, unique

pytestmark = pytest.mark.kernel
GPUTRACE = [sys.executable, "-m", "tracer"]


def start_watch(*args: str) -> subprocess.Popen:
    proc = subprocess.Popen(GPUTRACE + ["watch", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    seen = b""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen += line
        if b"watching" in line:
            proc.startup_stderr = seen.decode(errors="replace")  # type: ignore[attr-defined]
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"watch did not start: {seen.decode(errors='replace')}")


def stop_watch(proc: subprocess.Popen) -> tuple[str, str]:
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return out.decode(), err.decode()


@pytest.fixture
def hostile_node():
    path = f"/dev/nvidia-{unique()}-\x1b[31m\x07"
    make_node(path, NodeSpec(major=195, minor=90, mode=0o600))
    yield path
    os.unlink(path)


def test_watch_json_lines_and_clean_ctrl_c(hostile_node):
    proc = start_watch("--json")
    try:
        comm = b"gt\x1b[2Jx"
        res = actor.spawn({"uid": 1700, "gid": 1700, "groups": [44],
                           "comm_b64": base64.b64encode(comm).decode(),
                           "actions": [{"op": "open", "path": hostile_node}] * 3}).check()
        time.sleep(2.5)  # past one sweep, so the repeat count is out
    finally:
        out, err = stop_watch(proc)
    events = []
    for line in out.split("\n"):
        if line:
            try:
                events.append(json.loads(line))
            except ValueError as exc:
                raise AssertionError(f"not one JSON object per line ({exc}): {line!r}") from None
    mine = [e for e in events if e["process"]["pid"] == res.pid]
    first = mine[0]
    assert first["kind"] == "denial" and first["sensor"] == "bpf"
    assert first["syscall"] == "openat" and first["errno"] == "EACCES"
    assert first["process"]["uid"] == 1700 and first["process"]["groups"] == [44]
    assert first["process"]["comm"] == comm.decode() and "\x1b" in first["node"]["path"]
    for key in ("time", "count", "node", "process"):
        assert key in first
    for key in ("pid", "tid", "ppid", "comm", "uid", "gid", "fsuid", "fsgid", "groups",
                "userns", "cgroup_id"):
        assert key in first["process"]
    assert {"inum", "level"} <= set(first["process"]["userns"])
    assert {"path", "major", "minor"} <= set(first["node"])
    assert max(e["count"] for e in mine) == 3
    summary = err.strip().splitlines()[-1]
    assert "denial events" in summary and "repeats aggregated" in summary and "dropped" in summary


def test_watch_text_escapes_control_characters(hostile_node):
    proc = start_watch()
    try:
        res = actor.spawn({"uid": 1701, "gid": 1701, "groups": [],
                           "comm_b64": base64.b64encode(b"ev\x1b]0;t\x07").decode(),
                           "actions": [{"op": "open", "path": hostile_node}]}).check()
        time.sleep(1.0)
    finally:
        out, _err = stop_watch(proc)
    line = next(l for l in out.splitlines() if f"pid={res.pid} " in l)
    assert "\x1b" not in out and "\x07" not in out
    assert "comm=ev\\x1b]0;t\\x07" in line
    assert "\\x1b[31m\\x07" in line and "EACCES" in line and "uid=1701" in line


def run_cli(*args: str, env: dict | None = None, user: int | None = None) -> subprocess.CompletedProcess:
    def drop() -> None:
        if user is not None:
            os.setgroups([])
            os.setresgid(user, user, user)
            os.setresuid(user, user, user)
    return subprocess.run(GPUTRACE + list(args), capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, preexec_fn=drop, cwd="/")


def one_line_error(proc: subprocess.CompletedProcess, status: int, needle: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == status, proc.stderr
    assert lines[-1].startswith("gputrace: error: ") and needle in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_not_root_is_one_line_error():
    env = {"PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    one_line_error(run_cli("watch", env=env, user=65534), 3, "CAP_BPF")


def test_missing_btf_is_one_line_error():
    one_line_error(run_cli("watch", "--sensor", "bpf", "--btf", "/nonexistent/vmlinux"), 4, "no BTF")


def test_unusable_headers_is_one_line_error(tmp_path):
    one_line_error(run_cli("watch", "--sensor", "bpf", env={"BCC_KERNEL_SOURCE": str(tmp_path)}), 4, "kernel header")


def test_missing_tracefs_is_one_line_error(tmp_path):
    one_line_error(run_cli("watch", "--sensor", "bpf", "--tracefs", str(tmp_path / "none")), 4, "tracefs")


def test_bad_option_is_one_line_usage_error():
    one_line_error(run_cli("watch", "--errno", "ENOTANERRNO"), 2, "--errno")
    one_line_error(run_cli("watch", "--prefix", "dev/relative"), 2, "--prefix")
    one_line_error(run_cli("watch", "--device", "195:x"), 2, "--device")


def test_auto_sensor_falls_back_to_audit_and_says_why(tmp_path):
    node = f"/dev/nvidia-{unique()}"
    make_node(node, NodeSpec(major=195, minor=92, mode=0o600))
    proc = start_watch("--json", "--btf", str(tmp_path / "no-btf"))
    try:
        time.sleep(1.0)
        res = actor.spawn({"uid": 1702, "gid": 1702, "groups": [],
                           "actions": [{"op": "open", "path": node}]}).check()
        time.sleep(3.0)
    finally:
        out, err = stop_watch(proc)
        os.unlink(node)
    err = proc.startup_stderr + err
    assert "falling back to Linux audit" in err and "no BTF" in err
    mine = [json.loads(l) for l in out.splitlines() if f'"pid": {res.pid},' in l]
    assert mine, (out[-2000:], err)
    assert mine and mine[0]["sensor"] == "audit" and mine[0]["node"]["path"] == node
    assert mine[0]["process"]["uid"] == 1702 and mine[0]["errno"] == "EACCES"


def test_exited_process_gets_its_user_namespace_facts_from_the_cache():
    """The first denial from a user namespace snapshots its facts; a later process
    of the same namespace that is gone before enrichment still gets them."""
    node = f"/dev/nvidia-{unique()}"
    make_node(node, NodeSpec(major=195, minor=93, mode=0o600))
    proc = start_watch("--json")
    drop = ["setpriv", "--reuid=1810", "--regid=1810", "--clear-groups"]
    holder = subprocess.Popen([*drop, "unshare", "--user", "--map-root-user", "sh", "-c",
                               f"cat {node}; sleep 20"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{holder.pid}/ns/user") == os.readlink("/proc/self/ns/user"):
            assert time.monotonic() < deadline, "the holder never entered its namespace"
            time.sleep(0.05)
        time.sleep(2.0)  # the holder's denial is seen and its namespace primed
        # several short-lived processes: each is usually gone before it is enriched
        quick = [subprocess.run([*drop, "nsenter", "--preserve-credentials",
                                 f"--user=/proc/{holder.pid}/ns/user", "--",
                                 "sh", "-c", f"cat {node}; exit 0"], capture_output=True)
                 for _ in range(3)]
        time.sleep(2.0)
    finally:
        holder.kill()
        holder.wait()
        out, _err = stop_watch(proc)
        os.unlink(node)
    assert all(q.returncode == 0 for q in quick), [q.stderr for q in quick]
    events = [json.loads(l) for l in out.split("\n") if l and node in l]
    denials = [e for e in events if e["kind"] == "denial"]
    assert len(denials) >= 4, denials
    inum = denials[0]["process"]["userns"]["inum"]
    later = [e for e in denials[1:] if e["process"]["userns"]["inum"] == inum]
    assert len(later) == 3, "the later processes of the namespace were not all seen"
    exited = [e for e in later if e["facts"]["process.live"]["value"] is False]
    assert exited, "every later process was still alive when enriched"
    for event in exited:
        gid_map = event["facts"].get("userns.gid_map")
        assert gid_map is not None and gid_map["source"] == "cached", event["facts"]


def test_watch_attaches_to_a_running_daemon(tmp_path):
    from tests.support.daemon_proc import DaemonProcess, service_config, write_config

    path = write_config(str(tmp_path), service_config(str(tmp_path)))
    daemon = DaemonProcess(path).start()
    node = f"/dev/nvidia-{unique()}"
    make_node(node, NodeSpec(major=195, minor=97, mode=0o600))
    try:
        proc = subprocess.Popen(GPUTRACE + ["watch", "--json", "--config", path],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        first = b""
        while b"attached" not in first and time.monotonic() < deadline:
            first += proc.stderr.readline()
        assert b"attached to the running gputrace daemon" in first, first
        res = actor.spawn({"uid": 1703, "gid": 1703, "groups": [],
                           "actions": [{"op": "open", "path": node}]}).check()
        time.sleep(3.0)
        out, err = stop_watch(proc)
    finally:
        daemon.stop()
        os.unlink(node)
    mine = [json.loads(l) for l in out.splitlines() if f'"pid": {res.pid},' in l]
    assert mine and mine[0]["verdict"]["reason"]  # explained by the daemon
    assert "repeats aggregated" in err


def test_watch_without_a_daemon_says_it_runs_standalone(tmp_path):
    from tests.support.daemon_proc import service_config, write_config

    path = write_config(str(tmp_path), service_config(str(tmp_path)))
    proc = start_watch("--config", path, "--duration", "1")
    out, err = proc.communicate(timeout=60)
    assert "no daemon at" in proc.startup_stderr and "running standalone" in proc.startup_stderr
    assert proc.returncode == 0
