"""Access over a container's life: its device rules at start and every change
since, and the calls that changed a process's groups.

Three writers, one store:

* the container tracker gives each container's rules at start (`start_state`);
* the v1 rule watcher (device_rule_watch.py) re-reads `devices.list` after a
  write to `devices.allow`/`devices.deny` (`observe`; the kernel does not say
  who wrote);
* the access-change probe (sensors/access_change_sensor.py) reports every
  bpf() call that attached, replaced or detached a cgroup device program, with
  its caller, and every set*gid call with the groups before and after
  (`on_record`).

A v2 state comes from the kernel where it can: the probe reads the target
cgroup's effective device programs just before and just after the call
(cgroup->bpf.effective) and sends each program's instructions once, so the
systemd unit, which may not ask bpf() for them (BPF_PROG_QUERY needs
CAP_NET_ADMIN, BPF_PROG_GET_FD_BY_ID CAP_SYS_ADMIN), still knows every state a
recorded call left.  A state is known only when every program in it arrived
with its instructions; otherwise bpf() is asked (root), and when that is refused
too the state is unknown, saying why: never a guess.  What this assumes:

* the probe recorded every call since the state it builds on (records it could
  not hand over are counted in its `dropped` stat); a program attached with a
  bpf link and released by closing the link is not a bpf() call it sees;
* cgroups *below* a call's target (a container under a slice whose programs
  changed) are re-read with bpf() only: the kernel reading is the target's;
* a container's start state under the unit (bpf() refused at the snapshot) is
  the state the last call recorded on its cgroup before the snapshot left (the
  runtime's own attach at create, and a prestart hook's), when the daemon saw
  it; otherwise unknown, as before.

Bounded in keys, changes per key and group calls; what it forgets is counted.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Optional

from tracer.enrichment.device_cgroup_v2 import open_v2_cgroup, read_device_programs
from tracer.sensors.access_change_records import ChangeRecord, DeviceProgramCall, GroupCall
from tracer.sensors.bpf_event import DevProgRecord
from tracer.sensors.kernel_device_programs import KernelDevicePrograms

MAX_KEYS = 1024          # cgroups followed
MAX_CHANGES_PER_KEY = 16
MAX_GROUP_CALLS = 4096
MAX_PROGRAM_JSON = 64 << 10   # a program larger than this is kept by id, name and tag only

V1, V2 = "device_cgroup_v1", "device_cgroup_v2"
KERNEL = "read in the kernel at the bpf() call (cgroup->bpf.effective)"
BPF_QUERY = "bpf(BPF_PROG_QUERY) after the call"
Key = tuple[str, str]   # ("v1", cgroup path) or ("v2", cgroup id as text)


def v1_key(cgroup_path: str) -> Key:
    return ("v1", cgroup_path)


def v2_key(cgroup_id: int) -> Key:
    return ("v2", str(cgroup_id))


@dataclass(frozen=True)
class RuleState:
    """A cgroup's device rules at one moment: the v1 allowlist lines, or the v2
    effective programs as JSON (id, name, tag, instructions); None: unreadable.
    `origin` says how a v2 state was read when it matters (the kernel, bpf())."""

    time: float
    layer: str
    cgroup: str
    rules: Optional[tuple[Any, ...]]
    why_unknown: str = ""
    origin: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"time": self.time, "layer": self.layer, "cgroup": self.cgroup,
                               "rules": None if self.rules is None else list(self.rules)}
        if self.why_unknown:
            out["why_unknown"] = self.why_unknown
        if self.origin:
            out["origin"] = self.origin
        return out


@dataclass(frozen=True)
class RuleChange:
    """One change of a cgroup's device rules, with both sides and, where the kernel
    shows it, who made it."""

    before: RuleState
    after: RuleState
    how: str
    by: Optional[dict[str, Any]] = None   # the caller the kernel recorded; None: not shown

    def to_json(self) -> dict[str, Any]:
        out = {"time": self.after.time, "layer": self.after.layer, "cgroup": self.after.cgroup,
               "before": self.before.to_json()["rules"], "after": self.after.to_json()["rules"],
               "after_unknown": self.after.why_unknown or None, "how": self.how, "by": self.by}
        if self.after.origin:
            out["origin"] = self.after.origin
        return out


def _as_left(state: RuleState) -> str:
    return ("left by the last bpf() call recorded before the snapshot, read in the kernel "
            "at that call (cgroup->bpf.effective)")


def program_json(programs: Iterable[Any]) -> tuple[dict[str, Any], ...]:
    out = []
    for program in programs:
        data = program.to_json()
        if len(data["insns_b64"]) > MAX_PROGRAM_JSON:
            data["insns_b64"] = ""   # named, left undecided
        out.append(data)
    return tuple(out)


class AccessHistory:
    """Thread-safe; every reader gets copies."""

    def __init__(self, v2_mount: Optional[Callable[[], Optional[str]]] = None) -> None:
        self._v2_mount = v2_mount or (lambda: None)
        self._last: "OrderedDict[Key, RuleState]" = OrderedDict()
        self._start: dict[Key, RuleState] = {}
        self._start_seen: dict[Key, float] = {}  # when the start state was given (epoch)
        self._changes: dict[Key, deque[RuleChange]] = {}
        self._v2_paths: dict[int, str] = {}     # followed v2 cgroups: id -> path under the mount
        self._groups: deque[GroupCall] = deque(maxlen=MAX_GROUP_CALLS)
        self.programs = KernelDevicePrograms()  # instructions the change probe sent, by id
        self._lock = threading.Lock()
        self.counters: Counter[str] = Counter()

    # -- writers -------------------------------------------------------------------
    def start_state(self, key: Key, state: RuleState) -> None:
        """The rules when the container started (the tracker's snapshot).  A v2 state
        the snapshot could not read is the one the last recorded call left, when the
        kernel showed it (no call since: it still holds)."""
        with self._lock:
            last = self._last.get(key)
            if state.rules is None and last is not None and last.rules is not None \
                    and last.origin == KERNEL:
                state = replace(state, rules=last.rules, why_unknown="", origin=_as_left(last))
            self._start[key] = state
            self._start_seen[key] = time.time()
            self._last[key] = state
            self._touch(key)

    def observe(self, key: Key, state: RuleState, how: str,
                by: Optional[dict[str, Any]] = None, always: bool = False,
                before: Optional[RuleState] = None) -> Optional[RuleChange]:
        """The rules now; a change is kept when they differ from the last known ones
        (or, `always`, when a recorded call changed them even if unreadable).
        `before`, when the kernel showed it, is the change's side before the call."""
        with self._lock:
            last = self._last.get(key)
            self._last[key] = state
            self._touch(key)
            if last is None and not always:
                self._start.setdefault(key, state)
                return None
            if before is not None and before.rules is not None:
                last = before
            if last is None:  # a recorded call on a cgroup not followed until now
                last = RuleState(state.time, state.layer, state.cgroup, None,
                                 "not followed before this call")
            if last.rules == state.rules and not (always and state.rules is None):
                return None
            change = RuleChange(last, state, how, by)
            self._changes.setdefault(key, deque(maxlen=MAX_CHANGES_PER_KEY)).append(change)
            self.counters["rule_changes"] += 1
            return change

    def follow_v2(self, cgroup_id: int, path: str) -> None:
        """A container's own v2 cgroup: re-read when a program changes on it or above it."""
        with self._lock:
            self._v2_paths[cgroup_id] = path
            while len(self._v2_paths) > MAX_KEYS:
                self._v2_paths.pop(next(iter(self._v2_paths)))

    def forget(self, key: Key) -> None:
        with self._lock:
            self._drop(key)

    def on_record(self, record: ChangeRecord) -> None:
        """The access-change probe's callback."""
        if isinstance(record, DevProgRecord):
            with self._lock:
                self.programs.add(record)
            return
        if isinstance(record, GroupCall):
            with self._lock:
                if len(self._groups) == self._groups.maxlen:
                    self.counters["group_calls_forgotten"] += 1
                self._groups.append(record)
            return
        self._program_call(record)

    def _program_call(self, call: DeviceProgramCall) -> None:
        if call.ret < 0:
            self.counters["program_calls_failed"] += 1
            return
        mount = self._v2_mount()
        targets = {call.target_cgroup: ""}
        target_path = self._path_of(mount, call.target_cgroup)
        with self._lock:
            followed = dict(self._v2_paths)
        if target_path is not None:
            targets[call.target_cgroup] = target_path
            prefix = target_path.rstrip("/") + "/"
            targets.update({cid: path for cid, path in followed.items()
                            if path.startswith(prefix) or target_path == "/"})
        for cgroup_id, path in targets.items():
            label = path or followed.get(cgroup_id, "")
            before = None
            if cgroup_id == call.target_cgroup:
                before = self._kernel_state(call.before_ids, call.time, label or cgroup_id)
                state = self._kernel_state(call.after_ids, call.time, label or cgroup_id)
                if state is None or state.rules is None:
                    state = self._read_v2(mount, cgroup_id, label, call.time, state)
                if self._before_start(v2_key(cgroup_id), call.time, state):
                    continue
            else:
                state = self._read_v2(mount, cgroup_id, label, call.time)
            where = "" if cgroup_id == call.target_cgroup else \
                f" on {target_path}, which this cgroup inherits from"
            self.observe(v2_key(cgroup_id), state, call.how() + where, call.caller.to_json(),
                         always=True, before=before)
        self.counters["program_calls"] += 1

    def _kernel_state(self, ids: Optional[tuple[int, ...]], when: float,
                      label: Any) -> Optional[RuleState]:
        """The state the kernel showed at a call (None: it did not read one); unknown
        when a program's instructions did not arrive from the probe."""
        if ids is None:
            return None
        where = label if isinstance(label, str) else f"cgroup id {label}"
        with self._lock:
            programs = [self.programs.program(prog_id) for prog_id in ids]
        lost = [prog_id for prog_id, found in zip(ids, programs) if found is None]
        if lost:
            self.counters["program_instructions_missing"] += 1
            for prog_id in lost:
                self.programs.forget(prog_id)  # the next call naming it sends it again
            return RuleState(when, V2, where, None, "the instructions of program id "
                             f"{', '.join(map(str, lost))} did not arrive from the probe", KERNEL)
        return RuleState(when, V2, where, program_json(p for p in programs if p is not None),
                         origin=KERNEL)

    def _before_start(self, key: Key, when: float, state: RuleState) -> bool:
        """A call the kernel showed, made before a start state that could not be read
        was given (the probe's records arrive after the snapshot): the state it left
        is the start state.  True when taken as such."""
        with self._lock:
            start, seen = self._start.get(key), self._start_seen.get(key)
            if start is None or seen is None or start.rules is not None or when > seen \
                    or state.rules is None or state.origin != KERNEL or self._changes.get(key):
                return False
            start = replace(start, rules=state.rules, why_unknown="", origin=_as_left(state))
            self._start[key] = start
            self._last[key] = start
            return True

    @staticmethod
    def _path_of(mount: Optional[str], cgroup_id: int) -> Optional[str]:
        if mount is None:
            return None
        try:
            fd, where = open_v2_cgroup(mount, cgroup_id, None)
        except OSError:
            return None
        os.close(fd)
        return "/" + where[len(mount):].strip("/") if where.startswith(mount) else None

    @staticmethod
    def _read_v2(mount: Optional[str], cgroup_id: int, path: str, when: float,
                 kernel: Optional[RuleState] = None) -> RuleState:
        """The cgroup's programs by bpf() (root only); `kernel`, an incomplete kernel
        reading, adds why that did not suffice."""
        label = path or f"cgroup id {cgroup_id}"
        also = f"; {kernel.why_unknown}" if kernel is not None and kernel.why_unknown else ""
        if mount is None:
            return RuleState(when, V2, label, None, "no cgroup2 mount" + also)
        try:
            fd, _ = open_v2_cgroup(mount, cgroup_id, None)
        except OSError as exc:
            return RuleState(when, V2, label, None,
                             f"cannot open the cgroup: {exc.strerror or exc}{also}")
        try:
            found = read_device_programs(fd, label)
        except OSError as exc:
            return RuleState(when, V2, label, None,
                             f"cannot read its programs: {exc.strerror or exc}{also}")
        finally:
            os.close(fd)
        return RuleState(when, V2, label, program_json(found.programs), origin=BPF_QUERY)

    def _touch(self, key: Key) -> None:
        self._last.move_to_end(key)
        while len(self._last) > MAX_KEYS:
            self._drop(next(iter(self._last)))
            self.counters["keys_forgotten"] += 1

    def _drop(self, key: Key) -> None:
        self._last.pop(key, None)
        self._start.pop(key, None)
        self._start_seen.pop(key, None)
        self._changes.pop(key, None)

    # -- readers -------------------------------------------------------------------
    def at_start(self, key: Key) -> Optional[RuleState]:
        with self._lock:
            return self._start.get(key)

    def changes(self, key: Key, until: Optional[float] = None) -> list[RuleChange]:
        with self._lock:
            found = list(self._changes.get(key, ()))
        return [c for c in found if until is None or c.after.time <= until]

    def group_calls(self, wanted: Callable[[GroupCall], bool]) -> list[GroupCall]:
        with self._lock:
            return [call for call in self._groups if wanted(call)]
