"""GPU node lifecycle from inotify and kernel uevents, on the real kernel."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from tests.support.nodes import NodeSpec, make_node, unique
from tracer.event import Event
from tracer.sensors.node_watch import NodeWatcher

pytestmark = pytest.mark.kernel


def collect(watcher: NodeWatcher, until, timeout: float = 5.0) -> list[Event]:
    seen: list[Event] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(seen):
        seen += watcher.poll(0.1)
    return seen


def changes(events: list[Event], path: str) -> list[str]:
    return [e.facts.get("node.change") for e in events if e.node.path == path.encode()]


def test_created_mode_owner_acl_removed():
    watcher = NodeWatcher(use_uevents=False)
    watcher.start()
    path = f"/dev/nvidia-{unique()}"
    try:
        steps = [
            ("created", lambda: make_node(path, NodeSpec(major=195, minor=94, mode=0o600))),
            ("mode_changed", lambda: os.chmod(path, 0o660)),
            ("owner_changed", lambda: os.chown(path, 0, 44)),
            ("acl_changed", lambda: subprocess.run(["setfacl", "-m", "u:1234:rw", path],
                                                    check=True)),
            ("removed", lambda: os.unlink(path)),
        ]
        seen: list[Event] = []
        for change, step in steps:
            step()
            seen += collect(watcher, lambda ev: change in changes(ev, path))
            assert changes(seen, path)[-1] == change, changes(seen, path)
        created = [e for e in seen if e.node.path == path.encode()][0]
        assert (created.node.major, created.node.minor) == (195, 94)
        assert created.kind == "node" and created.to_json()["errno"] is None
    finally:
        if os.path.exists(path):
            os.unlink(path)
        watcher.close()


def test_unrelated_files_are_ignored():
    watcher = NodeWatcher(use_uevents=False)
    watcher.start()
    path = f"/dev/gtplain-{unique()}"
    try:
        with open(path, "w"):
            pass
        os.unlink(path)
        marker = f"/dev/nvidia-{unique()}"
        make_node(marker, NodeSpec(major=195, minor=95))
        os.unlink(marker)
        seen = collect(watcher, lambda ev: changes(ev, marker)[-1:] == ["removed"])
        assert changes(seen, marker) and not changes(seen, path)
    finally:
        watcher.close()


def test_kernel_uevent_for_a_watched_major():
    """A real uevent: ask the kernel to re-announce /dev/null (major 1), watched
    here as an extra major, as a driver would announce a GPU."""
    watcher = NodeWatcher(extra_majors=(1,))
    watcher.start()
    try:
        with open("/sys/devices/virtual/mem/null/uevent", "w") as trigger:
            trigger.write("change")
        seen = collect(watcher, lambda ev: any(e.sensor == "uevent" for e in ev))
        ours = [e for e in seen if e.sensor == "uevent" and e.node.path == b"/dev/null"]
        assert ours and ours[0].facts.get("node.change") == "device_change"
        assert (ours[0].node.major, ours[0].node.minor) == (1, 3)
    finally:
        watcher.close()


def test_watch_json_carries_node_events():
    from tests.test_watch_cli import start_watch, stop_watch  # same helpers as the CLI tests
    import json

    proc = start_watch("--json", "--no-explain")
    path = f"/dev/nvidia-{unique()}"
    try:
        make_node(path, NodeSpec(major=195, minor=96, mode=0o600))
        time.sleep(1.0)
        os.unlink(path)
        time.sleep(1.0)
    finally:
        out, _ = stop_watch(proc)
    mine = [json.loads(l) for l in out.split("\n") if l and path in l]
    assert [e["facts"]["node.change"]["value"] for e in mine][:1] == ["created"]
    assert mine[-1]["facts"]["node.change"]["value"] == "removed" and mine[-1]["kind"] == "node"


def test_watch_survives_a_node_name_that_is_not_utf8():
    """A GPU-looking node whose name is not UTF-8 (b'\\xfe\\xff'), created, re-permissioned,
    refused to another user and removed under a running watch: watch keeps running, every
    line is strict UTF-8 JSON, and the exact bytes come back from `*_b64` (event and facts)."""
    from tests.test_watch_cli import start_watch, stop_watch
    import base64
    import json
    import stat

    proc = start_watch("--json")
    path = b"/dev/nvidia-" + unique().encode() + b"-\xfe\xff"
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(195, 98))
        time.sleep(0.5)
        os.chmod(path, 0o640)
        time.sleep(0.5)
        opener = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
             "-c", "import os, sys\ntry: os.open(bytes.fromhex(sys.argv[1]), os.O_RDWR)\n"
                   "except OSError as e: print(e.errno)", path.hex()],
            capture_output=True, text=True, check=True)
        assert opener.stdout.strip() == "13"  # EACCES from the kernel
        time.sleep(1.0)
    finally:
        if os.path.lexists(path):
            os.unlink(path)
        time.sleep(1.0)
        proc.send_signal(2)
        raw_out, raw_err = proc.communicate(timeout=30)
    assert proc.returncode == 0, raw_err.decode(errors="replace")
    assert b"internal error" not in raw_err
    lines = [json.loads(line) for line in raw_out.decode("utf-8").splitlines() if line]  # strict

    def exact(obj: dict, key: str) -> bytes:
        return base64.b64decode(obj[key + "_b64"]) if key + "_b64" in obj else obj[key].encode()

    mine = [e for e in lines if e["node"].get("path_b64")
            and base64.b64decode(e["node"]["path_b64"]) == path]
    changes_seen = [e["facts"]["node.change"]["value"] for e in mine if e["kind"] == "node"]
    assert changes_seen[:2] == ["created", "mode_changed"] and changes_seen[-1] == "removed"
    assert "\ufffd" in mine[0]["node"]["path"]
    denial = [e for e in mine if e["kind"] == "denial"]
    assert len(denial) == 1 and denial[0]["errno"] == "EACCES"
    facts = denial[0]["facts"]
    assert exact({k: v["value"] for k, v in facts.items() if k.startswith("node.path")},
                 "node.path") == path
    # mode_restrictive when explained before the unlink; on a loaded machine the node may
    # already be gone (and the watcher's reading too late to vouch): then unknown
    assert denial[0]["verdict"]["reason"] in ("mode_restrictive", "unknown"), denial[0]["verdict"]
    assert "\udcfe" not in raw_out.decode("utf-8") and "\\udcfe" not in raw_out.decode("utf-8")
