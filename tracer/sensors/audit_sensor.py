"""The audit sensor: denials from the Linux audit subsystem over NETLINK_AUDIT.

For hosts where BPF cannot run.  `start()` installs gputrace's own rules (key
"gputrace", see audit_rules for what they can and cannot narrow) and turns
auditing on if it was off; `events()` reads records and yields the same
`Event`s as the BPF sensor with `sensor="audit"`; `close()` removes exactly the
rules with our key and gives back whatever it changed (enabled flag, consumer).

Two ways to read, chosen from AUDIT_GET at start:

* an audit daemon is registered (auditd, `status.pid != 0`): join the
  read-log multicast group (needs CAP_AUDIT_READ) beside it;
* none is: become the consumer (AUDIT_SET pid), so records neither pile up in
  the kernel's hold queue nor spill into the kernel log.  If the process dies,
  the kernel drops the registration on its next failed send.

Event fields audit cannot provide, listed in every event's `missing`:
process.tid (audit reports the thread-group id only), process.groups and
ngroups, cap_effective, the user namespace (inum, level, owner), mnt/pid/cgroup
namespaces, cgroup_id and ns_pid; open_flags for openat2 (a pointer).  Audit
ids are initial-namespace ids.  Also: processes forked before auditing was
first enabled since boot carry no audit context and are never reported.

An event is kept whatever rule key the kernel tagged it with (a foreign rule
added earlier wins the tag), when its syscall is watched, its errno is EACCES
or EPERM and its node is a GPU node (audit_events.GpuNodeFilter).  ioctl nodes
come from /proc/PID/fd/FD while the process still holds the fd.  `stats()`
counts records read and ignored, parse errors and drops by bounded reason,
records the kernel lost since start (AUDIT_GET `lost`: backlog limit exceeded,
rate limit, out of memory; kernel-wide, re-read every `lost_refresh_s` and at
close; a reset or wrap of the counter is a restart, not a negative loss), ENOBUFS
on our socket (`socket_overflows`), events emitted.  tracer.discards names which
of these are losses.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections import Counter
from typing import Callable, Iterator, Optional

from pyroute2.netlink.exceptions import NetlinkError

from tracer.counts import KernelCounter
from tracer.errors import EnvironmentProblem, NoPrivilege
from tracer.event import Event
from tracer.host import LIVE, HostPaths
from tracer.sensors.audit_marshal import AUDIT_STATUS_ENABLED, AUDIT_STATUS_PID, AuditSocket
from tracer.sensors.audit_pipeline import AuditConfig, AuditPipeline
from tracer.sensors.audit_rules import (current_arch, gputrace_rules, install_rules,
                                        remove_rules_with_key)

AUDIT_LOCKED = 2  # `enabled=2`: rules and settings immutable until reboot


# Inode numbers the kernel gives its initial namespaces (PROC_*_INIT_INO in proc_ns.h).
INITIAL_NAMESPACES = {"pid": 0xEFFFFFFC, "user": 0xEFFFFFFD}


def foreign_namespaces(proc: str = "/proc") -> list[str]:
    """Which of our PID and user namespaces are not the kernel's initial ones."""
    out = []
    for name, inum in INITIAL_NAMESPACES.items():
        try:
            link = os.readlink(os.path.join(proc, "self/ns", name))
        except OSError:
            continue
        if link != f"{name}:[{inum}]":
            out.append(name)
    return out


def netlink_failure(exc: Exception, doing: str) -> Exception:
    code = getattr(exc, "code", None) or getattr(exc, "errno", None) or 0
    if code in (errno.EPERM, errno.ECONNREFUSED):
        foreign = foreign_namespaces()
        if foreign or code == errno.ECONNREFUSED:
            return EnvironmentProblem(
                f"cannot {doing}: Linux audit answers only processes in the initial network, "
                f"PID and user namespaces (this one runs in its own "
                f"{' and '.join(foreign) or 'network'} namespace; in a container, share the "
                "host's)")
        return NoPrivilege(f"cannot {doing}: the audit sensor needs root "
                           "(CAP_AUDIT_CONTROL and CAP_AUDIT_READ)")
    return EnvironmentProblem(f"cannot {doing}: {errno.errorcode.get(code, str(exc))}")


