"""GPU node lifecycle: nodes appearing, disappearing, changing mode or owner.

Two sources, both event-driven: the kernel's uevents (a driver adding or
removing a device; pyroute2's uevent socket) and inotify on the directories
that hold GPU nodes (a node file created, deleted or re-permissioned by udev,
a runtime hook or an administrator).  "The node was created after the
container started" (CAUSES.md #8) becomes a line on the timeline.
"""

from __future__ import annotations

import os
import select
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from tracer.event import Event, Node, Process
from tracer.facts import SENSOR, Facts, lossy_text
from tracer.host import HostPaths
from tracer.inotify import (IN_ATTRIB, IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVED_FROM,
                            IN_MOVED_TO, IN_Q_OVERFLOW, Inotify)
from tracer.sensors import gpu_nodes

_WATCH_MASK = IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
WATCHED_SUBDIRS = ("", "dri", "nvidia-caps", "nvgpu", "char")


@dataclass
class NodeState:
    mode: int
    uid: int
    gid: int
    rdev: int
    acl: Optional[bytes] = None
    label: Optional[bytes] = None


@dataclass(frozen=True)
class NodeRecord:
    state: NodeState
    seen_at: float   # epoch seconds when the watcher read this state
    overflows: int   # inotify overflows counted by then


class NodeHistory:
    """The last state the watcher read of each GPU node, kept after the node is
    removed (bounded, oldest forgotten first): the mode and owner of a node that
    was removed after a refusal.  One per host /dev tree per process (`node_history`),
    so enrichment finds it without plumbing; empty when no watcher runs."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self.overflows = 0
        self.watchers = 0  # running watchers; none: nothing vouches for any record
        self._last: "OrderedDict[bytes, NodeRecord]" = OrderedDict()
        self._lock = threading.Lock()

    def record(self, path: bytes, state: NodeState) -> None:
        with self._lock:
            old = self._last.get(path)
            if old is not None and old.state == state:
                return  # a repeated IN_ATTRIB: the state read earlier still holds
            self._last[path] = NodeRecord(state, time.time(), self.overflows)
            self._last.move_to_end(path)
            while len(self._last) > self.max_entries:
                self._last.popitem(last=False)

    def attach(self) -> None:
        with self._lock:
            self.watchers += 1

    def detach(self) -> None:
        """A stopped watcher no longer sees changes: its readings go stale at once."""
        with self._lock:
            self.watchers = max(0, self.watchers - 1)
            if not self.watchers:
                self._last.clear()

    def overflowed(self) -> None:
        with self._lock:
            self.overflows += 1

    def held_at(self, path: bytes, when: float) -> Optional[NodeRecord]:
        """The state `path` had at `when`, if the watcher can vouch for it: read before
        `when`, with no change read since and no inotify overflow since (a change
        made before `when` but read after it rejects the record)."""
        with self._lock:
            found = self._last.get(path) if self.watchers else None
            if found is None or found.seen_at > when or found.overflows != self.overflows:
                return None
            return found


_HISTORIES: dict[str, NodeHistory] = {}
_HISTORIES_LOCK = threading.Lock()


def node_history(dev: str) -> NodeHistory:
    with _HISTORIES_LOCK:
        return _HISTORIES.setdefault(os.path.normpath(dev), NodeHistory())


def _xattr(path: bytes, name: str) -> Optional[bytes]:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def node_event(action: str, path: bytes, state: Optional[NodeState], source: str,
               major: Optional[int] = None, minor: Optional[int] = None) -> Event:
    """`path` is the node's name as the kernel spelled it: bytes, never decoded here
    (a name need not be UTF-8; Event.to_json keeps it losslessly)."""
    facts = Facts()
    facts.put("node.change", action, SENSOR, source)
    if state is not None:
        origin = lossy_text(path)
        major, minor = os.major(state.rdev), os.minor(state.rdev)
        facts.put("node.mode", f"{stat.S_IMODE(state.mode):04o}", SENSOR, origin)
        facts.put("node.uid", state.uid, SENSOR, origin)
        facts.put("node.gid", state.gid, SENSOR, origin)
    return Event(time=time.time(), sensor=source, syscall="", errno=0, kind="node", count=0,
                 process=Process(pid=0, tid=0), node=Node(path=path, major=major,
                                                           minor=minor), facts=facts)


class _Inotify(Inotify):
    """The shared inotify reader, remembering which directory each watch is."""

    def __init__(self) -> None:
        super().__init__()
        self.dirs: dict[int, bytes] = {}

    def watch(self, directory: bytes) -> bool:
        wd = self.add_watch(directory, _WATCH_MASK)
        if wd < 0:
            return False
        self.dirs[wd] = directory
        return True

    def read(self) -> Iterator[tuple[bytes, int, bytes]]:
        """(directory, mask, name) for every pending event."""
        for wd, mask, name in self.events():
            yield self.dirs.get(wd, b""), mask, name


@dataclass
class NodeWatcher:
    """Yields kind="node" Events; `known` is bounded (oldest forgotten first)."""

    host: HostPaths = field(default_factory=HostPaths)
    extra_prefixes: tuple[str, ...] = ()
    extra_majors: tuple[int, ...] = ()
    max_known: int = 4096
    use_uevents: bool = True

    def __post_init__(self) -> None:
        self.nodes = gpu_nodes.discover(self.host.proc, self.host.dev, self.extra_prefixes,
                                        tuple((m, None) for m in self.extra_majors))
        self.known: "OrderedDict[bytes, NodeState]" = OrderedDict()  # by path bytes
        self.counters = {"node_events": 0, "inotify_overflow": 0, "uevents": 0}
        self._inotify: Optional[_Inotify] = None
        self._uevents: Any = None  # pyroute2 UeventSocket once started
        self._prefixes = tuple(os.fsencode(p) for p in self.nodes.prefixes)
        self.history = node_history(self.host.dev)

    def start(self) -> None:
        self._inotify = _Inotify()
        self.history.attach()
        dirs = {os.path.dirname(os.fsencode(p).rstrip(b"/") + b"/x") for p in self.nodes.prefixes}
        dev = os.fsencode(self.host.dev)
        dirs |= {os.path.join(dev, os.fsencode(d)) if d else dev for d in WATCHED_SUBDIRS}
        for directory in sorted(dirs):
            if os.path.isdir(directory):
                self._inotify.watch(directory)
                for name in os.listdir(directory):
                    self._remember(os.path.join(directory, name))
        if self.use_uevents:
            from pyroute2 import UeventSocket

            self._uevents = UeventSocket()
            self._uevents.bind()

    def _matches(self, path: bytes) -> bool:
        return any(path.startswith(p) for p in self._prefixes)

    def _state(self, path: bytes) -> Optional[NodeState]:
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISCHR(st.st_mode):
            return None
        return NodeState(st.st_mode, st.st_uid, st.st_gid, st.st_rdev,
                         _xattr(path, "system.posix_acl_access"), _xattr(path, "security.selinux"))

    def _remember(self, path: bytes) -> Optional[NodeState]:
        state = self._state(path) if self._matches(path) else None
        if state is not None:
            self.history.record(path, state)
            self.known[path] = state
            self.known.move_to_end(path)
            while len(self.known) > self.max_known:
                self.known.popitem(last=False)
        return state

    def _from_inotify(self) -> list[Event]:
        out = []
        assert self._inotify is not None
        for directory, mask, name in self._inotify.read():
            if mask & IN_Q_OVERFLOW:
                self.counters["inotify_overflow"] += 1
                self.history.overflowed()
                continue
            path = os.path.join(directory, name)
            if not name or not self._matches(path):
                continue
            before = self.known.get(path)
            if mask & (IN_DELETE | IN_MOVED_FROM):
                if self.known.pop(path, None) is not None or before is None:
                    out.append(node_event("removed", path, before, "inotify"))
                continue
            after = self._remember(path)
            if after is None:
                if mask & (IN_CREATE | IN_MOVED_TO):  # gone again before we looked
                    out.append(node_event("created", path, None, "inotify"))
                continue
            if mask & (IN_CREATE | IN_MOVED_TO) or before is None:
                out.append(node_event("created", path, after, "inotify"))
            elif after.rdev != before.rdev:
                out.append(node_event("device_changed", path, after, "inotify"))
            elif stat.S_IMODE(after.mode) != stat.S_IMODE(before.mode):
                out.append(node_event("mode_changed", path, after, "inotify"))
            elif (after.uid, after.gid) != (before.uid, before.gid):
                out.append(node_event("owner_changed", path, after, "inotify"))
            elif after.acl != before.acl:
                out.append(node_event("acl_changed", path, after, "inotify"))
            elif after.label != before.label:
                out.append(node_event("label_changed", path, after, "inotify"))
            # else: a change already reported (IN_ATTRIB events arrive after the fact)
        return out

    def _from_uevents(self) -> list[Event]:
        out = []
        for msg in self._uevents.get():
            self.counters["uevents"] += 1
            try:
                major, minor = int(msg.get("MAJOR")), int(msg.get("MINOR"))
            except (TypeError, ValueError):
                continue
            if major not in self.nodes.majors and \
                    gpu_nodes.mkdev(major, minor) not in self.nodes.exact:
                continue
            path = os.path.join(b"/dev", os.fsencode(msg.get("DEVNAME") or "?"))
            action = {"add": "device_added", "remove": "device_removed"}.get(
                msg.get("ACTION"), f"device_{msg.get('ACTION')}")
            out.append(node_event(action, path, None, "uevent", major, minor))
        return out

    def poll(self, timeout_s: float) -> list[Event]:
        assert self._inotify is not None, "start() first"
        sources = [self._inotify.fd] + ([self._uevents] if self._uevents is not None else [])
        try:
            ready, _, _ = select.select(sources, [], [], timeout_s)
        except InterruptedError:
            return []
        out: list[Event] = []
        if self._inotify.fd in ready:
            out += self._from_inotify()
        if self._uevents is not None and self._uevents in ready:
            out += self._from_uevents()
        self.counters["node_events"] += len(out)
        return out

    def events(self, stop: threading.Event) -> Iterator[Event]:
        while not stop.is_set():
            yield from self.poll(0.2)

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
            self.history.detach()
        if self._uevents is not None:
            self._uevents.close()
            self._uevents = None
