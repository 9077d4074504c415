"""Device rules taken away by a real `systemctl daemon-reload` (issue 17; CAUSES #5,
NVIDIA/nvidia-container-toolkit#48 and #251, opencontainers/runc#3708).

systemd is PID 1 of a privileged podman container (tests/support/systemd_container.py);
gputrace runs there as its unit, installed the README's way, before any workload.
runc starts containers with the systemd cgroup driver, so systemd owns each
container's scope and re-applies the scope's DeviceAllow= list at daemon-reload.

* A GPU granted outside the container's OCI config, the way the NVIDIA legacy
  hook does it (the node made and `c 195:N rw` written to devices.allow after
  the container was created): opens, then daemon-reload drops it, then EPERM.
  gputrace must say it was revoked, when, what changed, and by whom (systemd,
  inferred: v1 writes carry no author), and offer fixes that survive a re-apply.
  `gputrace check --containers` must list the node before the reload.
* A GPU in the OCI config (`linux.devices`, as `--device` writes it) but without a
  /dev/char/195:M link: this runc (1.1.5) skips such a rule for systemd, so the
  reload drops it too.  gputrace must not offer --device (already applied) but the
  /dev/char links; with the link made first, the same reload keeps the rule (ENXIO).
"""

from __future__ import annotations

import json
import os
import random
from typing import Any, Iterator

import pytest

from tests.support.daemon_proc import REPO
from tests.support.nodes import unique
from tests.support.systemd_container import SystemdContainer
from tests.test_systemd_real import free_port, wait_for

pytestmark = [pytest.mark.kernel, pytest.mark.podman]
JOURNAL = "/var/lib/gputrace/journal/current.jsonl"
BUNDLES = "/var/lib/gttest-revoked"


@pytest.fixture(scope="module")
def systemd() -> Iterator[SystemdContainer]:
    container = SystemdContainer(REPO).start()
    try:
        yield container
    finally:
        container.remove()


@pytest.fixture(scope="module")
def unit(systemd: SystemdContainer) -> SystemdContainer:
    """gputrace.service, installed by the README's commands and running."""
    systemd.install_gputrace(free_port())
    wait_for(lambda: "daemon ready" in systemd.journal("gputrace"),
             lambda: "the daemon: " + systemd.journal("gputrace")[-2000:], timeout=300)
    assert "access-change probes unavailable" not in systemd.journal("gputrace")
    return systemd


class SystemdRunc:
    """A runc container in the systemd container, with the systemd cgroup driver."""

    def __init__(self, systemd: SystemdContainer, devices: list[tuple[str, int]]) -> None:
        self.systemd = systemd
        self.id = unique("gtrev")
        self.bundle = f"{BUNDLES}/{self.id}"
        self.devices = devices
        self.pid = 0

    def start(self) -> "SystemdRunc":
        sh = self.systemd.sh
        for path, minor in self.devices:  # the host has the node, as with a real GPU
            sh(f"test -e {path} || mknod -m 0666 {path} c 195 {minor}")
        sh(f"mkdir -p {self.bundle}/rootfs/bin {self.bundle}/rootfs/dev {self.bundle}/rootfs/proc"
           f" && cp /bin/busybox {self.bundle}/rootfs/bin/ && cd {self.bundle} && runc spec")
        spec = json.loads(sh(f"cat {self.bundle}/config.json").stdout)
        spec["process"].update(terminal=False, args=["/bin/busybox", "sleep", "600"])
        spec["root"]["readonly"] = False
        spec["linux"]["cgroupsPath"] = f"system.slice:gttest:{self.id}"
        for path, minor in self.devices:  # what --device writes into the spec
            spec["linux"].setdefault("devices", []).append(
                {"path": path, "type": "c", "major": 195, "minor": minor, "fileMode": 0o666,
                 "uid": 0, "gid": 0})
            spec["linux"]["resources"]["devices"].append(
                {"allow": True, "type": "c", "major": 195, "minor": minor, "access": "rw"})
        sh(f"cat > {self.bundle}/config.json <<'EOT'\n{json.dumps(spec)}\nEOT")
        sh(f"cd {self.bundle} && runc --systemd-cgroup run -d {self.id} "
           f"> {self.bundle}/runc.log 2>&1 < /dev/null")
        state = json.loads(sh(f"runc state {self.id}").stdout)
        self.pid = int(state["pid"])
        return self

    def devices_dir(self) -> str:
        cgroup = self.systemd.sh(f"cat /proc/{self.pid}/cgroup").stdout
        path = next(line.split(":", 2)[2] for line in cgroup.splitlines() if ":devices:" in line)
        return f"/sys/fs/cgroup/devices{path}"

    def grant_like_the_hook(self, path: str, minor: int) -> None:
        """As nvidia-container-runtime-hook does after create: the node (the host has it
        too, as with a real GPU), then its rule."""
        self.systemd.sh(f"(test -e {path} || mknod -m 0666 {path} c 195 {minor}) && "
                        f"mknod -m 0666 /proc/{self.pid}/root{path} c 195 {minor} && "
                        f"echo 'c 195:{minor} rw' > {self.devices_dir()}/devices.allow")

    def cat(self, path: str) -> str:
        return self.systemd.sh(f"runc exec {self.id} /bin/busybox cat {path}", check=False).stderr

    def refused_after_reload(self, path: str) -> dict[str, Any]:
        """`systemctl daemon-reload`, then the open is refused: the daemon's explained event."""
        self.systemd.sh("systemctl daemon-reload")
        assert "Operation not permitted" in self.cat(path)
        return journal_denial(self.systemd, path)

    def remove(self) -> None:
        self.systemd.sh(f"runc kill {self.id} KILL; sleep 0.5; runc delete -f {self.id}",
                        check=False)


