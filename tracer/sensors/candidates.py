"""Match a refused open by device number, not by the spelling of its path.

The kernel program matches GPU paths by prefix after normalising them.  A
refused open whose path matches no prefix (a symlink to a node, a bind mount
of it, a node made with mknod under another name, `--device
/dev/nvidia0:/dev/gpu0`) arrives as a *candidate*: this module resolves the
path in the process's root, as that process would see it but with no way out
of the root (openat2 RESOLVE_IN_ROOT, O_PATH: the device is never opened), and
keeps it when it is a character device with a GPU major.

The process is often gone by then.  Its root is taken from the process itself
when it still lives in the same mount namespace, else from any live process
in that mount namespace.  A mount namespace with no live process left (a `--rm`
container already gone) is resolved through the container's snapshot, taken by
the container tracker when it started (the store the enrichment reads, found by
the same keys and lifetime): its OCI config says what the path was, a
`linux.devices` entry (type, major, minor) or a bind mount of a host path (stat
on the host, O_PATH).  Without a snapshot it is unresolved: counted, never
guessed.  Snapshot answers are not cached (a dead namespace's inode is reused).  Answers are cached per
(mount namespace, path), bounded and for NOT_GPU_TTL_S only: a path can become
a GPU node later (a symlink or bind mount made after the first look).
"""

from __future__ import annotations

import collections
import datetime
import os
import stat
from dataclasses import dataclass
import time
from typing import TYPE_CHECKING, Callable, Optional

from tracer.oci_paths import oci_path_origin
from tracer.in_root import open_in_root
from tracer.sensors.bpf_constants import NOT_GPU_TTL_S
from tracer.sensors.gpu_nodes import GpuNodeSet

if TYPE_CHECKING:
    from tracer.enrichment.container_store import SnapshotStore
    from tracer.event import Process

CACHE_MAX = 4096
NS_SCAN_MIN_INTERVAL_S = 1.0  # at most one /proc scan per second for unknown namespaces


@dataclass(frozen=True)
class Resolution:
    outcome: str  # "gpu", "not_gpu" or "unresolved" (bounded label, counted)
    major: Optional[int] = None
    minor: Optional[int] = None
    via: Optional[dict[str, object]] = None  # identity from a container snapshot: where, when


def _snapshot_time(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.timezone.utc).isoformat(
        timespec="milliseconds")


NOT_GPU = Resolution("not_gpu")
UNRESOLVED = Resolution("unresolved")


