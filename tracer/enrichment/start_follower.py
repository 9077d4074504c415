"""The kernel's container-start signals, followed up: each is filed at once (so a
denial a millisecond later already finds its container's start), then, on the
container tracker's thread, the runtime's state root it names is watched and the
container's state read while it lives.

    follower = StartFollower(host, tracker)
    sensor.on_container_start = follower.on_start     # the BPF sensor's thread

inotify stays the source of the runtime's state; the signal makes sure no start
goes unseen (a root nobody listed, a container shorter than inotify's reaction,
an inotify queue overflow) and carries what the kernel knew then.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Optional

from tracer.enrichment import procfs
from tracer.enrichment.container_tracker import shared_tracker
from tracer.enrichment.kernel_starts import StartBook, StartRecord
from tracer.enrichment.state_roots import (RootReacher, argv_of, engine_roots, root_of_monitor,
                                           root_of_runtime)
from tracer.host import HostPaths
from tracer.sensors.container_starts import (ContainerStart, RuntimeCommand, monitor_command,
                                             runtime_command)

if TYPE_CHECKING:
    from tracer.enrichment.container_tracker import ContainerTracker


class StartFollower:
    def __init__(self, host: HostPaths, tracker: "ContainerTracker",
                 book: Optional[StartBook] = None) -> None:
        self.host = host
        self.tracker = tracker
        self.book = book if book is not None else StartBook()
        self.reacher = RootReacher(host)
        self._roots: set[tuple[str, str]] = set()  # (directory, runtime) handed to the tracker
        # (mount ns, named root, runtime) of cgroup makers whose root is watched already,
        # for the host's own mount namespaces only (they never go, so no inode reuse)
        self._watched: set[tuple[int, str, str]] = set()

    def on_start(self, start: ContainerStart) -> None:
        """The sensor's thread: file it; an exec no cgroup maker told us about (a
        rootless runtime makes none) gets its monitor's command line now, while
        the monitor surely lives and before the container's first denial is
        explained; the rest waits for the tracker's thread."""
        record = self.book.add(start)
        if start.how == "exec" and record.runtime is None:
            self._describe(start, record)
        if self._nothing_to_follow(start, record):
            self.book.counters["start_follow_skipped"] += 1
            return  # what follow() would find is done: no wake-up of the tracker's thread
        self.tracker.submit(lambda: self.follow(start, record))

    def _nothing_to_follow(self, start: ContainerStart, record: StartRecord) -> bool:
        """follow() would do nothing: no runtime made the cgroup, or its named root is
        watched already; an exec whose container the tracker has read (its state is
        written before the exec)."""
        cmd = record.runtime
        if start.how == "mkdir":
            return cmd is None or self._watch_key(start, cmd) in self._watched
        cid = cmd.container_id if cmd is not None else None
        return cid is not None and self._snapshotted(cid)

    def _watch_key(self, start: ContainerStart, cmd: RuntimeCommand) -> Optional[tuple[int, str, str]]:
        """Where a cgroup maker keeps its state, when its record alone says it: --root,
        or root's default; in a mount namespace of the host's."""
        if not (cmd.root or (start.uid == 0 and start.userns.level == 0)) \
                or start.mntns not in procfs.host_namespaces(self.host.proc, "mnt"):
            return None
        named, _ = root_of_runtime(self.host, cmd, start.pid, start.uid, start.userns.level)
        return (start.mntns, named, cmd.runtime)

    def _describe(self, start: ContainerStart, record: StartRecord) -> None:
        argv = argv_of(self.host, start.ppid)
        monitor = monitor_command(argv)
        if monitor is not None:
            self.book.describe(record, monitor, f"the command line of {monitor.monitor} "
                               f"(pid {start.ppid}), the container's monitor")
        else:
            record.parent_argv = argv

    def follow(self, start: ContainerStart, record: StartRecord) -> None:
        if start.how == "mkdir":  # its state is not written yet: watching the root will see it
            cmd = record.runtime
            if cmd is not None:
                named, why = root_of_runtime(self.host, cmd, start.pid, start.uid,
                                             start.userns.level)
                key = self._watch_key(start, cmd)
                if self._use(start.pid, named, cmd.runtime, why, None) and key is not None:
                    self._watched.add(key)
            return
        known = record.runtime
        if known is not None and known.container_id and self._snapshotted(known.container_id):
            return  # its cgroup's maker already told us, and the tracker has read it
        monitor = record.monitor
        if monitor is not None:
            found = root_of_monitor(self.host, monitor, start.ppid)
            if found is not None and monitor.runtime:
                self._use(start.ppid, found[0], monitor.runtime, found[1], monitor.container_id)
            return
        argv = record.parent_argv if record.parent_argv is not None \
            else argv_of(self.host, start.ppid)
        cmd = runtime_command(argv)  # `runc run` is its own container's parent
        if cmd is not None:
            named, why = root_of_runtime(self.host, cmd, start.ppid)
            self._use(start.ppid, named, cmd.runtime, why, cmd.container_id)
        else:
            self.book.counters["starts_without_runtime"] += 1

    def _snapshotted(self, cid: str) -> bool:
        return self.tracker.store.get(cid) is not None

    def _use(self, pid: int, named: str, runtime: str, why: str, cid: Optional[str]) -> bool:
        """The root watched (and the container read, with `cid`); False: unreachable."""
        directory = self.reacher.reach(pid, named)
        if directory is None:
            self.book.counters["state_root_unreachable"] += 1
            return False
        if (directory, runtime) not in self._roots:
            self._roots.add((directory, runtime))
            self.tracker.add_root(directory, runtime, why)
        if cid and not self._snapshotted(cid):
            self.tracker.take(directory, cid, runtime)
        return True

    def stats(self) -> dict[str, int]:
        return {**self.book.stats(), **self.reacher.counters}

    def watch_running_engines(self) -> None:
        """Roots of engines and monitors already running when gputrace starts."""
        for pid, named, runtime, why in engine_roots(self.host):
            self._use(pid, named, runtime, why, None)


_SHARED: dict[HostPaths, StartFollower] = {}
_SHARED_LOCK = threading.Lock()


def shared_follower(host: HostPaths) -> StartFollower:
    """The process's one follower of start signals for a host tree, on its one tracker."""
    with _SHARED_LOCK:
        follower = _SHARED.get(host)
        if follower is None:
            follower = _SHARED[host] = StartFollower(host, shared_tracker(host))
        return follower
