"""Container starts as the kernel reported them, kept so that a denial is tied to
its container even when the container was gone before its runtime state could
be read (or the runtime keeps its state where no one looked).

The BPF sensor hands each start signal over on its own thread, before any later
record (`StartBook.add`, a few dict operations); what the monitor's command line
adds (podman's conmon, a containerd shim: the container's id, name, engine) is
filled in by the container tracker's thread (`StartBook.describe`).  Bounded:
the oldest starts are forgotten first, counted.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Optional

from tracer.event import Process
from tracer.facts import INFERRED, KERNEL, LIVE, Facts
from tracer.sensors.container_starts import (ContainerStart, MonitorCommand, RuntimeCommand,
                                             runtime_command)

DEFAULT_CAPACITY = 2048  # ~1.5 KiB each; at 20 starts/s, 100 s of history
CREATED_SLACK_S = 0.05


@dataclass
class StartRecord:
    """One container start: the cgroup made for it (rootful runtimes) and the exec
    of its init (every runtime), joined by the cgroup id."""

    time: float
    cgroup_id: Optional[int] = None
    cgroup_path: Optional[str] = None
    init_pid: Optional[int] = None
    monitor_pid: Optional[int] = None          # the init's parent
    pidns: Optional[int] = None
    mntns: Optional[int] = None
    userns_level: Optional[int] = None
    runtime: Optional[RuntimeCommand] = None   # the maker of the cgroup's command line
    runtime_pid: Optional[int] = None
    monitor: Optional[MonitorCommand] = None   # the init's parent, read from /proc at its exec
    parent_argv: Optional[tuple[bytes, ...]] = None  # ...when that parent is no monitor
    facts: dict[str, tuple[object, str, str]] = field(default_factory=dict)  # name -> (value, source, origin)

    def put(self, name: str, value: object, source: str, origin: str) -> None:
        if value is not None and name not in self.facts:
            self.facts[name] = (value, source, origin)


class StartBook:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._records: OrderedDict[int, StartRecord] = OrderedDict()  # by a serial
        self._by_cgroup: dict[int, int] = {}
        self._by_pidns: dict[int, list[int]] = {}
        self._serial = 0
        self._lock = threading.Lock()
        self.counters: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._records)

    def add(self, start: ContainerStart) -> StartRecord:
        """File one signal; an exec joins the mkdir of its own cgroup."""
        with self._lock:
            self.counters[f"starts_{start.how}"] += 1
            serial = self._by_cgroup.get(start.cgroup_id) if start.cgroup_id > 1 else None
            record = self._records.get(serial) if serial is not None else None
            if record is None or serial is None:
                self._serial += 1
                serial = self._serial
                record = StartRecord(time=start.time)
                self._records[serial] = record
                if start.cgroup_id > 1:
                    self._by_cgroup[start.cgroup_id] = serial
                self._bound()
            if start.how == "mkdir":
                self._from_mkdir(record, start)
            else:
                self._from_exec(record, start)
                if start.pidns:
                    self._by_pidns.setdefault(start.pidns, []).append(serial)
            return record

    @staticmethod
    def _from_mkdir(record: StartRecord, start: ContainerStart) -> None:
        record.cgroup_id = start.cgroup_id
        record.cgroup_path = (start.path or b"").decode("utf-8", "replace") or None
        record.runtime = runtime_command(start.argv, start.argv_cut)
        record.runtime_pid = start.pid
        cmd = record.runtime
        if cmd is None:
            return
        words = " ".join(a.decode("utf-8", "replace") for a in start.argv)[:160]
        where = (f"the command line of {cmd.runtime} (pid {start.pid}) as it made the "
                 f"container's cgroup {record.cgroup_path}, read by the kernel: {words}")
        record.put("container.runtime", cmd.runtime, KERNEL, where)
        record.put("container.id", cmd.container_id, KERNEL, where)
        if cmd.bundle:
            record.put("container.bundle", cmd.bundle, KERNEL, where)

    @staticmethod
    def _from_exec(record: StartRecord, start: ContainerStart) -> None:
        record.init_pid = start.pid
        record.monitor_pid = start.ppid
        record.pidns, record.mntns = start.pidns, start.mntns
        record.userns_level = start.userns.level
        if record.cgroup_id is None and start.cgroup_id > 1:
            record.cgroup_id = start.cgroup_id

    def describe(self, record: StartRecord, monitor: Optional[MonitorCommand],
                 where: str) -> None:
        """What the init's monitor (or `runc run` itself) says, read from /proc while
        it lives."""
        with self._lock:
            record.monitor = monitor
            if monitor is None:
                return
            record.put("container.id", monitor.container_id, LIVE, where)
            record.put("container.engine", monitor.engine, LIVE, where)
            record.put("container.name", monitor.name, LIVE, where)
            record.put("container.runtime", monitor.runtime, LIVE, where)

    def _bound(self) -> None:
        while len(self._records) > self.capacity:
            serial, old = self._records.popitem(last=False)
            if old.cgroup_id is not None and self._by_cgroup.get(old.cgroup_id) == serial:
                del self._by_cgroup[old.cgroup_id]
            if old.pidns is not None:
                serials = self._by_pidns.get(old.pidns, [])
                if serial in serials:
                    serials.remove(serial)
                if not serials:
                    self._by_pidns.pop(old.pidns, None)
            self.counters["starts_forgotten"] += 1

    def find(self, proc: Process, when: float) -> Optional[tuple[StartRecord, str]]:
        """The start of the container the event's process ran in: by its v2 cgroup
        id (unique for the cgroup's life), else by its pid namespace (the latest
        start in it before the event; the init's pid namespace is the container's)."""
        cgroup_id = proc.cgroup_id or 0  # None: not captured (audit)
        with self._lock:
            if cgroup_id > 1:
                serial = self._by_cgroup.get(cgroup_id)
                record = self._records.get(serial) if serial is not None else None
                if record is not None and record.time - CREATED_SLACK_S <= when:
                    self.counters["start_hit_cgroup_id"] += 1
                    return record, f"cgroup id {proc.cgroup_id}"
            if proc.pidns:  # only non-initial pid namespaces are filed
                candidates = [self._records[s] for s in self._by_pidns.get(proc.pidns, [])
                              if s in self._records]
                before = [r for r in candidates if r.time - CREATED_SLACK_S <= when]
                record = max(before, key=lambda r: r.time) if before else None
                # a process in that pid namespace but another cgroup (a pod's container
                # sharing its sandbox's pid namespace) is not that container
                if record is not None and (record.cgroup_id is None or cgroup_id <= 1
                                           or record.cgroup_id == cgroup_id):
                    self.counters["start_hit_pidns"] += 1
                    return record, f"pid namespace {proc.pidns}"
            self.counters["start_miss"] += 1
            return None

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self.counters, "starts_held": len(self._records)}


def add_start_facts(book: StartBook, proc: Process, when: float, facts: Facts) -> None:
    """container.* from the kernel's start record where nothing better said them.
    A container started by `runc run` (or `crun run`: no engine runs containers so,
    they create and start them) has no name but the id its user gave it."""
    found = book.find(proc, when)
    if found is None:
        return
    record, key = found
    for name, (value, source, origin) in list(record.facts.items()):
        if name not in facts:
            facts.put(name, value, source, f"container start found by {key}: {origin}")
    cmd = record.runtime
    if cmd is not None and cmd.command == "run" and cmd.container_id is not None \
            and facts.get("container.id") == cmd.container_id \
            and "container.engine" not in facts and "container.name" not in facts:
        facts.put("container.name", cmd.container_id, INFERRED,
                  f"`{cmd.runtime} run` started it with no engine: its id is its name "
                  f"(container start found by {key})")
