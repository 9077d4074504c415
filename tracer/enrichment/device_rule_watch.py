"""Follow each running container's device rules after it started.

cgroup v1: inotify on the container's `devices` cgroup directory.  A write to
`devices.allow` or `devices.deny` (a hook granting a GPU, systemd resetting
the scope on `daemon-reload`, a runtime re-applying its rules) raises
IN_MODIFY; once the writes have settled (a reset is a burst: deny all, then
each allow), `devices.list` is read again and the difference kept.  The kernel
does not say who wrote.

cgroup v2: the container's own cgroup is followed in the history; the
access-change probe reports each program attached or detached, with its caller.
"""

from __future__ import annotations

import os
import select
import threading
import time
from typing import Optional

from tracer.enrichment import procfs
from tracer.enrichment.access_history import (V1, V2, AccessHistory, RuleState, v1_key,
                                              v2_key)
from tracer.enrichment.container_store import ContainerSnapshot
from tracer.enrichment.device_rules import devices_list_texts
from tracer.enrichment.host_facts import v1_devices_dir
from tracer.facts import Facts
from tracer.host import HostPaths
from tracer.inotify import IN_CLOSE_WRITE, IN_IGNORED, IN_MODIFY, IN_Q_OVERFLOW, Inotify

SETTLE_S = 0.05          # a burst of writes is one change once quiet this long
MAX_WATCHES = 4096
RULE_FILES = (b"devices.allow", b"devices.deny")
V1_HOW = "devices.allow/devices.deny written"


class DeviceRuleWatch:
    """A thread; `track(snapshot)` for each container the tracker learns."""

    def __init__(self, host: HostPaths, history: AccessHistory) -> None:
        self.host = host
        self.history = history
        self._inotify: Optional[Inotify] = None
        self._dirs: dict[int, tuple[str, str]] = {}   # wd -> (cgroup path, host dir)
        self._dirty: dict[int, float] = {}            # wd -> last write seen (monotonic)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "DeviceRuleWatch":
        self._inotify = Inotify()
        self._thread = threading.Thread(target=self._run, name="device-rule-watch", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._inotify is not None:
            self._inotify.close()

    def track(self, snap: ContainerSnapshot) -> None:
        """Keep the rules the container started with, then follow them."""
        paths = snap.facts.get("cgroup.paths")
        cgroups = paths.value if paths is not None and isinstance(paths.value, dict) else {}
        v1_path = next((str(p) for c, p in cgroups.items() if "devices" in str(c).split(",")), None)
        rules = snap.facts.get("device_cgroup.v1_rules")
        if v1_path is not None and v1_path != "/" and rules is not None \
                and isinstance(rules.value, list):
            key = v1_key(v1_path)
            self.history.start_state(key, RuleState(snap.created, V1, v1_path,
                                                    tuple(str(r) for r in rules.value)))
            self._watch_v1(v1_path)
        if snap.cgroup_id:
            where = snap.facts.get("device_cgroup.v2_cgroup")
            path = str(cgroups.get("unified") or (where.value if where else ""))
            self.history.follow_v2(snap.cgroup_id, path)
            programs = snap.facts.get("device_cgroup.v2_programs")
            unreadable = snap.facts.get("device_cgroup.v2_unreadable")
            self.history.start_state(v2_key(snap.cgroup_id), RuleState(
                snap.created, V2, path or f"cgroup id {snap.cgroup_id}",
                tuple(programs.value) if programs is not None and isinstance(programs.value, list)
                else None, "" if programs is not None else
                str(unreadable.value if unreadable else "not read at start")))

    def _watch_v1(self, cgroup_path: str) -> None:
        directory = v1_devices_dir(self.host, cgroup_path, Facts())
        if directory is None or self._inotify is None:
            return
        with self._lock:
            if len(self._dirs) >= MAX_WATCHES:
                self.history.counters["rule_watch_limit"] += 1
                return
            wd = self._inotify.add_watch(os.fsencode(directory), IN_MODIFY | IN_CLOSE_WRITE)
            if wd < 0:
                self.history.counters["rule_watch_failed"] += 1
                return
            self._dirs[wd] = (cgroup_path, directory)
        self._settle(wd, cgroup_path, directory)  # a change between snapshot and watch

    def _run(self) -> None:
        assert self._inotify is not None
        poller = select.poll()
        poller.register(self._inotify.fd, select.POLLIN)
        while not self._stop.is_set():
            with self._lock:
                waiting = bool(self._dirty)
            if poller.poll(int(SETTLE_S * 1000) if waiting else 200):
                try:
                    events = self._inotify.events()
                except OSError:
                    break
                now = time.monotonic()
                for wd, mask, name in events:
                    self._event(wd, mask, name, now)
            self._flush(time.monotonic())

    def _event(self, wd: int, mask: int, name: bytes, now: float) -> None:
        with self._lock:
            if mask & IN_Q_OVERFLOW:  # writes may be missed: read every cgroup again
                self.history.counters["rule_watch_overflow"] += 1
                self._dirty.update({w: now for w in self._dirs})
            elif mask & IN_IGNORED:   # the cgroup is gone
                self._dirs.pop(wd, None)
                self._dirty.pop(wd, None)
            elif name in RULE_FILES and wd in self._dirs:
                self._dirty[wd] = now

    def _flush(self, now: float) -> None:
        with self._lock:
            ready = [wd for wd, seen in self._dirty.items() if now - seen >= SETTLE_S]
            found = [(wd, *self._dirs[wd]) for wd in ready if wd in self._dirs]
            for wd in ready:
                self._dirty.pop(wd, None)
        for wd, cgroup_path, directory in found:
            self._settle(wd, cgroup_path, directory)

    def _settle(self, wd: int, cgroup_path: str, directory: str) -> None:
        text = procfs.read_text(os.path.join(directory, "devices.list"))
        if text is None:
            return  # removed meanwhile
        rules = devices_list_texts(text, Facts().skips)
        self.history.observe(v1_key(cgroup_path), RuleState(time.time(), V1, cgroup_path, rules),
                             V1_HOW)
