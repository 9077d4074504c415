"""Learn containers when they start: inotify on the OCI runtimes' state
directories, a snapshot (container_snapshot.py) the moment runc/crun writes a
container's state.

runc writes <root>/<id>/state.json (by rename) and crun <root>/<id>/status when
the container is created, while its init process already sits in the new
namespaces and cgroup; a container living 10 ms is seen.  Roots: /run/runc,
/run/crun, /run/user/UID/{runc,crun} (rootless podman), docker's
/run/docker/runtime-runc/moby, containerd's /run/containerd/runc/<namespace>;
more may be given (a docker with its own --exec-root).
"""

from __future__ import annotations

import os
import select
import threading
from typing import Callable, Optional

from tracer.enrichment import procfs
from tracer.enrichment.container_snapshot import snapshot_container
from tracer.enrichment.container_state import read_runtime_state
from tracer.enrichment.container_store import ContainerSnapshot, SnapshotStore
from tracer.host import HostPaths
from tracer.inotify import (IN_CLOSE_WRITE, IN_CREATE, IN_DELETE, IN_IGNORED, IN_MASK_ADD,
                            IN_MOVED_TO, IN_Q_OVERFLOW, Inotify)

MAX_WATCHES = 4096

# (path components under the host's /run; "*" matches any directory, "#" a uid) -> runtime
STATE_ROOTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("runc",), "runc"), (("crun",), "crun"),
    (("user", "#", "runc"), "runc"), (("user", "#", "crun"), "crun"),
    (("docker", "runtime-runc", "moby"), "runc"),
    (("containerd", "runc", "*"), "runc"),
)


class ContainerTracker:
    """A thread that snapshots every container as its runtime creates it."""

    def __init__(self, host: HostPaths, store: SnapshotStore,
                 extra_roots: tuple[tuple[str, str], ...] = (),
                 on_snapshot: Optional[Callable[[ContainerSnapshot], None]] = None) -> None:
        self.host = host
        self.store = store
        self.extra_roots = extra_roots  # (absolute host dir, runtime)
        self.on_snapshot = on_snapshot
        self._inotify: Optional[Inotify] = None
        # wd -> what that directory is watched for: [(dir, rest of the pattern, runtime)]
        self._watches: dict[int, list[tuple[str, tuple[str, ...], str]]] = {}
        self._pending: set[str] = set()  # container dirs seen whose state was not read yet
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()

    # --- watches ----------------------------------------------------------------------
    def _watch(self, directory: str, rest: tuple[str, ...], runtime: str, mask: int) -> None:
        if len(self._watches) >= MAX_WATCHES:
            self.store.counters["tracker_watch_limit"] += 1
            return
        assert self._inotify is not None
        wd = self._inotify.add_watch(os.fsencode(directory), mask | IN_MASK_ADD)
        if wd < 0:
            return
        uses = self._watches.setdefault(wd, [])
        if (directory, rest, runtime) not in uses:
            uses.append((directory, rest, runtime))
        self._scan(directory, rest, runtime)

    def _scan(self, directory: str, rest: tuple[str, ...], runtime: str) -> None:
        if rest == ("@",):  # a container's own dir: its state may already be written
            self._take(os.path.dirname(directory), os.path.basename(directory), runtime)
            return
        for name in procfs.list_dir(directory):
            self._entry(directory, rest, runtime, name)

    def _entry(self, directory: str, rest: tuple[str, ...], runtime: str, name: str) -> None:
        path = os.path.join(directory, name)
        if not rest:  # a state root: `name` is a container id
            if self.store.get(name) is None:
                self._pending.add(path)
            if not os.path.isdir(path):
                self._missed(path)  # gone before we could look
                return
            self._watch(path, ("@",), runtime, IN_MOVED_TO | IN_CLOSE_WRITE)
            return
        if not os.path.isdir(path):
            return
        head = rest[0]
        if head == name or head == "*" or (head == "#" and name.isdigit()):
            mask = IN_CREATE | IN_MOVED_TO | (IN_DELETE if len(rest) == 1 else 0)
            self._watch(path, rest[1:], runtime, mask)

    def start(self) -> "ContainerTracker":
        self._inotify = Inotify()
        for parts, runtime in STATE_ROOTS:
            self._watch(self.host.run, parts, runtime, IN_CREATE | IN_MOVED_TO)
        for directory, runtime in self.extra_roots:
            parts = tuple(p for p in directory.split("/") if p)
            self._watch("/", parts, runtime, IN_CREATE | IN_MOVED_TO)
        self._thread = threading.Thread(target=self._run, name="container-tracker", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._inotify is not None:
            self._inotify.close()

    # --- events -----------------------------------------------------------------------
    def _run(self) -> None:
        assert self._inotify is not None
        poller = select.poll()
        poller.register(self._inotify.fd, select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(200):
                self.store.expire()
                continue
            try:
                events = self._inotify.events()
            except OSError:
                break
            self._dispatch(events)

    def _dispatch(self, events: list[tuple[int, int, bytes]]) -> None:
        for wd, mask, raw in events:
            name = raw.decode("utf-8", "replace")
            if mask & IN_Q_OVERFLOW:
                self.store.counters["tracker_queue_overflow"] += 1
                continue
            if mask & IN_IGNORED:
                self._watches.pop(wd, None)
                continue
            for directory, rest, runtime in list(self._watches.get(wd, ())):
                if rest == ("@",):
                    if name in ("state.json", "status"):
                        self._take(os.path.dirname(directory), os.path.basename(directory),
                                   runtime)
                elif not rest and mask & IN_DELETE:
                    self._missed(os.path.join(directory, name))
                    self.store.mark_died(name)
                elif mask & (IN_CREATE | IN_MOVED_TO):
                    self._entry(directory, rest, runtime, name)

    def _missed(self, path: str) -> None:
        """A container whose state went away before it could be read: counted."""
        if path in self._pending:
            self._pending.discard(path)
            self.store.counters["containers_missed"] += 1

    def _take(self, state_root: str, cid: str, runtime: str) -> None:
        state = read_runtime_state(self.host, runtime, state_root, cid)
        if state is None:
            return
        known = self.store.get(cid)
        if known is not None and known.pid == state.pid:
            return  # a later rewrite of the same state (runc updates it on start)
        owner = _owner_of(state_root)
        snap = snapshot_container(self.host, state, owner)
        self._pending.discard(os.path.join(state_root, cid))
        self.store.add(snap)
        if self.on_snapshot is not None:
            self.on_snapshot(snap)


def _owner_of(path: str) -> int:
    try:
        return os.stat(path).st_uid
    except OSError:
        return 0


_SHARED: dict[HostPaths, ContainerTracker] = {}
_SHARED_LOCK = threading.Lock()


def shared_tracker(host: HostPaths) -> ContainerTracker:
    """The process's one tracker for a host tree, started on first use.  Where
    inotify is unavailable it stays unstarted (counted), and events only get
    what /proc still shows."""
    with _SHARED_LOCK:
        tracker = _SHARED.get(host)
        if tracker is None:
            tracker = ContainerTracker(host, SnapshotStore())
            try:
                tracker.start()
            except OSError:
                tracker.store.counters["tracker_unavailable"] += 1
            _SHARED[host] = tracker
        return tracker
