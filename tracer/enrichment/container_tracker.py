"""Learn containers when they start: inotify on the OCI runtimes' state
directories, a snapshot (container_snapshot.py) the moment runc/crun writes a
container's state.

runc writes <root>/<id>/state.json (by rename) and crun <root>/<id>/status when
the container is created, while its init process already sits in the new
namespaces and cgroup; a container living 10 ms is seen.  Roots: /run/runc,
/run/crun, /run/user/UID/{runc,crun} (rootless podman), docker's
/run/docker/runtime-runc/moby, containerd's /run/containerd/runc/<namespace>;
more may be given (a docker with its own --exec-root), and more are found as
containers start (`add_root`, from the kernel's start signals: start_follower.py).
"""

from __future__ import annotations

import collections
import os
import select
import stat
import threading
import time
from typing import Callable, Optional

from tracer.enrichment import procfs
from tracer.enrichment.access_history import AccessHistory
from tracer.enrichment.container_snapshot import snapshot_container
from tracer.enrichment.container_state import read_runtime_state
from tracer.enrichment.container_store import ContainerSnapshot, SnapshotStore
from tracer.enrichment.device_rule_watch import DeviceRuleWatch
from tracer.enrichment.host_facts import cgroup2_mount_dir
from tracer.enrichment.state_files import StateFiles
from tracer.enrichment.tracker_budget import OwnerBudget
from tracer.host import HostPaths
from tracer.inotify import (IN_CLOSE_WRITE, IN_CREATE, IN_DELETE, IN_DONT_FOLLOW, IN_IGNORED,
                            IN_MASK_ADD, IN_MOVED_TO, IN_ONLYDIR, IN_Q_OVERFLOW, Inotify)

RESCAN_INTERVAL_S = 1.0  # after the kernel's event queue overflowed: look again, at most this often
MAX_QUEUED_WORK = 10000  # start signals waiting for the tracker's thread
MAX_TAKEN = 16384        # container dirs whose state was read, remembered
ROOT_UID = 0

# (path components under the host's /run; "*" matches any directory, "#" a uid) -> runtime
STATE_ROOTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("runc",), "runc"), (("crun",), "crun"),
    (("user", "#", "runc"), "runc"), (("user", "#", "crun"), "crun"),
    (("docker", "runtime-runc", "moby"), "runc"),
    (("containerd", "runc", "*"), "runc"),
)
Use = tuple[str, tuple[str, ...], str]  # (dir, rest of the pattern, runtime)


