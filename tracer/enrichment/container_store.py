"""Container snapshots taken when a container starts, kept a while after it dies.

A snapshot is found again by what every event carries: the cgroup id, the
mount, pid and user namespace inodes, or (for the audit sensor, which has none
of those) the host pid of the container's init during the container's life.
The store is bounded in count and in each snapshot's size; what it evicts is
counted, never silent.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from tracer.enrichment.cgroup_name import cgroup_matches, cgroup_tail, snapshot_ids
from tracer.facts import CACHED, Facts, Fact
from tracer.event import Process

DEFAULT_CAPACITY = 512
DEFAULT_RETENTION_S = 600.0
DEFAULT_MAX_BYTES = 8 << 20      # all snapshots together, as approx_bytes() (heap is ~1.9x: ~15 MiB)
MAX_FACTS_PER_SNAPSHOT = 64
CREATED_SLACK_S = 0.05   # event and runtime clocks: both CLOCK_REALTIME, read apart
DIED_SLACK_S = 0.05   # we see the state go after the container is gone: never early
EXPIRY_SCAN_S = 1.0   # dead snapshots are looked for at most this often on add (O(n) scan)
MAX_FACT_JSON_BYTES = 64 << 10   # a fact larger than this is dropped (counted)


@dataclass
class ContainerSnapshot:
    """One container as seen when it started.  `facts` use the enrichment's own
    fact names (container.*, userns.*, cgroup.*, device_cgroup.*), so an event of
    an exited process gets exactly what a live one would have."""

    id: str
    runtime: str
    created: float                          # when we saw it (epoch seconds)
    pid: Optional[int] = None               # host pid of the container's init
    died: Optional[float] = None            # when its state went away
    cgroup_id: Optional[int] = None
    mntns: Optional[int] = None
    pidns: Optional[int] = None
    userns: Optional[int] = None
    facts: dict[str, Fact] = field(default_factory=dict)
    dropped_facts: int = 0
    owner: int = 0                          # uid owning its state dir (0: the runtime's own)
    _sizes: dict[str, int] = field(default_factory=dict, repr=False)  # repr() length per fact

    def put(self, name: str, value: Any, origin: str) -> None:
        if value is None or (name not in self.facts and len(self.facts) >= MAX_FACTS_PER_SNAPSHOT):
            self.dropped_facts += value is not None
            return
        size = len(repr(value))
        if size > MAX_FACT_JSON_BYTES:
            self.dropped_facts += 1
            return
        self.facts[name] = Fact(value, CACHED, origin)
        self._sizes[name] = size

    def add_facts(self, facts: Facts, prefix_origin: str) -> None:
        for name, fact in facts.items():
            self.put(name, fact.value, f"{prefix_origin}: {fact.origin}" if fact.origin
                     else prefix_origin)

    def keys(self) -> list[tuple[str, int]]:
        out = []
        for kind in ("cgroup_id", "mntns", "pidns", "userns"):
            value = getattr(self, kind)
            if value:
                out.append((kind, int(value)))
        return out

    def alive_at(self, when: float) -> bool:
        """Was the container running at `when`?  `created` is the runtime's own
        record; `died` is when we saw its state go, a little after the fact."""
        return self.created - CREATED_SLACK_S <= when and \
            (self.died is None or when <= self.died + DIED_SLACK_S)

    def to_facts(self, why: str) -> Facts:
        out = Facts()
        for name, fact in self.facts.items():
            out.put(name, fact.value, CACHED, f"{why}; {fact.origin}")
        return out

    def approx_bytes(self) -> int:
        return sys.getsizeof(self) + sum(
            (self._sizes.get(n) or len(repr(f.value))) + len(f.origin) + 100
            for n, f in self.facts.items())


class SnapshotStore:
    """Bounded: at most `capacity` snapshots and `max_bytes` of them together; a
    dead one expires `retention_s` after it died; when full, the dead ones go
    first, oldest first.  Every eviction and expiry is counted."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY,
                 retention_s: float = DEFAULT_RETENTION_S,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if capacity < 1:
            raise ValueError("snapshot store capacity must be at least 1")
        self.capacity = capacity
        self.retention_s = retention_s
        self.max_bytes = max_bytes
        self._bytes: dict[str, int] = {}
        self._total_bytes = 0
        self._scanned = float("-inf")  # when dead snapshots were last looked for
        self._items: OrderedDict[str, ContainerSnapshot] = OrderedDict()
        # namespace inodes are reused once freed: a key may name several containers
        self._index: dict[tuple[str, int], list[str]] = {}
        self._lock = threading.Lock()
        self.counters: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._items)

    def count(self, name: str, n: int = 1) -> None:
        """A counter bump from another thread (the tracker), under the store's lock."""
        with self._lock:
            self.counters[name] += n

    def add(self, snap: ContainerSnapshot) -> bool:
        """Keep `snap`; False (counted) when its id is held by a live snapshot of
        another owner that it may not replace: a user's state dir naming the id
        of root's container, or of another user's."""
        with self._lock:
            held = self._items.get(snap.id)
            if held is not None and held.owner != snap.owner and held.died is None \
                    and snap.owner != 0:
                self.counters["snapshot_id_taken"] += 1
                return False
            old = self._items.pop(snap.id, None)
            if old is not None:
                self._total_bytes -= self._bytes.pop(snap.id, 0)
                self._unindex(old)
            self._items[snap.id] = snap
            self._bytes[snap.id] = size = snap.approx_bytes()
            self._total_bytes += size
            for key in snap.keys():
                self._index.setdefault(key, []).append(snap.id)
            self.counters["snapshots_taken"] += 1
            self.counters["snapshot_facts_dropped"] += snap.dropped_facts
            self._bound(time.time(), scan=False)
            return True

    def get(self, cid: str) -> Optional[ContainerSnapshot]:
        with self._lock:
            return self._items.get(cid)

    def mark_died(self, cid: str, when: Optional[float] = None, owner: int = 0) -> None:
        """Its state went away: only the owner of the snapshot's state dir says so."""
        with self._lock:
            snap = self._items.get(cid)
            if snap is not None and snap.died is None and snap.owner == owner:
                snap.died = when if when is not None else time.time()
                self.counters["containers_died"] += 1

    def _unindex(self, snap: ContainerSnapshot) -> None:
        for key in snap.keys():
            ids = self._index.get(key, [])
            if snap.id in ids:
                ids.remove(snap.id)
            if not ids:
                self._index.pop(key, None)

    def _drop(self, cid: str, why: str) -> None:
        snap = self._items.pop(cid)
        self._total_bytes -= self._bytes.pop(cid, 0)
        self._unindex(snap)
        self.counters[why] += 1

    def _bound(self, now: float, scan: bool = True) -> None:
        """Expire the dead past their retention (on add: at most once a second, the
        scan is over every snapshot), then evict down to the bounds."""
        if scan or now - self._scanned >= EXPIRY_SCAN_S or now < self._scanned:
            self._scanned = now
            for cid in [c for c, s in self._items.items()
                        if s.died is not None and now - s.died > self.retention_s]:
                self._drop(cid, "snapshots_expired")
        while len(self._items) > self.capacity or \
                (len(self._items) > 1 and self._total_bytes > self.max_bytes):
            dead = next((c for c, s in self._items.items() if s.died is not None), None)
            self._drop(dead if dead is not None else next(iter(self._items)),
                       "snapshots_evicted")

    def expire(self, now: Optional[float] = None) -> None:
        with self._lock:
            self._bound(time.time() if now is None else now)

    def find(self, proc: Process, when: float, missing: Iterable[str] = ()) -> Optional[tuple[ContainerSnapshot, str]]:
        """The snapshot of the container the event's process ran in, and the key
        that found it.  Namespace and cgroup keys are unique while the kernel
        object lives; a pid only counts within the container's own lifetime."""
        absent = set(missing)
        with self._lock:
            by_name = self._by_cgroup_name(proc, when)
            if by_name is not None:
                return by_name
            candidates = []
            if "process.mntns" not in absent and proc.mntns:
                candidates.append(("mntns", proc.mntns))
            if "process.pidns" not in absent and proc.pidns:
                candidates.append(("pidns", proc.pidns))
            if "process.cgroup_id" not in absent and proc.cgroup_id is not None \
                    and proc.cgroup_id > 1:
                candidates.append(("cgroup_id", proc.cgroup_id))
            level, inum = proc.userns.level, proc.userns.inum
            if "process.userns" not in absent and level is not None and level > 0 and inum:
                candidates.append(("userns", inum))
            for key in candidates:
                alive = [s for s in (self._items.get(c) for c in self._index.get(key, []))
                         if s is not None and s.alive_at(when) and _same_cgroup(s, proc)]
                if alive:  # the latest created before the event: an inode reused later is not it
                    snap = max(alive, key=lambda s: s.created)
                    self.counters["snapshot_hit_" + key[0]] += 1
                    return snap, f"{key[0]} {key[1]}"
            # no kernel keys (audit), or a snapshot taken after its init had already
            # exited (no namespace keys left to read): the init's pid, in its lifetime
            for pid, how in ((proc.pid, "pid"), (proc.ppid, "parent pid")):
                for snap in reversed(self._items.values()):
                    if candidates and snap.keys():
                        continue  # its keys were read and did not match
                    if pid and snap.pid == pid and snap.alive_at(when) and _same_cgroup(snap, proc):
                        self.counters["snapshot_hit_pid"] += 1
                        return snap, f"{how} {pid} was the container's init then"
            self.counters["snapshot_miss"] += 1
            return None

    def _by_cgroup_name(self, proc: Process, when: float) -> Optional[tuple[ContainerSnapshot, str]]:
        """The container whose id the kernel-captured cgroup name carries (an engine's
        docker-<id>.scope, libpod-<id>, ...), or runc's /<id>, when the snapshot's own
        recorded cgroup is that very one."""
        tail = cgroup_tail(proc)
        for cid, by_pattern in snapshot_ids(proc):
            snap = self._items.get(cid)
            if snap is None or not snap.alive_at(when):
                continue
            paths = snap.facts.get("cgroup.paths")
            recorded = paths.value if paths is not None else None
            if (tail and cgroup_matches(tail, recorded)) or (by_pattern and recorded is None):
                self.counters["snapshot_hit_cgroup_name"] += 1
                return snap, f"cgroup name {tail}"
        return None

    def approx_bytes(self) -> int:
        with self._lock:
            return self._total_bytes

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = dict(self.counters)
            out["snapshots_held"] = len(self._items)
            out["snapshot_bytes"] = self._total_bytes
            return out


def _same_cgroup(snap: ContainerSnapshot, proc: Process) -> bool:
    """A snapshot found by a namespace inode or a pid is another container's when
    the kernel named the event's cgroup and the snapshot recorded a different one
    (the inode of a namespace is reused as soon as it is freed, and a container's
    end may not have reached the tracker yet)."""
    tail = cgroup_tail(proc)
    paths = snap.facts.get("cgroup.paths")
    if tail is None or paths is None or not isinstance(paths.value, dict):
        return True
    if cgroup_matches(tail, paths.value):
        return True
    if not proc.cgroup_parent:  # directly under the root: no container's child
        return False
    leaf = tail.rsplit("/", 1)[-1]  # a child of the container's cgroup (init.scope, ...)
    return cgroup_matches(tail, {k: f"{v.rstrip('/')}/{leaf}" for k, v in paths.value.items()
                                 if isinstance(v, str)})
