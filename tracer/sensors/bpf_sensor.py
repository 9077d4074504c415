"""The BPF sensor: loads bpf/gputrace.bpf.c and turns its records into Events.

Counting is exact end to end: the kernel folds repeats of one (process, node,
errno) into an aggregate and sends the first event plus periodic count
updates; this module sweeps the aggregation table so the last repeats before a
process exits are reported too, and nothing the kernel could not deliver goes
uncounted (see `stats()`).

Refused opens whose path matches no GPU prefix arrive as candidates; they are
kept only when the path resolves to a GPU device number
(tracer/sensors/candidates.py), and the kernel is told which paths are not
GPU nodes so that repeats of them cost no event.
"""

from __future__ import annotations

import collections
import ctypes
import errno as errno_mod
import os
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Deque, Iterator, Optional

from tracer.errors import EnvironmentProblem
from tracer.event import Event, Node, Process
from tracer.facts import CACHED, SENSOR, Facts
from tracer.host import HostPaths
from tracer.sensors import bpf_constants, bpf_event, compiler_memory, gpu_nodes, kernel_headers
from tracer.sensors import preflight
from tracer.sensors.bpf_constants import (HASH_MASK, MAX_PREFIXES, NOT_GPU_TTL_S, PREFIX_CAP,
                                          RINGBUF_PAGES, STAT_NAMES, SYSCALL_NAMES)
from tracer.sensors.bpf_event import AggKey, DecodeError, DevProgRecord, Update
from tracer.sensors.bpf_layout import current_arch, offset_flags, start_flags
from tracer.sensors.btf import KIND_FUNC, KernelBtf
from tracer.sensors.candidates import DeviceResolver
from tracer.sensors.container_starts import (START_EVENT_SIZE, ContainerStart, decode_start,
                                             is_start_record, mkdir_hierarchy)
from tracer.sensors.kernel_device_programs import KernelDevicePrograms, attach_tail

if TYPE_CHECKING:
    from tracer.enrichment.container_store import SnapshotStore

__all__ = ["BpfConfig", "BpfSensor", "STAT_NAMES"]


def bpf_source_dir() -> str:
    env = os.environ.get("GPUTRACE_BPF_DIR")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "..", "..", "bpf"), "/usr/share/gputrace/bpf"):
        if os.path.exists(os.path.join(candidate, "gputrace.bpf.c")):
            return os.path.normpath(candidate)
    raise EnvironmentProblem("cannot find bpf/gputrace.bpf.c (set GPUTRACE_BPF_DIR)")


def bpf_program_text(container_starts: bool) -> bytes:
    """gputrace.bpf.c, with container_start.bpf.c after it when asked for (BCC
    makes tracepoint argument structs only for its main source: no #include)."""
    parts = ["gputrace.bpf.c"] + (["container_start.bpf.c"] if container_starts else [])
    out = b""
    for name in parts:
        with open(os.path.join(bpf_source_dir(), name), "rb") as f:
            out += f.read() + b"\n"
    return out


def compile_program(text: bytes, flags: dict[str, object]) -> Any:
    """Compile and load BPF C `text` with these `-D` flags (BCC raises on failure).
    BCC compiles it as /virtual/main.c: gputrace's own headers (kernel_read.h) come by -I."""
    from bcc import BPF  # imported late: only the BPF sensors need BCC

    cflags = [f"-D{k}={v}" for k, v in flags.items()] + ["-Wno-macro-redefined",
                                                          f"-I{bpf_source_dir()}"]
    devnull = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(2)
    try:  # BCC prints compiler chatter on fd 2; keep the terminal clean
        os.dup2(devnull, 2)
        return BPF(text=text, cflags=cflags)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@dataclass
