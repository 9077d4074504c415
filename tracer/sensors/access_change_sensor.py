"""The access-change sensor: loads bpf/access_changes.bpf.c and hands each record
(a cgroup device program attached, replaced or detached; a process's groups
changed) to a callback, on its own thread.

It is a side probe, not the denial path: it never produces denial events, its
records become facts about a container's life (tracer/enrichment/access_history.py).
Only bpf() and the set*gid calls reach it; both are rare.
"""

from __future__ import annotations

import collections
import ctypes
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from tracer.errors import EnvironmentProblem
from tracer.host import HostPaths
from tracer.sensors import bpf_constants, compiler_memory, kernel_headers, preflight
from tracer.sensors.access_change_records import (CHG_EVENT_SIZE, ChangeDecodeError,
                                                  ChangeRecord, decode_change)
from tracer.sensors.bpf_constants import CHG_STAT_NAMES
from tracer.sensors.bpf_layout import DEV_PROG_OFFSETS, OFFSETS
from tracer.sensors.bpf_sensor import bpf_source_dir, compile_program
from tracer.sensors.btf import KernelBtf

# macro -> BTF member path: what the change probes read (a subset of the denial
# probe's table, plus the BPF program behind an fd and the target cgroup's inode)
SHARED_OFFSETS = ("OFF_TASK_REAL_PARENT", "OFF_TASK_TGID", "OFF_TASK_CRED", "OFF_TASK_GROUP_LEADER",
                  "OFF_TASK_NSPROXY", "OFF_TASK_THREAD_PID", "OFF_TASK_FILES", "OFF_CRED_GID",
                  "OFF_CRED_EGID", "OFF_CRED_FSGID", "OFF_CRED_GROUP_INFO", "OFF_GI_NGROUPS",
                  "OFF_GI_GID", "OFF_NSPROXY_MNT", "OFF_MNTNS_INUM", "OFF_PIDNS_INUM",
                  "OFF_PID_LEVEL", "OFF_PID_NUMBERS", "OFF_UPID_NS", "OFF_FILES_FDT",
                  "OFF_FDT_MAX_FDS", "OFF_FDT_FD", "OFF_FILE_INODE")
CHANGE_OFFSETS = {
    "OFF_TASK_COMM": "task_struct.comm",
    "OFF_FILE_PRIVATE_DATA": "file.private_data",
    "OFF_INODE_INO": "inode.i_ino",
    "OFF_PROG_TYPE": "bpf_prog.type",
    "OFF_PROG_AUX": "bpf_prog.aux",
    "OFF_PROG_AUX_ID": "bpf_prog_aux.id",
}
# ...and, to read the target cgroup's effective device programs and their instructions
# (HAVE_DEV_PROGS, as the denial probe reads a task's): a cgroup directory's file ->
# inode -> kernfs_node -> struct cgroup, then the denial probe's program offsets
TARGET_CGROUP_OFFSETS = {
    "OFF_INODE_I_PRIVATE": "inode.i_private",
    "OFF_KERNFS_PRIV": "kernfs_node.priv",
}


def change_offset_flags(btf: KernelBtf) -> dict[str, int]:
    """The offsets the change probes need, from this kernel's BTF; with HAVE_DEV_PROGS
    when it has every member that reading a cgroup's device programs takes."""
    try:
        flags = {macro: btf.member(OFFSETS[macro]).offset for macro in SHARED_OFFSETS}
        flags.update({macro: btf.member(path).offset for macro, path in CHANGE_OFFSETS.items()})
        flags["SIZEOF_UPID"] = btf.size_of("upid")
    except KeyError as exc:
        raise EnvironmentProblem(f"kernel BTF lacks a struct member the change probes need: "
                                 f"{exc.args[0]}") from exc
    slot = btf.enum_value("cgroup_bpf_attach_type", "CGROUP_DEVICE")
    try:
        programs = {macro: btf.member(path).offset for macro, path in
                    {**DEV_PROG_OFFSETS, **TARGET_CGROUP_OFFSETS}.items()}
        programs["SIZEOF_PROG_ARRAY_ITEM"] = btf.size_of("bpf_prog_array_item")
    except KeyError:
        return flags  # calls are still recorded; the history asks bpf() for the programs
    if slot is not None:
        flags.update(programs, CGROUP_DEVICE_SLOT=slot, HAVE_DEV_PROGS=1)
    return flags