class ContainerTracker:
    """A thread that snapshots every container as its runtime creates it.  What a
    state dir holds is its owner's word (state_files.py); what the tracker holds
    for each owner is bounded (tracker_budget.py)."""

    def __init__(self, host: HostPaths, store: SnapshotStore,
                 extra_roots: tuple[tuple[str, str], ...] = (),
                 on_snapshot: Optional[Callable[[ContainerSnapshot], None]] = None,
                 watches: Optional[OwnerBudget[int]] = None,
                 pending: Optional[OwnerBudget[str]] = None,
                 history: Optional[AccessHistory] = None) -> None:
        self.host = host
        self.store = store
        # each container's device rules over its life, and group changes (access_history)
        self.history = history or AccessHistory(lambda: cgroup2_mount_dir(host))
        self.rule_watch = DeviceRuleWatch(host, self.history)
        self.extra_roots = extra_roots  # (absolute host dir, runtime)
        self.on_snapshot = on_snapshot
        self._inotify: Optional[Inotify] = None
        self._watches: dict[int, list[Use]] = {}  # wd -> what that directory is watched for
        self._wd_of: dict[str, int] = {}
        self.watch_budget: OwnerBudget[int] = watches or OwnerBudget()
        # container dirs seen whose state was not read yet (for the missed count)
        self.pending: OwnerBudget[str] = pending or OwnerBudget()
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._rescan_due = False
        self._last_rescan = -RESCAN_INTERVAL_S
        self._found: list[tuple[str, str]] = []  # roots add_root was given: (dir, runtime)
        self._taken: dict[str, int] = {}  # container dir -> its inode, once its state was read
        self._work: "collections.deque[Callable[[], None]]" = collections.deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # --- watches ----------------------------------------------------------------------
    def _watch(self, directory: str, rest: tuple[str, ...], runtime: str, mask: int,
               owner: int = ROOT_UID) -> None:
        assert self._inotify is not None
        known = self._wd_of.get(directory)
        if known is None:
            why = self.watch_budget.refusal(owner)
            if why is not None:
                self.store.count("tracker_watch_" + why)
                return
        # a user's directory is never followed through a symlink swapped in since our lstat
        flags = mask | IN_MASK_ADD | IN_ONLYDIR | (IN_DONT_FOLLOW if owner != ROOT_UID else 0)
        wd = self._inotify.add_watch(os.fsencode(directory), flags)
        if wd < 0:
            return
        self.watch_budget.take(wd, owner)
        self._wd_of[directory] = wd
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
        try:
            st = os.lstat(path)
        except OSError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            if st.st_uid != ROOT_UID:  # a user's link could lead into root's state
                self.store.count("tracker_symlink_skipped")
                return
            try:
                st = os.stat(path)  # root's own link (/var/run -> /run): followed
            except OSError:
                st = None
        is_dir = st is not None and stat.S_ISDIR(st.st_mode)
        # all in a user's directory is on that user's budget, whoever owns the entry
        above = self.watch_budget.owner_of(self._wd_of.get(directory, -1))
        owner = above if above not in (None, ROOT_UID) else \
            st.st_uid if st is not None else ROOT_UID
        if not rest:  # a state root: `name` is a container id
            if self.store.get(name) is None and path not in self.pending:
                why = self.pending.take(path, owner)
                if why is not None:
                    self.store.count("tracker_pending_" + why)
            if not is_dir:
                self._missed(path)  # gone before we could look
                return
            # runc renames state.json into place (its temp files' closes are no news);
            # crun writes status in place
            mask = IN_MOVED_TO if runtime == "runc" else IN_MOVED_TO | IN_CLOSE_WRITE
            self._watch(path, ("@",), runtime, mask, owner)
            return
        if not is_dir:
            return
        head = rest[0]
        if head == name or head == "*" or (head == "#" and name.isdigit()):
            mask = IN_CREATE | IN_MOVED_TO | (IN_DELETE if len(rest) == 1 else 0)
            self._watch(path, rest[1:], runtime, mask, owner)

    def _watch_roots(self) -> None:
        for parts, runtime in STATE_ROOTS:
            self._watch(self.host.run, parts, runtime, IN_CREATE | IN_MOVED_TO)
        for directory, runtime in self.extra_roots:
            parts = tuple(p for p in directory.split("/") if p)
            self._watch("/", parts, runtime, IN_CREATE | IN_MOVED_TO)
        for directory, runtime in self._found:
            self._watch_state_root(directory, runtime)

    def _watch_state_root(self, directory: str, runtime: str) -> None:
        try:
            owner = os.stat(directory).st_uid
        except OSError:
            return
        self._watch(directory, (), runtime, IN_CREATE | IN_MOVED_TO | IN_DELETE, owner)

    # --- work from the kernel's start signals (start_follower.py) ---------------------
    def submit(self, work: Callable[[], None]) -> None:
        """Run `work` on the tracker's thread, soon; from any thread.  Bounded: what
        does not fit is counted (inotify still sees the container)."""
        if len(self._work) >= MAX_QUEUED_WORK:
            self.store.count("tracker_start_queue_full")
            return
        idle = not self._work
        self._work.append(work)
        if idle:  # else a wake-up is pending already
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass  # the pipe is full: a wake-up is pending anyway

    def add_root(self, directory: str, runtime: str, why: str) -> None:
        """A state root found as a container started (the tracker's thread): watched
        from now on, and again after an inotify overflow."""
        if (directory, runtime) in self._found:
            return
        self._found.append((directory, runtime))
        self.store.count("tracker_roots_found")
        self._watch_state_root(directory, runtime)

    def take(self, state_root: str, cid: str, runtime: str) -> None:
        """Read a container's state now (the tracker's thread), unless already read."""
        if os.path.join(state_root, cid) not in self._taken:
            self._take(state_root, cid, runtime)

    def _run_work(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:
            pass
        while self._work:
            work = self._work.popleft()
            try:
                work()
            except Exception:  # one start's follow-up must not stop the tracker
                self.store.count("tracker_start_errors")

    def start(self) -> "ContainerTracker":
        self._inotify = Inotify()
        self.rule_watch.start()
        self._watch_roots()
        self._thread = threading.Thread(target=self._run, name="container-tracker", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._inotify is not None:
            self._inotify.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.rule_watch.close()

    # --- events -----------------------------------------------------------------------
    def _run(self) -> None:
        assert self._inotify is not None
        poller = select.poll()
        poller.register(self._inotify.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stop.is_set():
            self._rescan_if_due()
            ready = {fd for fd, _ in poller.poll(200)}
            if not ready:
                self.store.expire()
                if self._work:  # queued as the last wake-up was being taken
                    self._run_work()
                continue
            if self._inotify.fd in ready:
                try:
                    events = self._inotify.events()
                except OSError:
                    break
                self._dispatch(events)
            if self._wake_r in ready or self._work:
                self._run_work()

    def _rescan_if_due(self) -> None:
        """Events were lost (the kernel's queue overflowed, say under a flood of
        directories): look at every state root again, at most once a second."""
        now = time.monotonic()
        if self._rescan_due and now - self._last_rescan >= RESCAN_INTERVAL_S:
            self._rescan_due, self._last_rescan = False, now
            self.store.count("tracker_rescans")
            self._watch_roots()

    def _dispatch(self, events: list[tuple[int, int, bytes]]) -> None:
        for wd, mask, raw in events:
            name = raw.decode("utf-8", "replace")
            if mask & IN_Q_OVERFLOW:
                self.store.count("tracker_queue_overflow")
                self._rescan_due = True
                continue
            if mask & IN_IGNORED:
                for directory, _, _ in self._watches.pop(wd, ()):
                    if self._wd_of.get(directory) == wd:
                        del self._wd_of[directory]
                self.watch_budget.release(wd)
                continue
            for directory, rest, runtime in list(self._watches.get(wd, ())):
                if rest == ("@",):
                    if name in ("state.json", "status") and not self._same_taken(directory):
                        self._take(os.path.dirname(directory), os.path.basename(directory),
                                   runtime)
                elif not rest and mask & IN_DELETE:
                    self._taken.pop(os.path.join(directory, name), None)
                    self._missed(os.path.join(directory, name))
                    owner = self.watch_budget.owner_of(wd)
                    self.store.mark_died(name, owner=ROOT_UID if owner is None else owner)
                elif mask & (IN_CREATE | IN_MOVED_TO):
                    self._entry(directory, rest, runtime, name)

    def _same_taken(self, directory: str) -> bool:
        """The state of this very container dir was read already: runc rewrites
        state.json when it starts the container (same init), nothing new for us."""
        known = self._taken.get(directory)
        if known is None:
            return False
        try:
            return os.stat(directory).st_ino == known
        except OSError:
            return False

    def _missed(self, path: str) -> None:
        """A container whose state went away before it could be read: counted."""
        if self.pending.release(path) is not None:
            self.store.count("containers_missed")

    def _take(self, state_root: str, cid: str, runtime: str) -> None:
        files = StateFiles.of(state_root, self.store.count)
        if files is None:
            return
        state = read_runtime_state(self.host, runtime, state_root, cid, files)
        if state is None:
            return
        pid, userns = files.init_pid(self.host.proc, state.pid)
        known = self.store.get(cid)
        if known is not None and known.pid == pid and known.owner == files.owner:
            return  # a later rewrite of the same state (runc updates it on start)
        if files.rootless and pid is None:
            if known is None or known.owner != files.owner:  # else: its init exited since
                self.store.count("tracker_state_rejected")  # the reason: state_pid_*
            return
        state.pid = pid
        snap = snapshot_container(self.host, state, files.owner, files)
        if pid is not None and not files.same_init(self.host.proc, pid, userns):
            self.store.count("tracker_state_rejected")  # the pid was reused while we read
            return
        snap.owner = files.owner
        self.pending.release(os.path.join(state_root, cid))
        try:
            self._taken[os.path.join(state_root, cid)] = os.stat(state.state_dir).st_ino
        except OSError:
            pass
        while len(self._taken) > MAX_TAKEN:  # deletions not seen (an overflow): oldest first
            del self._taken[next(iter(self._taken))]
        if not self.store.add(snap):
            return
        self.rule_watch.track(snap)
        if self.on_snapshot is not None:
            self.on_snapshot(snap)


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
                tracker.store.count("tracker_unavailable")
            _SHARED[host] = tracker
        return tracker
