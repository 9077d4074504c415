"""systemd/: the unit passes `systemd-analyze verify`, its sysusers/tmpfiles snippets
apply to a scratch root, and the daemon really runs with only the unit's
capabilities (and refuses to start with one fewer)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

from tests.support import actor
from tests.support.daemon_proc import GPUTRACE, REPO, DaemonProcess, service_config, write_config
from tests.support.nodes import NodeSpec, make_node, unique
from tracer import config as config_mod
from tracer.config import Config
from tracer.sinks.journal import read_journal

UNIT = os.path.join(REPO, "systemd", "gputrace.service")
SYSUSERS = os.path.join(REPO, "systemd", "gputrace.sysusers.conf")
TMPFILES = os.path.join(REPO, "systemd", "gputrace.tmpfiles.conf")


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with open(UNIT, encoding="utf-8") as handle:
        for line in handle:
            if "=" in line and not line.startswith(("#", "[")):
                key, _, value = line.strip().partition("=")
                out.setdefault(key, []).append(value)
    return out


def bounding_set() -> list[str]:
    return unit_settings()["CapabilityBoundingSet"][0].split()


def test_systemd_analyze_verify_passes(tmp_path):
    wrapper = tmp_path / "gputrace"
    wrapper.write_text(f"#!/bin/sh\nexec {' '.join(GPUTRACE[:1])} -m tracer \"$@\"\n")
    wrapper.chmod(0o755)
    with open(UNIT, encoding="utf-8") as handle:
        text = handle.read().replace("/usr/bin/gputrace", str(wrapper))
    unit = tmp_path / "gputrace.service"
    unit.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    broken = tmp_path / "broken" / "gputrace.service"
    broken.parent.mkdir()
    broken.write_text(text.replace("Restart=on-failure", "Restart=sometimes"))
    bad = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True, text=True)
    assert "restart specifier" in bad.stderr  # the check does read what we wrote


def test_unit_hardening_and_paths_match_the_config_defaults():
    s = unit_settings()
    assert s["ProtectSystem"] == ["strict"] and s["Restart"] == ["on-failure"]
    assert s["NoNewPrivileges"] == ["yes"] and s["Type"] == ["notify"]
    assert s["StateDirectory"] == ["gputrace"] and Config().state_dir == "/var/lib/gputrace"
    assert s["RuntimeDirectory"] == ["gputrace"] and Config().runtime_dir == "/run/gputrace"
    # the default configuration path, where a missing file means defaults
    assert s["ExecStart"] == ["/usr/bin/gputrace daemon"] and \
        config_mod.DEFAULT_PATH == "/etc/gputrace/config.yaml"
    assert set(s["RestartPreventExitStatus"][0].split()) == {"5", "6"}
    assert "PrivateDevices" not in s  # GPU nodes must stay visible
    with open(UNIT, encoding="utf-8") as handle:
        comments = "".join(line for line in handle if line.startswith("#"))
    assert bounding_set() and "CAP_SYS_ADMIN" not in bounding_set()
    for cap in bounding_set():
        assert re.search(rf"^#\s+{cap}\s+\S", comments, re.M), f"{cap} is not explained"


def test_sysusers_and_tmpfiles_apply_to_a_scratch_root(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group"):
        shutil.copy(f"/etc/{name}", root / "etc" / name)
    done = subprocess.run(["systemd-sysusers", f"--root={root}", SYSUSERS], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^gputrace:x:\d+:", (root / "etc" / "group").read_text(), re.M)
    done = subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create", TMPFILES],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert oct((root / "var/lib/gputrace").stat().st_mode & 0o777) == "0o750"
    assert (root / "etc/gputrace").is_dir()


def _setpriv(caps: list[str]) -> list[str]:
    spec = ",".join(["-all"] + ["+" + c.removeprefix("CAP_").lower() for c in caps])
    return ["setpriv", f"--bounding-set={spec}", "--inh-caps=-all", "--"]


@pytest.mark.kernel
def test_daemon_runs_with_only_the_units_capabilities(tmp_path):
    cfg = write_config(str(tmp_path), service_config(str(tmp_path)))
    node = f"/dev/nvidia-{unique()}"
    make_node(node, NodeSpec(major=195, minor=78, mode=0o600))
    daemon = DaemonProcess(cfg, prefix=_setpriv(bounding_set()))
    try:
        daemon.start()
        held = actor.start({"uid": 1792, "gid": 1792, "groups": [], "hold": True,
                            "actions": [{"op": "open", "path": node}]})
        held.wait()
        try:
            deadline = time.monotonic() + 20
            mine = []
            while not mine and time.monotonic() < deadline:
                mine = [e for e in read_journal(os.path.join(str(tmp_path), "state", "journal")).events
                        if e.process.pid == held.pid]
                time.sleep(0.1)
        finally:
            held.release()
        assert mine and mine[0].verdict and mine[0].verdict["reason"] != "unknown"
        assert mine[0].facts.get("process.live") is True  # /proc/PID readable
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        os.unlink(node)


@pytest.mark.kernel
@pytest.mark.parametrize("missing", ["CAP_BPF", "CAP_PERFMON"])
def test_one_capability_fewer_is_a_one_line_refusal(tmp_path, missing):
    cfg = write_config(str(tmp_path), service_config(str(tmp_path)))
    caps = [c for c in bounding_set() if c != missing]
    done = subprocess.run(_setpriv(caps) + GPUTRACE + ["daemon", "--config", cfg],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("gputrace: error: loading BPF probes needs")