def journal_denial(systemd: SystemdContainer, path: str) -> dict[str, Any]:
    """The daemon's explained EPERM for `path`, from its journal."""
    found: list[dict[str, Any]] = []

    def seen() -> bool:
        text = systemd.sh(f"cat {JOURNAL}", check=False).stdout
        found[:] = [e for e in map(json.loads, filter(None, text.splitlines()))
                    if e.get("kind") == "denial" and e.get("errno") == "EPERM"
                    and (e.get("node") or {}).get("path") == path]
        return bool(found)
    wait_for(seen, lambda: "the EPERM of " + path + " in the journal: "
             + systemd.journal("gputrace")[-1500:], timeout=60)
    return found[0]


def fix_commands(verdict: dict[str, Any]) -> list[str]:
    return [fix["command"] for fix in verdict["fixes"]]


def test_daemon_reload_takes_away_a_gpu_granted_outside_the_config(unit: SystemdContainer) -> None:
    minor = random.randint(100, 199)
    path = f"/dev/nvidia-gtrev{minor}"
    container = SystemdRunc(unit, []).start()
    try:
        container.grant_like_the_hook(path, minor)
        assert "No such device or address" in container.cat(path)  # allowed: no driver behind it

        # predicted before it happens: allowed now, not in the config, lost at the next re-apply
        rows = [json.loads(line) for line in unit.sh(
            "gputrace check --containers --json").stdout.splitlines()]
        ours = [r for r in rows if r["node"] == path]
        print("gputrace check --containers:", ours)
        assert ours and ours[0]["at_risk"] and ours[0]["allowed_now"] is True \
            and ours[0]["in_config"] is False and ours[0]["manager"] == "systemd", rows
        text = unit.sh("gputrace check --containers").stdout
        print(text)
        assert "LOST AT RE-APPLY" in text and path in text
        event = container.refused_after_reload(path)
    finally:
        container.remove()
    verdict = event["verdict"]
    print("verdict:", json.dumps({k: verdict[k] for k in ("reason", "summary", "notes")}, indent=1))
    print("fixes:", fix_commands(verdict)[:4])
    assert verdict["reason"] == "device_cgroup_revoked", verdict
    assert "systemd" in verdict["summary"] and "outside the container's OCI config" in \
        verdict["summary"], verdict["summary"]
    dropped = [n for n in verdict["notes"] if n.startswith("Dropped at")]
    assert dropped and f"- c 195:{minor} rw" in dropped[0], verdict["notes"]
    changes = event["facts"]["device_cgroup.changes"]["value"]
    assert any(f"c 195:{minor} rw" in (c["before"] or []) and f"c 195:{minor} rw" not in
               (c["after"] or []) for c in changes), changes
    commands = fix_commands(verdict)
    assert any("--device" in c for c in commands[:3]), commands
    assert any("create-dev-char-symlinks" in c for c in commands), commands
    assert any("cgroupdriver=cgroupfs" in c for c in commands), commands
    stop_gap = [f for f in verdict["fixes"] if "devices.allow" in f["command"]]
    assert stop_gap and stop_gap[0]["summary"].startswith("Stop-gap"), verdict["fixes"]
    assert verdict["fixes"][0] is not stop_gap[0]


def test_a_configured_gpu_without_its_dev_char_link_is_dropped_too(unit: SystemdContainer) -> None:
    minor = random.randint(200, 230)
    path = f"/dev/nvidia-gtrev{minor}"
    container = SystemdRunc(unit, [(path, minor)]).start()
    try:
        assert "No such device or address" in container.cat(path)
        event = container.refused_after_reload(path)
    finally:
        container.remove()
    verdict = event["verdict"]
    print("verdict:", verdict["reason"], verdict["summary"], fix_commands(verdict)[:3])
    assert verdict["reason"] == "device_cgroup_revoked", verdict
    assert "OCI config grants" in verdict["summary"] and f"/dev/char/195:{minor}" in \
        verdict["summary"], verdict["summary"]
    commands = fix_commands(verdict)
    assert not any("--device" in c for c in commands), commands  # the user already did that
    assert commands[0] == "nvidia-ctk system create-dev-char-symlinks --create-all", commands


def test_with_its_dev_char_link_the_configured_gpu_survives_the_reload(unit: SystemdContainer) -> None:
    """The fix the previous verdict gives, applied: the rule is kept."""
    minor = random.randint(231, 250)
    path = f"/dev/nvidia-gtrev{minor}"
    unit.sh(f"mknod -m 0666 {path} c 195 {minor} && mkdir -p /dev/char && "
            f"ln -sf ../{os.path.basename(path)} /dev/char/195:{minor}")
    container = SystemdRunc(unit, [(path, minor)]).start()
    try:
        unit.sh("systemctl daemon-reload")
        assert "No such device or address" in container.cat(path)
    finally:
        container.remove()
        unit.sh(f"rm -f /dev/char/195:{minor} {path}", check=False)