class BpfConfig:
    errnos: tuple[int, ...] = (errno_mod.EACCES, errno_mod.EPERM)
    extra_prefixes: tuple[str, ...] = ()
    extra_devs: tuple[tuple[int, Optional[int]], ...] = ()  # (major, minor or None)
    hook: str = "auto"          # auto | fexit | tracepoint
    transport: str = "auto"     # auto | ringbuf | perf
    ringbuf_pages: int = RINGBUF_PAGES
    match_by_device: bool = True  # refused opens outside the prefixes: match by device number
    not_gpu_ttl_s: float = NOT_GPU_TTL_S  # how long "this path is not a GPU node" is trusted
    aggregate_interval_s: float = 1.0
    aggregate_max: int = 16384
    book_max: int = 16384  # aggregates remembered in userspace (oldest forgotten first)
    sweep_interval_s: float = 1.0
    tracefs: str = "/sys/kernel/tracing"
    headers_cache: str = "/var/cache/gputrace"
    btf_path: Optional[str] = None  # default: HostPaths.btf_vmlinux
    container_starts: bool = True  # the kernel's container-start signals (container_start.bpf.c)


@dataclass
class _Aggregate:
    first: Optional[Event]
    reported: int
    pending: int = 0  # counts seen before the first event arrived


@dataclass
class BpfSensor:
    config: BpfConfig = field(default_factory=BpfConfig)
    host: HostPaths = field(default_factory=HostPaths)
    say: Callable[[str], None] = lambda msg: print(f"gputrace: {msg}", file=sys.stderr)
    # the container tracker's store: a candidate whose mount namespace has no live
    # process left is resolved through its container's OCI config (shared, see assembly)
    snapshots: "Optional[SnapshotStore]" = None
    # where container-start signals go (the container tracker; see assembly), called on
    # the sensor's thread before any later record is handled
    on_container_start: Optional[Callable[[ContainerStart], None]] = None
    # gputrace's own look-ups (the enrichment's O_PATH opens of a node that is not
    # there, with ENOENT watched) are refused opens of GPU paths too: never reported
    own_tgid: int = field(default_factory=os.getpid)

    def __post_init__(self) -> None:
        self.bpf: Any = None  # bcc.BPF once started
        self.hook = ""
        self.transport = ""
        self.nodes: Optional[gpu_nodes.GpuNodeSet] = None
        self._queue: Deque[Event] = collections.deque()
        self._book: dict[AggKey, _Aggregate] = {}
        self._ignored: "collections.OrderedDict[AggKey, None]" = collections.OrderedDict()
        self.resolver: Optional[DeviceResolver] = None
        self.dev_programs = KernelDevicePrograms(self._resend_program)
        self._user_stats = collections.Counter[str]()
        self._clock_offset = time.time() - time.monotonic()
        self._last_sweep = 0.0

    # -- start ---------------------------------------------------------------
    def start(self) -> None:
        preflight.require_bpf_privilege(self.host.proc)
        preflight.require_tracefs(self.config.tracefs)
        choice = kernel_headers.find_headers(cache_dir=self.config.headers_cache)
        if choice.description:
            self.say(choice.description)
        if choice.source:
            os.environ["BCC_KERNEL_SOURCE"] = choice.source
        arch = current_arch()
        with KernelBtf(self.config.btf_path or self.host.btf_vmlinux) as btf:
            flags: dict[str, object] = dict(offset_flags(btf, arch))
            starts = start_flags(btf) if self.config.container_starts else {}
            hooks = self._hook_order(btf, arch.syscall_prefix)
            ringbuf = self.config.transport == "ringbuf" or (
                self.config.transport == "auto" and btf.has_func("bpf_ringbuf_output"))
        flags.update(bpf_constants.cflags())
        flags.update({f"HAVE_SYS_{n.upper()}": 1 for n in ("open", "creat") if n in arch.syscalls})
        if self.config.match_by_device:
            flags["CANDIDATES"] = 1
        flags.update(EVENT_GROUPS_OFFSET=bpf_event.EVENT_GROUPS_OFFSET, AGG_MAX=self.config.aggregate_max,
                     AGG_INTERVAL_NS=f"{int(self.config.aggregate_interval_s * 1e9)}ULL",
                     ERRNO_MASK=f"{sum(1 << e for e in self.config.errnos if 0 < e < 64)}ULL")
        if starts:
            flags.update(starts, CONTAINER_STARTS=1, START_EVENT_SIZE=START_EVENT_SIZE)
            hierarchy = mkdir_hierarchy(self.host.proc)
            if hierarchy is not None:
                flags["START_MKDIR_ROOT"] = hierarchy
        if ringbuf:
            flags.update(USE_RINGBUF=1, RINGBUF_PAGES=self.config.ringbuf_pages)
        self.transport = "ringbuf" if ringbuf else "perf"
        errors = []
        for hook, extra in hooks:
            try:
                self.bpf = self._load({**flags, **extra})
                self.hook = hook
                break
            except Exception as exc:  # BCC raises bare Exception on load/attach failure
                errors.append(f"{hook}: {str(exc).splitlines()[-1] if str(exc) else exc!r}")
        if self.bpf is None:
            raise EnvironmentProblem("could not load the BPF probe (" + "; ".join(errors) + ")")
        if len(errors) and self.hook == "tracepoint":
            self.say(f"fexit unavailable ({errors[0]}); using the syscall exit tracepoints")
        self._configure_maps()
        attach_tail(self.bpf)
        self._open_buffer()
        compiler_memory.release_compiler_memory(self.host.proc)

    def _hook_order(self, btf: KernelBtf, prefix: str) -> list[tuple[str, dict]]:
        tracepoint: tuple[str, dict] = ("tracepoint", {})
        if self.config.hook == "tracepoint":
            return [tracepoint]
        fns = {f"FN_{n.upper()}": prefix + n for n in ("open", "creat", "openat", "openat2", "ioctl")}
        fexit = ("fexit", {"HOOK_FEXIT": 1, **{k: v for k, v in fns.items() if btf.has_func(v)}})
        target = btf.find(prefix + "openat", KIND_FUNC) or 0
        ok, why = preflight.fexit_supported(target)
        if self.config.hook == "fexit":
            if not ok:
                raise EnvironmentProblem(f"--hook fexit requested but {why}")
            return [fexit]
        if not ok:
            self.say(f"{why}; using the syscall exit tracepoints")
            return [tracepoint]
        return [fexit, tracepoint]

    def _load(self, flags: dict) -> Any:
        return compile_program(bpf_program_text("CONTAINER_STARTS" in flags), flags)

    def _configure_maps(self) -> None:
        self.nodes = gpu_nodes.discover(self.host.proc, self.host.dev, self.config.extra_prefixes,
                                        self.config.extra_devs)
        table = self.bpf[b"prefixes"]
        if len(self.nodes.prefixes) > MAX_PREFIXES:
            raise EnvironmentProblem(f"at most {MAX_PREFIXES} path prefixes are supported")
        for prefix in self.nodes.prefixes:
            raw = prefix.encode()
            if not raw or len(raw) > PREFIX_CAP:
                raise EnvironmentProblem(f"path prefix must be 1 to {PREFIX_CAP} bytes: {prefix}")
            key = table.Key()
            key.prefixlen = len(raw) * 8
            key.data = raw
            table[key] = ctypes.c_uint8(1)
        devs = self.bpf[b"gpu_devs"]
        for key in self.nodes.kernel_dev_keys():
            devs[ctypes.c_uint32(key)] = ctypes.c_uint8(1)
        self.resolver = DeviceResolver(self.nodes, self.host.proc, ttl_s=self.config.not_gpu_ttl_s,
                                       snapshots=self.snapshots,
                                       host_root=os.path.dirname(self.host.dev.rstrip("/")) or "/")

    def _open_buffer(self) -> None:
        if self.transport == "ringbuf":
            self.bpf[b"events"].open_ring_buffer(self._on_record)
        else:
            self.bpf[b"events"].open_perf_buffer(self._on_perf_record, page_cnt=64,
                                                lost_cb=self._on_perf_lost)

    # -- records -------------------------------------------------------------
    def _on_record(self, _ctx: object, data: int, size: int) -> int:
        self._ingest(ctypes.string_at(data, size))
        return 0

    def _on_perf_record(self, _cpu: int, data: int, size: int) -> None:
        self._ingest(ctypes.string_at(data, size))

    def _on_perf_lost(self, lost: int) -> None:
        self._user_stats["dropped_perf_lost"] += lost

    def _ingest(self, raw: bytes) -> None:
        if is_start_record(raw):
            self._container_start(raw)
            return
        try:
            decoded = bpf_event.decode(raw, self._clock_offset)
        except DecodeError as exc:
            self._user_stats[f"decode_error_{exc.reason}"] += 1
            return
        if isinstance(decoded, Update):
            self._count(decoded.key, decoded.count)
            return
        if isinstance(decoded, DevProgRecord):
            self.dev_programs.add(decoded)
            return
        self.dev_programs.annotate(decoded)
        key, record = decoded.key, decoded.event
        if key.tgid == self.own_tgid:
            self._user_stats["own_lookups"] += 1
            return
        known = self._book.get(key)
        if key.candidate and (known is None or known.first is None) \
                and not self._keep_candidate(key, record):
            return  # not a GPU node (also when its counts arrived before it)
        agg = known
        if agg is not None and agg.first is not None:
            if record.facts.get("sensor.unaggregated"):
                # the kernel table was full: each repeat arrives alone, count 1
                self._count(key, agg.reported + record.count)
            else:
                self._count(key, record.count)  # a resend after a refused buffer
            return
        pending = agg.pending if agg else 0
        self._book[key] = _Aggregate(first=record, reported=record.count)
        while len(self._book) > self.config.book_max:  # oldest aggregates first
            self._user_stats["aggregates_forgotten"] += 1
            del self._book[next(iter(self._book))]
        self._queue.append(record)
        if pending > record.count:
            self._count(key, pending)

    def _container_start(self, raw: bytes) -> None:
        try:
            start = decode_start(raw, self._clock_offset)
        except DecodeError as exc:
            self._user_stats[f"decode_error_{exc.reason}"] += 1
            return
        self._user_stats[f"container_starts_{start.how}"] += 1
        if self.on_container_start is not None:
            self.on_container_start(start)

    def _keep_candidate(self, key: AggKey, record: Event) -> bool:
        """Is this refused open outside the GPU prefixes a GPU node after all?  Asked
        again whenever the kernel sends the path in full (its "not a GPU node" expired)."""
        assert self.resolver is not None
        found = self.resolver.resolve(record.process.pid, record.process.mntns,
                                      record.node.path or b"", record.process, record.time)
        via = "_via_snapshot" if found.via is not None else ""
        if found.outcome == "gpu":
            self._ignored.pop(key, None)
            record.node.major, record.node.minor = found.major, found.minor
            if found.via is None:
                record.facts.put("sensor.matched_by_device", True, SENSOR,
                                 "path outside the GPU prefixes; fstat in the process's root")
            else:  # the process and its container were gone: the snapshot's OCI config
                cited = (f"path outside the GPU prefixes; no live process in its mount "
                         f"namespace; {found.via['how']} in the OCI config of container "
                         f"{found.via['name'] or found.via['container']} "
                         f"(snapshot {found.via['snapshot_time']}, {found.via['config']})")
                record.facts.put("sensor.matched_by_device", True, CACHED, cited)
                record.facts.put("sensor.node_identity", dict(found.via), CACHED, cited)
            self._user_stats[f"candidates_gpu{via}"] += 1
            return True
        self._user_stats[f"candidates_{found.outcome}{via}"] += 1
        self._ignored[key] = None
        while len(self._ignored) > self.config.book_max:
            self._ignored.popitem(last=False)
        if found.outcome == "not_gpu":  # the kernel stops sending this path for this namespace
            table = self.bpf[b"not_gpu"]
            nk = table.Key()
            nk.mntns, nk.hash = record.process.mntns, key.target & HASH_MASK
            table[nk] = ctypes.c_uint64(time.monotonic_ns() + int(self.config.not_gpu_ttl_s * 1e9))
            self._forget_kernel_aggregate(key)
        return False

    def _forget_kernel_aggregate(self, key: AggKey) -> None:
        table = self.bpf[b"agg"]
        k = table.Key()
        k.tgid, k.sys, k.err, k.target = key.tgid, key.sys, key.err, key.target
        try:
            del table[k]
        except KeyError:
            pass

    def _resend_program(self, prog_id: int) -> None:
        """A named program whose instructions never arrived: the kernel sends them again."""
        try:
            del self.bpf[b"dev_progs_sent"][ctypes.c_uint32(prog_id)]
        except (KeyError, TypeError):  # gone already, no such map, or not started
            pass

    def _count(self, key: AggKey, count: int) -> None:
        if key in self._ignored or key.tgid == self.own_tgid:
            return
        agg = self._book.get(key)
        if agg is None or agg.first is None:
            self._book[key] = _Aggregate(first=None, reported=0, pending=max(count, agg.pending if agg else 0))
            return
        if count > agg.reported:
            agg.reported = count
            self._queue.append(replace(agg.first, kind="update", count=count,
                                       time=time.time(), facts=Facts(), verdict=None))

    # -- sweeping the aggregation table -----------------------------------------
    def sweep(self, final: bool = False) -> None:
        """Report counts that changed since the last update; forget exited processes."""
        table = self.bpf[b"agg"]
        in_table = set()
        living: dict[int, bool] = {}  # one /proc look-up per process per sweep
        consumed = False

        def is_alive(tgid: int) -> bool:
            if tgid not in living:
                living[tgid] = os.path.exists(self.host.proc_pid(tgid))
            return living[tgid]

        for k, v in list(table.items()):
            key = AggKey(k.tgid, k.sys, k.err, k.target)
            in_table.add(key)
            alive = is_alive(k.tgid)
            if key.candidate and (key in self._ignored or key not in self._book
                                  or self._book[key].first is None):
                # a refused open we never matched to a GPU node: nothing to report
                if key not in self._ignored and (final or not alive):
                    self._user_stats["candidates_first_event_lost"] += 1
                if not alive:
                    self._forget_kernel_aggregate(key)
                    self._ignored.pop(key, None)
                    self._book.pop(key, None)
                continue
            self._count(key, v.count)
            if final or not alive:
                agg = self._book.get(key)
                if agg is not None and agg.first is None and not consumed:
                    # the process exited after the buffer was last read: its first record
                    # may be waiting there still (the kernel counted, then sent it)
                    self._consume_now()
                    consumed = True
                    agg = self._book.get(key)
                if agg is not None and agg.first is None:
                    self._orphan(key, agg.pending or v.count)
                if not alive:
                    try:
                        del table[k]
                    except KeyError:
                        pass
                    self._book.pop(key, None)
        # aggregates the kernel never held (its table was full): forget exited processes
        for key in [k for k in self._book if k not in in_table]:
            if not is_alive(key.tgid):
                del self._book[key]
        self._last_sweep = time.monotonic()

    def _orphan(self, key: AggKey, count: int) -> None:
        """Counts whose first event the buffer refused and never got resent."""
        self._user_stats["first_event_lost"] += 1
        event = Event(time=time.time(), sensor="bpf", syscall=SYSCALL_NAMES.get(key.sys, "?"),
                      errno=key.err, process=Process(pid=key.tgid, tid=key.tgid), node=Node(),
                      count=count, key=key.label(),
                      missing=["process.credentials", "node.path"])
        event.facts.put("sensor.first_event_lost", True, SENSOR,
                        "count arrived without its first event (kernel buffer full)")
        self._book[key] = _Aggregate(first=event, reported=count)
        self._queue.append(event)

    # -- consuming -----------------------------------------------------------
    def poll(self, timeout_ms: int = 100) -> list[Event]:
        if self.transport == "ringbuf":
            self.bpf.ring_buffer_poll(timeout_ms)
        else:
            self.bpf.perf_buffer_poll(timeout_ms)
        if time.monotonic() - self._last_sweep >= self.config.sweep_interval_s:
            self.sweep()
        out = list(self._queue)
        self._queue.clear()
        return out

    def events(self, stop: threading.Event) -> Iterator[Event]:
        while not stop.is_set():
            yield from self.poll(100)
        yield from self.drain()

    def _consume_now(self) -> None:
        """Hand every record already in the kernel's buffer to _ingest, without waiting."""
        if self.transport == "ringbuf":
            self.bpf.ring_buffer_consume()
        else:
            self.bpf.perf_buffer_poll(0)

    def drain(self) -> list[Event]:
        """Everything still buffered, with final exact counts."""
        self._consume_now()
        self.sweep(final=True)
        out = list(self._queue)
        self._queue.clear()
        return out

    def stats(self) -> dict[str, int]:
        out = {name: 0 for name in STAT_NAMES}
        if self.bpf is not None:
            table = self.bpf[b"stats"]
            for i, name in enumerate(STAT_NAMES):
                out[name] = int(sum(table[ctypes.c_int(i)]))
        out.update(self._user_stats)
        out.update(self.dev_programs.counts)
        if self.resolver is not None:
            out["candidate_cache_entries"] = len(self.resolver)
        return out

    def close(self) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
