"""Rootless podman from a shell without a login session (`su -`, `sudo -iu`, cron,
SSH without pam_systemd): XDG_RUNTIME_DIR is unset, no /run/user/UID exists, and
podman keeps runc's state in /tmp/podman-run-UID/runc.  The container must be
named in the event of `gputrace watch` (a real process), and again with watch
running as the unit runs the daemon: only the unit's capability bounding set,
and a /tmp of its own (PrivateTmp=yes), where /tmp/podman-run-UID is not."""

from __future__ import annotations

import grp
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.support import podman as podman_support
from tests.support.probe import probe_binary
from tests.support.scenario_workspace import Scenario

pytestmark = [pytest.mark.kernel, pytest.mark.podman]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(REPO, "systemd", "gputrace.service")
RESULTS = os.environ.get("GPUTRACE_ROOTLESS_RESULTS", "/tmp/gttest-rootless-results.jsonl")


def unit_bounding_set() -> list[str]:
    with open(UNIT, encoding="utf-8") as f:
        line = next(ln for ln in f if ln.startswith("CapabilityBoundingSet="))
    return line.split("=", 1)[1].split()


def as_the_unit(argv: list[str], token: str) -> list[str]:
    """argv in a mount namespace with a private /tmp (the checkout, if under /tmp,
    bound back, as the README's BindReadOnlyPaths drop-in does), as root with only
    the unit's capabilities."""
    caps = ",".join("+" + c[len("CAP_"):].lower() for c in unit_bounding_set())
    keep = f"/run/gttest-keep-{token}"
    script = (f'set -e; mkdir -p {keep}; mount --bind "$1" {keep}; '
              f'mount -t tmpfs -o mode=1777 tmpfs /tmp; mkdir -p "$1"; mount --bind {keep} "$1"; '
              f'shift; exec setpriv --bounding-set -all,{caps} --inh-caps=-all -- "$@"')
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
            REPO, *argv]


def start_watch(argv: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    deadline = time.monotonic() + 90
    seen = b""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()  # type: ignore[union-attr]
        seen += line
        if b"watching" in line:
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"watch did not start: {seen.decode(errors='replace')[-600:]}")


def stop_watch(proc: subprocess.Popen) -> list[dict]:
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode(errors="replace")[-600:]
    return [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]


def run_without_session(scenario: Scenario, watch_argv: list[str], label: str) -> None:
    video = grp.getgrnam("video")
    node = scenario.nvidia_node(0o660, video.gr_gid)
    user = scenario.user("nos", groups=["video"], home=True)
    assert not os.path.exists(f"/run/user/{user.pw_uid}")
    engine = podman_support.Podman(runtime="runc", user=user)
    env = {k: v for k, v in engine.env().items() if k != "XDG_RUNTIME_DIR"}
    rootfs = podman_support.video_rootfs(
        scenario.workdir, probe_binary(), (user.pw_uid, user.pw_gid), video.gr_gid)
    name = f"gttest-nosession-{scenario.token}"
    scenario.undo(f"podman rm {name}", lambda: subprocess.run(
        engine.argv("rm", "--force", "--ignore", name), env=env, capture_output=True, cwd="/"))
    scenario.undo("user's podman processes", podman_support.kill_processes_of_uid, user.pw_uid)
    watch = start_watch(watch_argv)
    try:
        done = subprocess.run(engine.argv("run", "--rm", "--name", name, "--network=none",
                                          "--device", f"{node.path}:{node.path}", "--group-add",
                                          "keep-groups", "--rootfs", rootfs, "/gtprobe", node.path,
                                          "0", scenario.token),
                              env=env, cwd="/", capture_output=True, text=True, timeout=120)
        assert f"token={scenario.token}" in done.stdout and "errno=13" in done.stdout, \
            done.stdout + done.stderr[-600:]
        assert os.path.isdir(f"/tmp/podman-run-{user.pw_uid}/runc")  # where podman kept it
        time.sleep(2)
    finally:
        events = stop_watch(watch)
    mine = [e for e in events if e.get("kind") == "denial" and e["process"]["comm"] == "gtprobe"
            and e["node"]["path"] == node.path]
    assert mine, [(e.get("kind"), e.get("process", {}).get("comm")) for e in events][-10:]
    event = mine[0]
    facts = {k: v.get("value") for k, v in event["facts"].items() if isinstance(v, dict)}
    verdict = event.get("verdict") or {}
    with open(RESULTS, "a", encoding="utf-8") as out:
        out.write(json.dumps({"case": label, "engine": facts.get("container.engine"),
                              "name": facts.get("container.name"),
                              "name_from": event["facts"].get("container.name", {}).get("origin"),
                              "state_read_from": event["facts"].get("container.runtime", {})
                              .get("origin"),
                              "reason": verdict.get("reason")}) + "\n")
    assert facts.get("container.engine") == "podman", {
        k: v for k, v in facts.items() if k.startswith(("container.", "process.", "userns."))}
    assert facts.get("container.name") == name, {k: v for k, v in facts.items()
                                                 if k.startswith("container.")}
    # runc drops the user's groups in the user namespace (CAUSES #1); the setgroups probe
    # records runc's init doing it, which is the runtime applying its config, not a
    # process dropping a grant (unknown when the container was gone before the node
    # could be looked at in it)
    assert verdict.get("reason") in ("group_dropped_in_userns", "unknown"), verdict
    assert not any("usermod" in (f.get("command") or "") for f in verdict.get("fixes") or [])


