"""The unit started by real systemd: systemd as PID 1 in a privileged podman
container over the host's root (tests/support/systemd_container.py).

The README's service commands are run exactly as written (less `sudo`), then:
`systemctl start` (through `enable --now`), the hardening `systemctl show`
reports and the kernel applied (/proc/MAINPID/status, a read-only /usr from the
service's mount namespace), a real denial inside the container in /metrics and
in `gputrace report`, `systemctl reload` (SIGHUP: same main pid, the daemon
says it reloaded), `systemctl stop` (clean exit, summary line).

The audit drop-in is installed the README's way too.  Linux audit answers only
processes in the initial PID and user namespaces, so a daemon under a systemd
that is PID 1 of a container cannot use it (checked: one-line refusal); the
drop-in's merged capability set is then proven on the host, by running the
daemon with exactly the bounding set systemd reports for the unit plus drop-in.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import subprocess
import time
import urllib.request
from typing import Callable, Iterator

import pytest

from tests.support.daemon_proc import REPO, DaemonProcess, service_config, write_config
from tests.support.nodes import NodeSpec, make_node, unique
from tests.support import systemd_container as systemd_support
from tests.support.systemd_container import SystemdContainer
from tests.test_audit_live import audit_state
from tests.test_daemon_service import metric_samples
from tests.test_systemd_unit import bounding_set
from tracer.sinks.journal import read_journal

pytestmark = [pytest.mark.kernel, pytest.mark.podman]

DENIED_UID = 1796
AUDIT_LOCK = os.path.join(os.path.dirname(__file__), "test_audit_live.py")  # shared with those tests
UNIT_CAPS = {"cap_bpf", "cap_perfmon", "cap_sys_ptrace", "cap_dac_read_search"}
AUDIT_CAPS = {"cap_audit_read", "cap_audit_control"}
CAP_BITS = {"cap_dac_read_search": 2, "cap_sys_ptrace": 19, "cap_audit_control": 30,
            "cap_audit_read": 37, "cap_perfmon": 38, "cap_bpf": 39}
HARDENING = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "read-only",
             "PrivateTmp": "yes", "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
             "ProtectControlGroups": "yes", "ProtectClock": "yes", "ProtectHostname": "yes",
             "RestrictRealtime": "yes", "RestrictSUIDSGID": "yes", "RestrictNamespaces": "yes",
             "LockPersonality": "yes", "SystemCallArchitectures": "native",
             "StateDirectory": "gputrace", "RuntimeDirectory": "gputrace",
             "CacheDirectory": "gputrace", "SupplementaryGroups": "gputrace", "UMask": "0027",
             "AmbientCapabilities": "", "Type": "notify"}


def readme_blocks() -> list[list[str]]:
    return systemd_support.readme_blocks(REPO)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def denials_total(port: int) -> float:
    return sum(metric_samples(scrape(port), "gputrace_denials_total").values())


def wait_for(check: Callable[[], bool], what: "str | Callable[[], str]",
             timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


def cap_mask(caps: set[str]) -> int:
    return sum(1 << CAP_BITS[c] for c in caps)


@pytest.fixture(scope="module")
def systemd() -> Iterator[SystemdContainer]:
    container = SystemdContainer(REPO).start()
    try:
        yield container
    finally:
        container.remove()


@pytest.fixture(scope="module")
def installed(systemd: SystemdContainer) -> Iterator[int]:
    """The README's install commands, with a configuration that only moves /metrics
    to a free port (the container shares the host's network)."""
    port = free_port()
    systemd.install_gputrace(port)
    yield port


def test_the_unit_runs_under_systemd_with_its_hardening(systemd: SystemdContainer,
                                                        installed: int) -> None:
    port = installed
    wait_for(lambda: systemd.show("gputrace", "ActiveState")["ActiveState"] == "active",
             "gputrace.service to become active", timeout=240)
    journal = systemd.journal("gputrace")
    assert "daemon ready: sensor bpf" in journal, journal

    shown = systemd.show("gputrace", "CapabilityBoundingSet", "MainPID", "LimitMEMLOCK",
                         "RestrictAddressFamilies", "ExecStart", *HARDENING)
    print("systemctl show gputrace:", json.dumps(shown, indent=1, sort_keys=True))
    assert set(shown["CapabilityBoundingSet"].split()) == UNIT_CAPS
    assert {k: shown[k] for k in HARDENING} == HARDENING
    assert set(shown["RestrictAddressFamilies"].split()) == \
        {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert shown["LimitMEMLOCK"] == "infinity"
    pid = int(shown["MainPID"])
    status = systemd.sh(f"cat /proc/{pid}/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert int(fields["CapBnd"], 16) == cap_mask(UNIT_CAPS)
    assert int(fields["CapEff"], 16) == cap_mask(UNIT_CAPS)
    assert fields["NoNewPrivs"].strip() == "1" and fields["Seccomp"].strip() == "2"
    probe = f"/usr/gttest-{unique()}"
    ro = systemd.sh(f"nsenter -t {pid} -m touch {probe}", check=False)
    assert ro.returncode != 0 and "Read-only file system" in ro.stderr
    systemd.sh(f"nsenter -t {pid} -m sh -c 'touch /var/lib/gputrace/.w && rm /var/lib/gputrace/.w'")

    # a real denial inside the container
    node = f"/dev/nvidia-gtsvc-{unique()}"
    before = denials_total(port)
    systemd.sh(f"mknod -m 0600 {node} c 195 43 && ! setpriv --reuid={DENIED_UID} "
               f"--regid={DENIED_UID} --clear-groups python3 -c 'open(\"{node}\")'")
    wait_for(lambda: denials_total(port) >= before + 1, "the denial in /metrics")
    print("/metrics after the denial:", {dict(k).get("reason"): v for k, v in metric_samples(
        scrape(port), "gputrace_denials_total").items() if ("node_class", "nvidia-gpu") in k})
    attached = metric_samples(scrape(port), "gputrace_probe_attached")
    assert attached[(("hook", "tracepoint"), ("sensor", "bpf"), ("transport", "ringbuf"))] == 1 \
        or any(v == 1 for k, v in attached.items() if ("sensor", "bpf") in k)
    report = json.loads(systemd.sh("gputrace report --format json").stdout)
    ours = [(cause["reason"], n) for cause in report["causes"] for n in cause["nodes"]
            if n["path"] == node]
    assert ours and ours[0][0] == "mode_restrictive" and ours[0][1]["count"] == 1, ours

    # reload: SIGHUP, same process, configuration re-read
    systemd.sh("systemctl reload gputrace")
    wait_for(lambda: "configuration reloaded" in systemd.journal("gputrace"), "the reload")
    after = systemd.show("gputrace", "MainPID", "ActiveState")
    assert after == {"MainPID": str(pid), "ActiveState": "active"}

    # stop: SIGTERM, drained, exit 0, summary line
    systemd.sh("systemctl stop gputrace")
    stopped = systemd.show("gputrace", "ActiveState", "Result", "ExecMainStatus")
    assert stopped == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    summary = [line for line in systemd.journal("gputrace").splitlines() if "stopped:" in line]
    assert summary and "denial events" in summary[-1]
    print("reload and stop:", after, stopped, summary[-1])


V2_REFUSAL = """
import json, sys
from tests.support import actor
from tests.support.v2_device_cgroup import deny_major, v2_device_cgroup
with v2_device_cgroup(deny_major(195, "runc")) as cgroup:
    result = actor.spawn({"cgroup_procs": [cgroup + "/cgroup.procs"],
                          "actions": [{"op": "open", "path": sys.argv[1], "flags": "O_RDWR"}]})
    print(json.dumps(result.check().errnos()))
"""


def journal_events(systemd: SystemdContainer, path: str) -> list[dict]:
    """The unit's explained events of `path`, from its journal in the container."""
    code = ("import json\nfrom tracer.sinks.journal import read_journal\n"
            "for e in read_journal('/var/lib/gputrace/journal').events:\n"
            "    print(json.dumps(e.to_json()))")
    out = systemd.sh(f"{REPO}/.venv/bin/python -c {shlex.quote(code)}", check=False).stdout
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [e for e in events if e.get("node", {}).get("path") == path and e.get("verdict")]


def test_the_unit_explains_device_cgroup_refusals(systemd: SystemdContainer,
                                                  installed: int) -> None:
    """Under the real systemd, with the unit's capabilities (no CAP_SYS_ADMIN): a v2
    device program's refusal is named by its program (read by the probe at the
    denial), and a unit's DevicePolicy=closed refusal is device_cgroup."""
    systemd.sh("systemctl start gputrace")
    wait_for(lambda: systemd.show("gputrace", "ActiveState")["ActiveState"] == "active",
             "gputrace.service to become active", timeout=240)
    wait_for(lambda: "daemon ready" in systemd.journal("gputrace").split("stopped:")[-1],
             "the daemon to be ready")
    shown = systemd.show("gputrace", "CapabilityBoundingSet")
    assert "cap_sys_admin" not in shown["CapabilityBoundingSet"] and \
        "cap_net_admin" not in shown["CapabilityBoundingSet"]
    v2_node = f"/dev/nvidia-gtv2-{unique()}"
    systemd.sh(f"mknod -m 0666 {v2_node} c 195 45")
    errnos = systemd.sh(f"{REPO}/.venv/bin/python -c {shlex.quote(V2_REFUSAL)} {v2_node}").stdout
    assert json.loads(errnos.strip().splitlines()[-1]) == [1]  # EPERM from the program
    wait_for(lambda: bool(journal_events(systemd, v2_node)), "the v2 refusal in the journal")
    verdict = journal_events(systemd, v2_node)[0]["verdict"]
    v2 = next(step for step in verdict["ladder"] if step["layer"] == "device_cgroup_v2")
    print("v2 program refusal under the unit:", verdict["reason"], verdict["confidence"],
          v2.get("program"), verdict["summary"])
    assert verdict["reason"] == "device_cgroup" and v2["refuses"] is True, verdict
    assert v2["program"]["id"] > 0
    unit_node = f"/dev/nvidia-gtunit-{unique()}"
    systemd.sh(f"mknod -m 0666 {unit_node} c 195 46")
    code = f"import os\ntry: os.open('{unit_node}', os.O_RDWR)\nexcept OSError as e: print(e)"
    systemd.sh("systemctl start dbus.socket dbus.service", check=False)  # systemd-run's bus
    systemd.sh(f"systemd-run --unit gttest-devpolicy-{unique()} -p DevicePolicy=closed "
               f"-p DeviceAllow='/dev/null rw' /usr/bin/python3 -c {shlex.quote(code)}")
    wait_for(lambda: bool(journal_events(systemd, unit_node)), "the unit's refusal in the journal")
    verdict = journal_events(systemd, unit_node)[0]["verdict"]
    print("DevicePolicy=closed under the unit:", verdict["reason"], verdict["confidence"],
          [s["layer"] for s in verdict["ladder"] if s["refuses"]], verdict["summary"])
    facts = journal_events(systemd, unit_node)[0].get("facts", {})
    assert verdict["reason"] == "device_cgroup", (verdict, {
        k: v for k, v in facts.items() if k.startswith(("device_cgroup", "cgroup", "process.live",
                                                          "sensor.", "systemd."))})
    systemd.sh("systemctl stop gputrace")


def test_the_audit_drop_in_merges_and_its_capabilities_suffice(systemd: SystemdContainer,
                                                               installed: int,
                                                               tmp_path) -> None:
    port = installed
    for command in readme_blocks()[1]:
        systemd.sh(command, check="restart" not in command)  # the restart fails here: see below
    shown = systemd.show("gputrace", "CapabilityBoundingSet", "ConditionResult", "DropInPaths")
    caps = set(shown["CapabilityBoundingSet"].split())
    assert caps == UNIT_CAPS | AUDIT_CAPS, shown
    assert "/etc/systemd/system/gputrace.service.d/audit.conf" in shown["DropInPaths"].split()
    unit = systemd.sh("systemctl cat gputrace").stdout
    assert "\nConditionPathExists=\n" in unit  # the BTF condition is dropped
    # Under a systemd that is PID 1 of a container, audit cannot answer: one line, no restart
    # loop hiding it.
    wait_for(lambda: "audit" in systemd.journal("gputrace").split("daemon ready: sensor bpf")[-1],
             "the audit sensor's answer", timeout=60)
    refusal = systemd.journal("gputrace").split("daemon ready: sensor bpf")[-1]
    print("audit under a containerised systemd:",
          [line for line in refusal.splitlines() if "error" in line][-1:])
    assert "initial" in refusal and "namespace" in refusal
    systemd.sh("systemctl stop gputrace")

    # The same merged capability set, on the host: the audit sensor runs with it.
    with open(AUDIT_LOCK) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state_before = audit_state()
        cfg = write_config(str(tmp_path), service_config(str(tmp_path), sensor={
            "kind": "audit", "watch_nodes": False}))
        spec = ",".join(["-all"] + ["+" + c.removeprefix("cap_") for c in sorted(caps)])
        daemon = DaemonProcess(cfg, prefix=["setpriv", f"--bounding-set={spec}",
                                            "--inh-caps=-all", "--"])
        node = f"/dev/nvidia-{unique()}"
        make_node(node, NodeSpec(major=195, minor=44, mode=0o600))
        try:
            daemon.start()
            assert "sensor audit" in daemon.stderr
            time.sleep(0.5)
            subprocess.run(["setpriv", f"--reuid={DENIED_UID}", f"--regid={DENIED_UID}",
                            "--clear-groups", "/usr/bin/python3", "-c",
                            f"try:\n open('{node}')\nexcept OSError:\n pass"], check=True)
            journal_dir = os.path.join(str(tmp_path), "state", "journal")
            wait_for(lambda: any(e.node.path == node.encode() and e.sensor == "audit"
                                 for e in read_journal(journal_dir).events),
                     lambda: "the audit denial in the journal: " + daemon.stderr + repr(
                         [(e.sensor, e.node.path) for e in read_journal(journal_dir).events]),
                     timeout=30)
            assert daemon.stop() == 0
        finally:
            daemon.kill()
            os.unlink(node)
        assert audit_state() == state_before
    assert port  # the container's daemon kept its own port; nothing on the host used it
