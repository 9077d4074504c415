"""cgroup v2 device programs as the BPF probe read them at the denial.

The unit cannot ask bpf() for a cgroup's device programs: BPF_PROG_QUERY needs
CAP_NET_ADMIN or CAP_SYS_ADMIN, BPF_PROG_GET_FD_BY_ID needs CAP_SYS_ADMIN
(systemd/gputrace.service says why neither is granted).  The probe already reads
kernel memory (CAP_PERFMON): at each first denial it names the refused task's
effective device programs (task->cgroups->dfl_cgrp->bpf.effective[CGROUP_DEVICE])
and sends each program's instructions once (`struct dev_prog_record`).  This
module keeps those, bounded, and turns a denial's program ids into the facts the
verdict reads (`device_cgroup.v2_programs`, or `device_cgroup.v2_unreadable`
saying what is missing).  It is exact for a `--rm` container whose cgroup is
gone before the event is explained, and runs as the unit runs.
"""

from __future__ import annotations

import collections
import ctypes
from typing import Callable, Optional

from tracer.device_programs import DeviceProgram
from tracer.facts import SENSOR
from tracer.sensors.bpf_constants import DEV_PROGS_SENT_MAX, MAX_DEV_PROGS, MAX_PROG_INSNS
from tracer.sensors.bpf_event import Denial, DevProgRecord

BPF_PROG_TYPE_CGROUP_DEVICE = 15
ORIGIN = ("the refused task's cgroup v2 (task->cgroups->dfl_cgrp->bpf.effective), read by "
          "the BPF probe at the denial")


def attach_tail(bpf: object) -> bool:
    """Put gt_dev_progs_tail in the probe's `denial_tail` array (tracepoint hooks):
    the denial path reaches it by tail call.  False when the probe has none (fexit
    hooks read the programs inline; a kernel without the BTF members reads none)."""
    from bcc import BPF  # only the BPF sensor needs BCC

    try:
        table = bpf[b"denial_tail"]  # type: ignore[index]
    except KeyError:
        return False
    fn = bpf.load_func(b"gt_dev_progs_tail", BPF.TRACEPOINT)  # type: ignore[attr-defined]
    table[ctypes.c_int(0)] = ctypes.c_int(fn.fd)
    return True


class KernelDevicePrograms:
    """Program id -> instructions, as the probe sent them (LRU, at least as large as
    the kernel's map of ids it has sent, so a sent program is still here when a
    denial names it).  `forget` is told which ids the kernel must send again."""

    def __init__(self, forget: Callable[[int], None] = lambda _id: None,
                 capacity: int = 2 * DEV_PROGS_SENT_MAX) -> None:
        self._programs: "collections.OrderedDict[int, DevProgRecord]" = collections.OrderedDict()
        self.capacity = capacity
        self.forget = forget
        self.counts: "collections.Counter[str]" = collections.Counter()

    def __len__(self) -> int:
        return len(self._programs)

    def add(self, record: DevProgRecord) -> None:
        self._programs[record.id] = record
        self._programs.move_to_end(record.id)
        while len(self._programs) > self.capacity:
            self._programs.popitem(last=False)

    def program(self, prog_id: int) -> Optional[DeviceProgram]:
        """The program as the probe sent it; None when its instructions did not arrive
        (a truncated program or another type comes without instructions: undecided)."""
        return self._program(prog_id)

    def _program(self, prog_id: int) -> Optional[DeviceProgram]:
        record = self._programs.get(prog_id)
        if record is None:
            return None
        self._programs.move_to_end(prog_id)
        usable = record.type == BPF_PROG_TYPE_CGROUP_DEVICE and not record.truncated
        # a truncated program is named and left undecided (no instructions), never guessed
        return DeviceProgram(record.id, record.name, record.tag, record.insns if usable else b"")

    def annotate(self, denial: Denial) -> None:
        """Put the denial's device-program facts on its event (nothing when the probe
        did not read them: enrichment then asks bpf() itself)."""
        ids, facts = denial.dev_prog_ids, denial.event.facts
        if ids is None:
            return
        if denial.dev_progs_over:
            self.counts["dev_progs_over_limit"] += 1
            facts.put("device_cgroup.v2_unreadable",
                      f"more than {MAX_DEV_PROGS} effective device programs", SENSOR, ORIGIN)
            return
        programs = [self._program(prog_id) for prog_id in ids]
        lost = [prog_id for prog_id, found in zip(ids, programs) if found is None]
        if lost:
            self.counts["dev_progs_not_received"] += 1
            for prog_id in lost:
                self.forget(prog_id)  # the next denial naming it brings its instructions
            facts.put("device_cgroup.v2_unreadable",
                      f"the instructions of device program id {', '.join(map(str, lost))} did "
                      "not arrive from the probe (its buffer was full)", SENSOR, ORIGIN)
            return
        records = [self._programs[prog_id] for prog_id in ids]
        notes = [f"program id {r.id} is longer than {MAX_PROG_INSNS} instructions" if r.truncated
                 else f"program id {r.id} has type {r.type}, not a device program"
                 for r in records if r.truncated or r.type != BPF_PROG_TYPE_CGROUP_DEVICE]
        facts.put("device_cgroup.v2_programs", [p.to_json() for p in programs if p is not None],
                  SENSOR, ORIGIN + (f" ({'; '.join(notes)})" if notes else ""))