def test_rootless_podman_without_xdg_runtime_dir_is_named_under_watch():
    with Scenario("nosession") as scenario:
        run_without_session(scenario, [sys.executable, "-m", "tracer", "watch", "--json",
                                       "--standalone", "--no-nodes"], "watch, as root")


def test_rootless_podman_without_xdg_runtime_dir_is_named_under_the_units_capabilities():
    with Scenario("nosession-unit") as scenario:
        try:
            run_without_session(scenario, as_the_unit(
                [sys.executable, "-m", "tracer", "watch", "--json", "--standalone", "--no-nodes"],
                scenario.token), "watch under the unit's bounding set and a private /tmp")
        finally:
            try:
                os.rmdir(f"/run/gttest-keep-{scenario.token}")
            except OSError:
                pass


def test_the_unit_keeps_the_capabilities_this_test_grants():
    assert all(re.fullmatch(r"CAP_[A-Z_]+", c) for c in unit_bounding_set())


def test_a_state_root_in_another_mount_namespaces_tmp_is_reached_through_its_root(tmp_path):
    """The unit's PrivateTmp=yes: /tmp/podman-run-UID is in the host's /tmp, not ours.
    Here the roles are swapped: a process whose private /tmp holds the directory,
    which ours does not show; RootReacher opens it through /proc/PID/root."""
    from tracer.enrichment.state_roots import RootReacher
    from tracer.host import HostPaths
    token = os.urandom(3).hex()
    named = f"/tmp/gttest-private-{token}/runc"
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
         f"mount -t tmpfs tmpfs /tmp && mkdir -p {named}/ctr-{token} && echo ready && sleep 30"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        pid = int(subprocess.run(["pgrep", "-P", str(holder.pid), "sleep"], capture_output=True,
                                 text=True).stdout.split()[0])
        assert not os.path.exists(named)  # not in our mount namespace
        reached = RootReacher(HostPaths()).reach(pid, named)
        assert reached is not None and re.fullmatch(r"/proc/self/fd/\d+/\.", reached), reached
        assert os.listdir(reached) == [f"ctr-{token}"]
    finally:
        holder.kill()
        holder.wait()


def test_the_state_root_without_a_session_is_found_from_conmon_and_read():
    """No list names /tmp/podman-run-UID/runc: the kernel's exec signal leads to the
    container's conmon, whose XDG_RUNTIME_DIR (podman set it to /tmp/podman-run-UID)
    gives runc's root; the container is snapshotted from it while it lives."""
    from tests.support.followed_sensor import followed_sensor
    video = grp.getgrnam("video")
    with Scenario("nosession-root") as scenario, followed_sensor() as (sensor, follower):
        user = scenario.user("nor", groups=["video"], home=True)
        engine = podman_support.Podman(runtime="runc", user=user)
        env = {k: v for k, v in engine.env().items() if k != "XDG_RUNTIME_DIR"}
        rootfs = podman_support.video_rootfs(
            scenario.workdir, probe_binary(), (user.pw_uid, user.pw_gid), video.gr_gid)
        name = f"gttest-nosession-root-{scenario.token}"
        scenario.undo("user's podman processes", podman_support.kill_processes_of_uid, user.pw_uid)
        done = subprocess.run(engine.argv("run", "--rm", "--name", name, "--network=none",
                                          "--rootfs", rootfs, "sh", "-c", "sleep 1.5"),
                              env=env, cwd="/", capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-600:]
        snaps = [s for s in list(follower.tracker.store._items.values())
                 if s.facts.get("container.name") and s.facts["container.name"].value == name]
        held = dict(follower.reacher._held)
    assert snaps, follower.tracker.store.stats()
    state_dir = snaps[0].facts["container.runtime"].origin
    named = f"/tmp/podman-run-{user.pw_uid}/runc"
    # podman's rootless mount namespace (conmon's) is not ours: reached through its root
    reached = [path for (_, root), path in held.items() if root == named]
    assert reached or named + "/" in state_dir, (held, state_dir)
    assert any(state_dir.startswith(f"runc state {p}/") for p in reached + [named]), state_dir