class AuditSensor:
    def __init__(self, config: Optional[AuditConfig] = None, host: HostPaths = LIVE,
                 raw_tap: Optional[Callable[[bytes], None]] = None) -> None:
        """`raw_tap` receives every datagram as read (to record fixtures)."""
        self.config = config or AuditConfig()
        self.host = host
        self.pipeline = AuditPipeline(self.config, host)
        self.raw_tap = raw_tap
        self.counts: Counter[str] = Counter()
        self.read_mode = ""
        self._initial: dict[str, int] = {}
        self._lost: Optional[KernelCounter] = None
        self._overflows = 0
        self._enabled_changed = False
        self._is_consumer = False
        self._started = False
        self._release_lock = threading.Lock()

    def start(self) -> None:
        try:
            with AuditSocket() as control:
                self._initial = control.get_status()
                if self._initial["enabled"] == AUDIT_LOCKED:
                    raise EnvironmentProblem("audit configuration is locked (enabled=2) "
                                             "until reboot; gputrace cannot add its rules")
                self._lost = KernelCounter(self._initial["lost"])
                self.read_mode = self._choose_mode(self._initial["pid"])
                self._started = True
                self.counts["stale_rules_removed"] = remove_rules_with_key(control, self.config.key)
                if not self._initial["enabled"]:
                    control.set_status(AUDIT_STATUS_ENABLED, enabled=1)
                    self._enabled_changed = True
                self.counts["rules_installed"] = install_rules(
                    control, gputrace_rules(current_arch(), self.config.key))
        except (NetlinkError, OSError) as exc:
            self.close()
            raise netlink_failure(exc, "set up audit") from None
        except Exception:
            self.close()
            raise

    def _choose_mode(self, daemon_pid: int) -> str:
        if self.config.read_mode != "auto":
            return self.config.read_mode
        return "multicast" if daemon_pid else "consumer"

    def events(self, stop: threading.Event) -> Iterator[Event]:
        """Yield events until `stop` is set; the socket lives in the calling thread."""
        if not self._started:
            raise EnvironmentProblem("audit sensor used before start()")
        reader = self._open_reader()
        overflows_before = 0  # counted by readers replaced after an overflow
        try:
            refreshed = time.monotonic()
            while not stop.is_set():
                try:
                    received = reader.receive(self.config.poll_interval_s)
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    # pyroute2 keeps the error and raises it on every later call:
                    # count it, then carry on with a fresh socket
                    overflows_before += max(reader.marshal.overflows, 1)
                    self._close_quietly(reader)
                    reader = self._open_reader()
                    continue
                for msg in received:
                    yield from self.pipeline.feed(msg, time.monotonic())
                yield from self.pipeline.expire(time.monotonic())
                self._overflows = overflows_before + reader.marshal.overflows
                if time.monotonic() - refreshed > self.config.lost_refresh_s:
                    self._read_lost(reader)
                    refreshed = time.monotonic()
            yield from self.pipeline.drain()
        except (NetlinkError, OSError) as exc:
            raise netlink_failure(exc, "read audit records") from None
        finally:
            self._overflows = overflows_before + reader.marshal.overflows
            self._release_consumer()
            self._close_quietly(reader)

    def _open_reader(self) -> AuditSocket:
        reader = AuditSocket(self.config.rcvbuf_bytes)
        reader.marshal.raw_tap = self.raw_tap
        try:
            self._attach(reader)
        except BaseException:
            self._close_quietly(reader)
            raise
        return reader

    @staticmethod
    def _close_quietly(reader: AuditSocket) -> None:
        try:
            reader.close()
        except OSError:
            pass  # the error pyroute2 kept (ENOBUFS) surfaces again on close

    def _attach(self, reader: AuditSocket) -> None:
        if self.read_mode == "consumer":
            try:
                reader.set_status(AUDIT_STATUS_PID, pid=os.getpid())
                self._is_consumer = True
                return
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
                self.read_mode = "multicast"  # a daemon registered since start()
        reader.join_readlog()

    def _read_lost(self, control: AuditSocket) -> None:
        if self._lost is not None:
            self._lost.read(control.get_status()["lost"])

    def stats(self) -> dict[str, int]:
        out = self.pipeline.stats()
        out.update({"rules_installed": self.counts["rules_installed"],
                    "stale_rules_removed": self.counts["stale_rules_removed"],
                    "lost_by_kernel": self._lost.total if self._lost is not None else 0,
                    "socket_overflows": self._overflows})
        return out

    def _release_consumer(self) -> None:
        with self._release_lock:
            if not self._is_consumer:
                return
            self._is_consumer = False
            with AuditSocket() as control:
                if control.get_status()["pid"] == os.getpid():
                    control.set_status(AUDIT_STATUS_PID, pid=0)

    def close(self) -> None:
        """Remove our rules, give back the consumer slot and the enabled flag."""
        if not self._started:
            return
        self._started = False
        try:
            with AuditSocket() as control:
                remove_rules_with_key(control, self.config.key)
                self._read_lost(control)
            self._release_consumer()
            if self._enabled_changed:
                with AuditSocket() as control:
                    control.set_status(AUDIT_STATUS_ENABLED, enabled=self._initial["enabled"])
                self._enabled_changed = False
        except (NetlinkError, OSError) as exc:
            raise netlink_failure(exc, "remove gputrace's audit rules") from None