@dataclass
class ChangeProbeConfig:
    device_programs: bool = True   # bpf() attach/detach of cgroup device programs
    group_changes: bool = True     # setgroups/setgid/setregid/setresgid
    headers_cache: str = "/var/cache/gputrace"
    btf_path: Optional[str] = None
    poll_ms: int = 100


class AccessChangeSensor:
    """Start, then records arrive at `on_record` on the sensor's thread until close()."""

    def __init__(self, on_record: Callable[[ChangeRecord], None],
                 config: Optional[ChangeProbeConfig] = None, host: Optional[HostPaths] = None,
                 say: Callable[[str], None] = lambda m: print(f"gputrace: {m}", file=sys.stderr)
                 ) -> None:
        self.on_record = on_record
        self.config = config or ChangeProbeConfig()
        self.host = host or HostPaths()
        self.say = say
        self.bpf: Any = None
        self.transport = ""
        self._stats: collections.Counter[str] = collections.Counter()
        self._clock_offset = time.time() - time.monotonic()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "AccessChangeSensor":
        preflight.require_bpf_privilege(self.host.proc)
        if not (self.config.device_programs or self.config.group_changes):
            raise ValueError("the change sensor needs at least one of its probes")
        choice = kernel_headers.find_headers(cache_dir=self.config.headers_cache)
        if choice.source:
            os.environ["BCC_KERNEL_SOURCE"] = choice.source
        with KernelBtf(self.config.btf_path or self.host.btf_vmlinux) as btf:
            flags: dict[str, object] = dict(change_offset_flags(btf))
            ringbuf = btf.has_func("bpf_ringbuf_output")
        flags.update(bpf_constants.change_cflags())
        flags["CHG_EVENT_SIZE"] = CHG_EVENT_SIZE
        if self.config.device_programs:
            flags["WATCH_DEVICE_PROGRAMS"] = 1
        if self.config.group_changes:
            flags["WATCH_GROUP_CHANGES"] = 1
        if ringbuf:
            flags["USE_RINGBUF"] = 1
        try:
            with open(os.path.join(bpf_source_dir(), "access_changes.bpf.c"), "rb") as source:
                self.bpf = compile_program(source.read(), flags)
        except Exception as exc:  # BCC raises bare Exception on load/attach failure
            last = str(exc).splitlines()[-1] if str(exc) else repr(exc)
            raise EnvironmentProblem(f"could not load the access-change probes ({last})") from exc
        self.transport = "ringbuf" if ringbuf else "perf"
        compiler_memory.release_compiler_memory(self.host.proc)  # as the BPF sensor does
        if ringbuf:
            self.bpf[b"changes"].open_ring_buffer(self._on_ring)
        else:
            self.bpf[b"changes"].open_perf_buffer(self._on_perf, page_cnt=16,  # a 32 KiB record fits
                                                 lost_cb=self._on_lost)
        self._thread = threading.Thread(target=self._run, name="access-changes", daemon=True)
        self._thread.start()
        return self

    def _on_ring(self, _ctx: object, data: int, size: int) -> int:
        self._ingest(ctypes.string_at(data, size))
        return 0

    def _on_perf(self, _cpu: int, data: int, size: int) -> None:
        self._ingest(ctypes.string_at(data, size))

    def _on_lost(self, lost: int) -> None:
        self._stats["perf_lost"] += lost

    def _ingest(self, raw: bytes) -> None:
        try:
            record = decode_change(raw, self._clock_offset)
        except ChangeDecodeError as exc:
            self._stats[f"decode_error_{exc.reason}"] += 1
            return
        self._stats["records"] += 1
        try:
            self.on_record(record)
        except Exception:  # a consumer's bug must not end the probe: counted
            self._stats["consumer_errors"] += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.transport == "ringbuf":
                self.bpf.ring_buffer_poll(self.config.poll_ms)
            else:
                self.bpf.perf_buffer_poll(self.config.poll_ms)

    def forget_program(self, prog_id: int) -> None:
        """Have the kernel send this program's instructions again (the reader lost them)."""
        if self.bpf is None:
            return
        try:
            del self.bpf[b"chg_progs_sent"][ctypes.c_uint32(prog_id)]
        except KeyError:  # not sent, or no program reading (HAVE_DEV_PROGS off)
            pass

    def stats(self) -> dict[str, int]:
        out = dict(self._stats)
        if self.bpf is not None:
            table = self.bpf[b"chg_stats"]
            for i, name in enumerate(CHG_STAT_NAMES):
                out[f"kernel_{name}"] = int(sum(table[ctypes.c_int(i)]))
        return out

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