class DeviceResolver:
    def __init__(self, nodes: GpuNodeSet, proc: str = "/proc", cache_max: int = CACHE_MAX,
                 clock: Callable[[], float] = time.monotonic,
                 ttl_s: float = NOT_GPU_TTL_S,
                 snapshots: "Optional[SnapshotStore]" = None, host_root: str = "/") -> None:
        self.nodes = nodes
        self.snapshots = snapshots  # the container tracker's store (shared, not a copy)
        self.host_root = host_root
        self.proc = proc
        self.cache_max = cache_max
        self.ttl_s = ttl_s
        # (mntns, path) -> (answer, monotonic time it expires)
        self._cache: "collections.OrderedDict[tuple[int, bytes], tuple[Resolution, float]]" = \
            collections.OrderedDict()
        self._ns_pid: dict[int, int] = {}  # mount ns inode -> a pid last seen in it
        self._clock = clock
        self._last_scan = -NS_SCAN_MIN_INTERVAL_S
        self.counts: collections.Counter[str] = collections.Counter()

    # -- the mount namespace's root -------------------------------------------
    def _mntns_of(self, pid: int) -> Optional[int]:
        try:
            return os.stat(f"{self.proc}/{pid}/ns/mnt").st_ino
        except OSError:
            return None

    def _pid_in(self, mntns: int, pid: int) -> Optional[int]:
        if self._mntns_of(pid) == mntns:
            return pid
        known = self._ns_pid.get(mntns)
        if known is not None and self._mntns_of(known) == mntns:
            return known
        now = self._clock()
        if now - self._last_scan < NS_SCAN_MIN_INTERVAL_S:
            return None
        self._last_scan = now
        self._ns_pid.clear()
        try:
            names = os.listdir(self.proc)
        except OSError:
            return None
        for name in names:
            if name.isdigit():
                ns = self._mntns_of(int(name))
                if ns is not None:
                    self._ns_pid.setdefault(ns, int(name))
        return self._ns_pid.get(mntns)

    # -- resolving --------------------------------------------------------------
    def resolve(self, pid: int, mntns: Optional[int], path: bytes,
                process: "Optional[Process]" = None, when: Optional[float] = None) -> Resolution:
        """`process` and `when` (the event's) find the container snapshot when no
        live process of the mount namespace is left."""
        if mntns is None:
            self.counts["unresolved"] += 1
            return UNRESOLVED  # whose mount table applies is not known
        key = (mntns, path)
        hit = self._cache.get(key)
        if hit is not None and hit[1] > self._clock():
            self._cache.move_to_end(key)
            self.counts["cache_hit"] += 1
            return hit[0]
        live = self._pid_in(mntns, pid)
        if live is None:
            found = self._from_snapshot(process, when, path)
            if found is not None:
                self.counts[f"{found.outcome}_via_snapshot"] += 1
                return found  # not cached: the namespace is gone, its inode may be reused
            self.counts["unresolved"] += 1
            return UNRESOLVED  # not cached: a process may appear in the namespace later
        result = self._stat(f"{self.proc}/{live}/root", path)
        self.counts[result.outcome] += 1
        self._cache[key] = (result, self._clock() + self.ttl_s)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_max:
            self._cache.popitem(last=False)
            self.counts["cache_evicted"] += 1
        return result

    def _from_snapshot(self, process: "Optional[Process]", when: Optional[float],
                       path: bytes) -> Optional[Resolution]:
        """The path through the OCI config of the container the process ran in:
        None when there is no snapshot or it does not say what the path was."""
        if self.snapshots is None or process is None or when is None:
            return None
        hit = self.snapshots.find(process, when)
        if hit is None:
            return None
        snap, key = hit
        oci = snap.facts.get("container.oci")
        text = os.fsdecode(path)
        _holder, source, device = oci_path_origin(oci.value if oci else None, text)
        name = snap.facts.get("container.name")
        via: dict[str, object] = {
            "container": snap.id, "name": name.value if name else None,
            "runtime": snap.runtime, "snapshot_time": _snapshot_time(snap.created),
            "found_by": key, "config": oci.origin if oci else None}
        if source is not None:
            result = self._stat(self.host_root, os.fsencode(source))
            via["how"] = f"bind mount of host {source}"
        elif device is not None:
            major, minor = device.get("major"), device.get("minor")
            if str(device.get("type")) not in ("c", "u") or not isinstance(major, int) \
                    or not isinstance(minor, int) or not self.nodes.is_gpu(major, minor):
                result = NOT_GPU
            else:
                result = Resolution("gpu", major, minor)
            via["how"] = "linux.devices"
        else:
            return None
        return Resolution(result.outcome, result.major, result.minor, via)

    def _stat(self, root: str, path: bytes) -> Resolution:
        fd = open_in_root(root, os.fsdecode(path), os.O_PATH)
        if fd is None:
            return NOT_GPU  # missing, or refused to root: nothing to match
        try:
            st = os.fstat(fd)
        except OSError:
            return NOT_GPU
        finally:
            os.close(fd)
        if not stat.S_ISCHR(st.st_mode):
            return NOT_GPU
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        if not self.nodes.is_gpu(major, minor):
            return NOT_GPU
        return Resolution("gpu", major, minor)

    def __len__(self) -> int:
        return len(self._cache)
