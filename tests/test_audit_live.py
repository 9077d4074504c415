"""The audit sensor against the real kernel: rules, reading modes, real denials.

Every test holds an exclusive lock (audit state is global to the kernel) and
checks afterwards that the kernel's audit status (enabled, pid) and rule list
are exactly as before; it restores them when not, then fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Iterator

import pytest

from tracer.errors import EnvironmentProblem
from tracer.event import Event
from tracer.sensors.audit_marshal import AUDIT_STATUS_ENABLED, AUDIT_STATUS_PID, AuditSocket
from tracer.sensors.audit_pipeline import AuditConfig
from tracer.sensors.audit_rules import (AUDIT_FILTERKEY, AuditRule, current_arch, gputrace_rules,
                                        install_rules, rule_keys)
from tracer.sensors.audit_sensor import AuditSensor

pytestmark = pytest.mark.kernel

USER = "gtaudituser"
NODE_MODE = "/dev/gttest-audit-live0"     # 195:0 0660 root:root -> EACCES for USER
NODE_CGROUP = "/dev/gttest-audit-live1"   # 195:1 0666, denied by the device cgroup -> EPERM
CGROUP = "/sys/fs/cgroup/devices/gttest-audit-live"
OPENER = "import sys\ntry:\n    open(sys.argv[1])\nexcept OSError:\n    pass"


def audit_state() -> tuple[int, int, list[str]]:
    with AuditSocket() as sock:
        status = sock.get_status()
    rules = subprocess.run(["auditctl", "-l"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    return status["enabled"], status["pid"], rules


@pytest.fixture(autouse=True)
def audit_untouched() -> Iterator[None]:
    with open(__file__) as lock:  # a file every run of this checkout shares, left in place
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = audit_state()
        yield
        after = audit_state()
        if after != before:
            restore(before)
        assert after == before


def restore(state: tuple[int, int, list[str]]) -> None:
    enabled, _, rules = state
    with AuditSocket() as sock:
        for listed in sock.list_rules():
            keys = rule_keys(listed)
            if any(k.startswith((b"gputrace", b"gttest", b"gtforeign")) for k in keys):
                sock.delete_rule(listed)
        if sock.get_status()["pid"] == os.getpid():
            sock.set_status(AUDIT_STATUS_PID, pid=0)
        sock.set_status(AUDIT_STATUS_ENABLED, enabled=enabled)


@pytest.fixture(scope="module")
def user() -> Iterator[tuple[int, int]]:
    subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", USER], check=True)
    try:
        uid = int(subprocess.check_output(["id", "-u", USER]))
        gid = int(subprocess.check_output(["id", "-g", USER]))
        yield uid, gid
    finally:
        subprocess.run(["userdel", USER], check=True)


@pytest.fixture(scope="module")
def nodes() -> Iterator[None]:
    subprocess.run(["mknod", "-m", "0660", NODE_MODE, "c", "195", "0"], check=True)
    subprocess.run(["mknod", "-m", "0666", NODE_CGROUP, "c", "195", "1"], check=True)
    os.chmod(NODE_CGROUP, 0o666)  # mknod -m is filtered by nothing, umask aside
    try:
        yield
    finally:
        os.unlink(NODE_MODE)
        os.unlink(NODE_CGROUP)


@pytest.fixture
def device_cgroup() -> Iterator[str]:
    os.mkdir(CGROUP)
    try:
        with open(os.path.join(CGROUP, "devices.deny"), "w") as fh:
            fh.write("c 195:* rwm")
        yield CGROUP
    finally:
        os.rmdir(CGROUP)


def open_as(uid: int, gid: int, path: str, cgroup: str = "") -> int:
    """Open `path` as uid:gid with no supplementary groups; returns the pid."""

    def enter_cgroup() -> None:
        if cgroup:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as fh:
                fh.write(str(os.getpid()))

    child = subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                              sys.executable, "-c", OPENER, path], preexec_fn=enter_cgroup)
    assert child.wait() == 0
    return child.pid


@contextlib.contextmanager
def running(sensor: AuditSensor) -> Iterator[list[Event]]:
    sensor.start()
    stop = threading.Event()
    seen: list[Event] = []
    failures: list[BaseException] = []

    def read() -> None:
        try:
            seen.extend(sensor.events(stop))
        except BaseException as exc:  # handed to the test thread below
            failures.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        time.sleep(0.5)  # let the reader register before the first denial
        yield seen
    finally:
        stop.set()
        reader.join(timeout=10)
        sensor.close()
    if failures:
        raise failures[0]


def wait_for(seen: list[Event], match: Callable[[Event], bool], timeout: float = 5.0) -> Event:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in list(seen):
            if match(event):
                return event
        time.sleep(0.05)
    raise AssertionError(f"no matching event in {[e.to_json() for e in seen]}")


def fast_config(**kw: object) -> AuditConfig:
    return AuditConfig(poll_interval_s=0.1, **kw)  # type: ignore[arg-type]


def test_denied_open_by_mode_is_seen(user: tuple[int, int], nodes: None) -> None:
    uid, gid = user
    daemon_before = audit_state()[1]
    sensor = AuditSensor(fast_config())
    with running(sensor) as seen:
        assert audit_state()[0] == 1
        pid = open_as(uid, gid, NODE_MODE)
        event = wait_for(seen, lambda e: e.process.pid == pid)
        assert sensor.read_mode == ("multicast" if daemon_before else "consumer")
        if not daemon_before:
            assert audit_state()[1] == os.getpid()
    assert (event.sensor, event.syscall, event.errno_name) == ("audit", "openat", "EACCES")
    assert (event.process.uid, event.process.euid, event.process.fsuid) == (uid, uid, uid)
    assert (event.process.gid, event.process.ppid) == (gid, os.getpid())
    assert (event.node.path, event.node.major, event.node.minor) == (NODE_MODE.encode(), 195, 0)
    assert event.facts.get("audit.mode") == 0o20660 and event.facts.get("audit.ogid") == 0
    stats = sensor.stats()
    assert stats["events_emitted"] >= 1 and stats["rules_installed"] == 4
    assert stats["lost_by_kernel"] == 0 and stats["parse_errors"] == 0


def test_device_cgroup_eperm_is_seen(user: tuple[int, int], nodes: None,
                                     device_cgroup: str) -> None:
    uid, gid = user
    with running(AuditSensor(fast_config())) as seen:
        pid = open_as(uid, gid, NODE_CGROUP, cgroup=device_cgroup)
        event = wait_for(seen, lambda e: e.process.pid == pid)
    assert (event.errno_name, event.node.path, event.node.minor) == \
        ("EPERM", NODE_CGROUP.encode(), 1)
    assert event.facts.get("audit.mode") == 0o20666


IOCTL_HOLDER = ("import fcntl, struct, sys, time\n"
                "fd = open(sys.argv[1], 'rb')\n"
                "try:\n    fcntl.ioctl(fd, 0x40086602, struct.pack('i', 0x10))\n"  # +i: EPERM
                "except OSError:\n    pass\n"
                "time.sleep(3)\n")


def test_denied_ioctl_is_resolved_through_the_open_fd(user: tuple[int, int]) -> None:
    """No GPU driver here, so a configured prefix stands in for a GPU node path."""
    uid, gid = user
    target = tempfile.NamedTemporaryFile(prefix="gttest-audit-ioctl-", dir="/tmp")
    os.chmod(target.name, 0o644)
    with target, running(AuditSensor(fast_config(extra_prefixes=("/tmp/gttest-audit-ioctl-",)))) \
            as seen:
        holder = subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={gid}",
                                   "--clear-groups", sys.executable, "-c", IOCTL_HOLDER,
                                   target.name])
        try:
            event = wait_for(seen, lambda e: e.process.pid == holder.pid)
        finally:
            holder.wait()
    assert (event.syscall, event.errno_name, event.ioctl_cmd) == ("ioctl", "EPERM", 0x40086602)
    assert event.node.path == target.name.encode() and event.node.major is None
    assert event.facts.get("audit.path_from") == "proc_fd"


def test_foreign_rules_survive_a_start_stop_cycle() -> None:
    foreign = [["-a", "exit,always", "-F", "arch=b64", "-S", "openat", "-F", "exit=-EACCES",
                "-k", "gtforeign"],
               ["-a", "exit,always", "-F", "arch=b64", "-S", "ioctl", "-F", "exit=-EPERM",
                "-k", "gtforeign", "-k", "gputrace"],
               ["-w", "/etc/gttest-audit-watch", "-p", "wa", "-k", "gtforeign"]]
    for rule in foreign:
        subprocess.run(["auditctl", *rule], check=True, capture_output=True)
    try:
        before = audit_state()[2]
        assert len(before) == 3
        with running(AuditSensor(fast_config())):
            during = audit_state()[2]
            ours = [r for r in during if r not in before]
            assert len(ours) == 4 and all(r.endswith("-F key=gputrace") for r in ours)
        assert audit_state()[2] == before
    finally:
        for rule in foreign:
            subprocess.run(["auditctl", "-d" if rule[0] == "-a" else "-W", *rule[1:]],
                           check=True, capture_output=True)


def test_stale_rules_of_a_crashed_run_are_replaced() -> None:
    with AuditSocket() as sock:
        install_rules(sock, gputrace_rules(current_arch()))
    sensor = AuditSensor(fast_config())
    with running(sensor):
        assert sensor.stats()["stale_rules_removed"] == 4
        assert len(audit_state()[2]) == 4


def test_failed_install_removes_the_rules_it_added() -> None:
    bad_field = 9999  # unknown to the kernel: EINVAL
    rules = gputrace_rules(current_arch(), key="gttest-rollback")[:2] + \
        [AuditRule((2,), ((bad_field, 0x40000000, 1), (AUDIT_FILTERKEY, 0x40000000,
                                                        b"gttest-rollback")))]
    with AuditSocket() as sock:
        with pytest.raises(EnvironmentProblem, match="EINVAL"):
            install_rules(sock, rules)
        assert not [r for r in sock.list_rules() if rule_keys(r) == [b"gttest-rollback"]]


@contextlib.contextmanager
def auditd_running() -> Iterator[str]:
    """Our own auditd (private config and log) unless one is registered already."""
    if audit_state()[1]:
        yield ""
        return
    enabled_before = audit_state()[0]
    workdir = tempfile.mkdtemp(prefix="gttest-auditd-")
    log = os.path.join(workdir, "audit.log")
    os.mkdir(os.path.join(workdir, "plugins.d"))
    with open(os.path.join(workdir, "auditd.conf"), "w") as fh:
        fh.write(f"log_file = {log}\nlog_format = RAW\nwrite_logs = yes\nflush = SYNC\n"
                 f"num_logs = 1\nmax_log_file_action = IGNORE\nspace_left = 2\n"
                 f"admin_space_left = 1\ndisk_full_action = IGNORE\n"
                 f"plugin_dir = {workdir}/plugins.d\n")
    os.chmod(os.path.join(workdir, "auditd.conf"), 0o600)
    daemon = subprocess.Popen(["auditd", "-n", "-s", "enable", "-c", workdir],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while audit_state()[1] != daemon.pid:
            assert daemon.poll() is None and time.monotonic() < deadline, "auditd did not start"
            time.sleep(0.1)
        yield log
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
        shutil.rmtree(workdir)
        with AuditSocket() as sock:  # auditd 3.0 leaves `enabled` as it set it
            sock.set_status(AUDIT_STATUS_ENABLED, enabled=enabled_before)


def test_coexists_with_a_running_auditd(user: tuple[int, int], nodes: None) -> None:
    uid, gid = user
    with auditd_running() as log:
        daemon = audit_state()[1]
        sensor = AuditSensor(fast_config())
        with running(sensor) as seen:
            pid = open_as(uid, gid, NODE_MODE)
            event = wait_for(seen, lambda e: e.process.pid == pid)
            assert sensor.read_mode == "multicast"
        assert audit_state()[1] == daemon  # auditd is still the consumer
        if log:
            with open(log) as fh:
                logged = fh.read()
            assert f"msg=audit({event.time:.3f}:{event.facts.get('audit.serial')})" in logged


def test_non_root_gets_a_privilege_error(user: tuple[int, int]) -> None:
    uid, gid = user
    code = ("from tracer.errors import GputraceError\n"
            "from tracer.sensors.audit_sensor import AuditSensor\n"
            "try:\n    AuditSensor().start()\n"
            "except GputraceError as e:\n    print(type(e).__name__, e)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                          sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         check=True)
    assert out.stdout.startswith("NoPrivilege cannot set up audit: the audit sensor needs root")
