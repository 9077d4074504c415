"""Our own logic of issue 17 on fixtures: the change records' decoder, the device
rule story (never granted / granted outside the config / config not kept), the
group stories, the history's bookkeeping, and hostile recorded facts.  The real
kernel cases are in test_access_over_time.py and test_revoked_under_systemd.py."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.example_counts import fuzz, ran
from tests.support.device_program_hook import allow_first
from tracer.enrichment.access_history import (KERNEL, V1, V2, AccessHistory, RuleState, v1_key,
                                              v2_key)
from tracer.enrichment.device_program import Insn, encode
from tracer.event import Event, Node, Process
from tracer.facts import CACHED, Facts
from tracer.sensors.access_change_records import (CHG_EVENT_SIZE, ChangeDecodeError,
                                                  DeviceProgramCall, GroupCall, _LAYOUT,
                                                  decode_change)
from tracer.sensors.bpf_constants import CHG_MAX_GROUPS, MAX_DEV_PROGS
from tracer.sensors.bpf_event import DEV_PROG, DevProgRecord
from tracer.verdict import reasons as R
from tracer.verdict.device_rule_story import device_rule_story
from tracer.verdict.explain import explain_facts
from tracer.verdict.group_story import group_drop_story, session_story

RUNC_DEFAULT = ["c 1:3 rwm", "c 1:5 rwm", "c 136:* rwm", "c *:* m", "b *:* m"]
HOOK_RULE = "c 195:0 rw"
DENY_ALL = {"allow": False, "type": "a", "major": None, "minor": None, "access": "rwm"}


def record(kind: int, **fields: Any) -> bytes:
    values: dict[str, Any] = dict(kind=kind, tgid=41, tid=41, ppid=7, ts=10**9, ret=0, cg=5,
                                  uid=0, mntns=1, pidns=2, level=1, comm=b"runc", pcomm=b"dockerd",
                                  cmd=8, attach=6, flags=6, prog=12, repl=11, ptype=15,
                                  target=900, call=1, gb=0, eb=0, fb=0, ga=0, ea=0, fa=0,
                                  ngb=1, nga=0, before=[44], after=[], known=0, progs_before=[],
                                  progs_after=[])
    values.update(fields)
    groups_b = (values["before"] + [0] * CHG_MAX_GROUPS)[:CHG_MAX_GROUPS]
    groups_a = (values["after"] + [0] * CHG_MAX_GROUPS)[:CHG_MAX_GROUPS]
    ids_b = (values["progs_before"] + [0] * MAX_DEV_PROGS)[:MAX_DEV_PROGS]
    ids_a = (values["progs_after"] + [0] * MAX_DEV_PROGS)[:MAX_DEV_PROGS]
    head = ["kind", "tgid", "tid", "ppid", "ts", "ret", "cg", "uid", "mntns", "pidns", "level",
            "comm", "pcomm", "cmd", "attach", "flags", "prog", "repl", "ptype", "target"]
    tail = ["call", "gb", "eb", "fb", "ga", "ea", "fa", "ngb", "nga"]
    return _LAYOUT.pack(*[values[k] for k in head], values["known"],
                        values.get("n_before", len(values["progs_before"])),
                        values.get("n_after", len(values["progs_after"])), 0, *ids_b, *ids_a,
                        *[values[k] for k in tail], *groups_b, *groups_a, 0)


def test_a_program_replace_and_a_setgroups_decode() -> None:
    assert CHG_EVENT_SIZE == 496  # struct chg_event, asserted in the C too
    call = decode_change(record(1), 100.0)
    assert isinstance(call, DeviceProgramCall)
    assert (call.cmd, call.prog_id, call.replace_prog_id, call.target_cgroup) == \
        ("BPF_PROG_ATTACH", 12, 11, 900)
    assert call.caller.label() == "runc (pid 41, parent dockerd pid 7)"
    assert call.how() == "bpf(BPF_PROG_ATTACH, program 12 replacing 11, multi)"
    assert call.time == pytest.approx(101.0)
    groups = decode_change(record(2, comm=b"gosu"), 0.0)
    assert isinstance(groups, GroupCall) and groups.call == "setgroups"
    assert groups.dropped(44) and not groups.dropped(45)
    cut = decode_change(record(2, ngb=40), 0.0)  # more groups than captured: cannot show a drop
    assert isinstance(cut, GroupCall) and not cut.dropped(44)


@fuzz(300)
@given(raw=st.binary(max_size=CHG_EVENT_SIZE + 8))
def test_any_bytes_decode_or_are_a_counted_reason(raw: bytes) -> None:
    ran("access-change records")
    try:
        decode_change(raw, 0.0)
    except ChangeDecodeError as exc:
        assert exc.reason in {"short_record", "bad_kind", "bad_command", "bad_call",
                              "bad_dev_prog"}


def _facts(start: list[str], changes: list[tuple[list[str], list[str]]],
           config: list[dict[str, Any]], **extra: Any) -> Facts:
    facts = Facts()
    facts.put("device_cgroup.at_start", [{"time": 1.0, "layer": V1, "cgroup": "/c", "rules": start}],
              CACHED)
    facts.put("device_cgroup.changes", [
        {"time": 2.0 + n, "layer": V1, "cgroup": "/c", "before": b, "after": a,
         "how": "devices.allow/devices.deny written", "by": None}
        for n, (b, a) in enumerate(changes)], CACHED)
    facts.put("container.oci", {"device_rules": config, "cgroups_path": "/docker/x"}, CACHED)
    for name, value in extra.items():
        facts.put(name.replace("__", "."), value, CACHED)
    return facts


def test_never_granted_granted_outside_and_not_kept_are_told_apart() -> None:
    allow = {"allow": True, "type": "c", "major": 195, "minor": 0, "access": "rw"}
    never = device_rule_story(_facts(RUNC_DEFAULT, [], [DENY_ALL]), V1, "c", 195, 0, "rw")
    assert never is not None and never.story == "never_granted" and never.in_config is False
    hooked = _facts(RUNC_DEFAULT, [(RUNC_DEFAULT, RUNC_DEFAULT + [HOOK_RULE]),
                                   (RUNC_DEFAULT + [HOOK_RULE], RUNC_DEFAULT)], [DENY_ALL])
    outside = device_rule_story(hooked, V1, "c", 195, 0, "rw")
    assert outside is not None and outside.story == "outside_config"
    assert outside.granted is not None and outside.dropped is not None
    assert outside.diff == [f"- {HOOK_RULE}"]
    kept = device_rule_story(_facts(RUNC_DEFAULT + [HOOK_RULE],
                                    [(RUNC_DEFAULT + [HOOK_RULE], RUNC_DEFAULT)],
                                    [DENY_ALL, allow]), V1, "c", 195, 0, "rw")
    assert kept is not None and kept.story == "config_not_kept" and kept.granted is None
    assert device_rule_story(Facts(), V1, "c", 195, 0, "rw") is None  # no history: no story


def test_a_dropped_grant_seen_only_through_an_unreadable_state_is_still_told() -> None:
    facts = _facts(RUNC_DEFAULT + [HOOK_RULE], [(RUNC_DEFAULT + [HOOK_RULE], None),  # type: ignore[list-item]
                                                (None, RUNC_DEFAULT)], [DENY_ALL])   # type: ignore[list-item]
    story = device_rule_story(facts, V1, "c", 195, 0, "rw")
    assert story is not None and story.story == "outside_config" and story.dropped is not None


# --- v2 states from the kernel's reading at each call (the unit may not ask bpf()) --

DENY_ALL_PROG = [Insn(0xB4, 0, 0, 0, 0), Insn(0x95, 0, 0, 0, 0)]   # r0 = 0; exit


def program_record(prog_id: int, name: str, insns: list[Insn], length: int = 0) -> bytes:
    code = encode(insns)
    return DEV_PROG.pack(3, prog_id, 15, length or len(insns), len(insns), 0, bytes(8),
                         name.encode()) + code


def call_record(prog: int, repl: int, before: list[int], after: list[int], comm: bytes,
                ts: int, known: int = 3, **extra: Any) -> bytes:
    return record(1, prog=prog, repl=repl, progs_before=before, progs_after=after, comm=comm,
                  ts=ts, known=known, **extra)


def test_a_call_carries_the_target_s_programs_before_and_after_as_the_kernel_read_them() -> None:
    call = decode_change(call_record(12, 11, [11], [12], b"gt-hook", 10**9), 0.0)
    assert isinstance(call, DeviceProgramCall)
    assert (call.before_ids, call.after_ids) == ((11,), (12,))
    unread = decode_change(call_record(12, 11, [11], [12], b"x", 10**9, known=1), 0.0)
    assert isinstance(unread, DeviceProgramCall) and unread.after_ids is None  # failed: not read
    more = decode_change(call_record(12, 11, [11], list(range(1, 9)), b"x", 10**9,
                                     n_after=MAX_DEV_PROGS + 1), 0.0)
    assert isinstance(more, DeviceProgramCall) and more.after_ids is None  # more than it holds
    prog = decode_change(program_record(12, "gt_hook", DENY_ALL_PROG), 0.0)
    assert isinstance(prog, DevProgRecord) and (prog.id, prog.name) == (12, "gt_hook")


def _replayed(start_first: bool) -> tuple[AccessHistory, Any]:
    """runc attaches its program (11), a hook replaces it with one allowing 195:7 first
    (12), a re-apply puts the runtime's back (13); bpf() is never available (no mount)."""
    history = AccessHistory(lambda: None)
    key = v2_key(900)
    unreadable = RuleState(0.5, V2, "/gtv2", None, "cannot read its programs: EPERM")
    runc = [program_record(11, "", DENY_ALL_PROG),
            call_record(11, 0, [], [11], b"runc:[2:INIT]", 10**9)]
    if start_first:
        history.start_state(key, unreadable)   # the snapshot came before the probe's records
    for raw in runc:
        history.on_record(decode_change(raw, -1e6))   # times far before the snapshot
    if not start_first:
        history.start_state(key, unreadable)
    for raw in (program_record(12, "gt_hook", allow_first(195, 7) + DENY_ALL_PROG),
                call_record(12, 11, [11], [12], b"gt-hook", 10**9, flags=6),
                program_record(13, "gt_reapply", DENY_ALL_PROG),
                call_record(13, 12, [12], [13], b"gt-reapply", 2 * 10**9, flags=6)):
        history.on_record(decode_change(raw, 1e9))
    return history, key


@pytest.mark.parametrize("start_first", [True, False])
def test_the_kernel_s_reading_tells_the_v2_story_without_bpf(start_first: bool) -> None:
    history, key = _replayed(start_first)
    start = history.at_start(key)
    assert start is not None and start.rules is not None and "read in the kernel" in start.origin
    assert [p["id"] for p in start.rules] == [11]
    changes = history.changes(key)
    assert [(c.by or {}).get("comm") for c in changes][-2:] == ["gt-hook", "gt-reapply"]
    assert all(c.after.origin == KERNEL for c in changes[-2:])
    facts = Facts()
    facts.put("device_cgroup.at_start", [start.to_json()], CACHED)
    facts.put("device_cgroup.changes", [c.to_json() for c in changes], CACHED)
    facts.put("container.oci", {"device_rules": [DENY_ALL], "cgroups_path": "/gtv2"}, CACHED)
    story = device_rule_story(facts, V2, "c", 195, 7, "r")
    assert story is not None and story.story == "outside_config", story
    assert story.who().startswith("gt-reapply (pid 41"), story.who()
    assert story.diff == ["- program 12 'gt_hook'", "+ program 13 'gt_reapply'"]


def test_a_state_whose_program_did_not_arrive_stays_unknown() -> None:
    history = AccessHistory(lambda: None)
    key = v2_key(900)
    history.on_record(decode_change(program_record(11, "", DENY_ALL_PROG), 0.0))
    history.on_record(decode_change(call_record(11, 0, [], [11], b"runc", 10**9), 0.0))
    history.start_state(key, RuleState(5.0, V2, "/gtv2", None, "EPERM"))
    # program 14's instructions never came (the buffer was full): no guess
    history.on_record(decode_change(call_record(14, 11, [11], [14], b"gt-x", 6 * 10**9), 0.0))
    [*_, change] = history.changes(key)
    assert change.after.rules is None and "14 did not arrive" in change.after.why_unknown
    assert change.before.rules is not None  # the side the kernel showed with instructions
    # a call the kernel did not read (a kernel without the BTF members) is unknown as before
    history.on_record(decode_change(call_record(15, 14, [], [], b"gt-y", 7 * 10**9, known=0),
                                    0.0))
    assert history.changes(key)[-1].after.why_unknown == "no cgroup2 mount"


def test_never_granted_is_said_only_when_every_state_is_known() -> None:
    unread = _facts(None, [(None, RUNC_DEFAULT)], [DENY_ALL])  # type: ignore[arg-type, list-item]
    assert device_rule_story(unread, V1, "c", 195, 0, "rw") is None  # the start may have allowed it
    mid = _facts(RUNC_DEFAULT, [(RUNC_DEFAULT, None), (None, RUNC_DEFAULT)],  # type: ignore[list-item]
                 [DENY_ALL])
    assert device_rule_story(mid, V1, "c", 195, 0, "rw") is None


def test_history_keeps_changes_not_repeats() -> None:
    history = AccessHistory()
    key = v1_key("/docker/x")
    history.start_state(key, RuleState(1.0, V1, "/docker/x", tuple(RUNC_DEFAULT)))
    assert history.observe(key, RuleState(2.0, V1, "/docker/x", tuple(RUNC_DEFAULT)), "w") is None
    change = history.observe(key, RuleState(3.0, V1, "/docker/x", tuple(RUNC_DEFAULT[:2])), "w")
    assert change is not None and change.to_json()["before"] == RUNC_DEFAULT
    assert [c.after.time for c in history.changes(key)] == [3.0]
    assert history.changes(key, until=2.5) == []
    assert history.at_start(key) is not None and history.at_start(key).time == 1.0


def test_session_story_compares_the_group_file_with_the_session() -> None:
    facts = Facts()
    facts.put("process.uid", 1000, CACHED)
    facts.put("process.session_leader", {"pid": 9, "comm": "bash", "started": 100.0,
                                         "uid": 1000, "groups": [1000]}, CACHED)
    facts.put("host.etc_group_changed", 200.0, CACHED)
    story = session_story(facts, 44)
    assert story is not None and story.after_session is True
    facts.put("host.etc_group_changed", 50.0, CACHED)
    assert session_story(facts, 44).after_session is False  # type: ignore[union-attr]
    facts.put("process.parent", {"pid": 10, "groups": [44], "started": 101.0, "uid": 1000},
              CACHED)
    assert session_story(facts, 44) is None  # its parent holds it: the process dropped it


def _switched(parent_started: float) -> Facts:
    """uid 1001 run by root's shell (setpriv --reuid ... --clear-groups), gone at once."""
    facts = Facts()
    for name, value in {"process.uid": 1001, "host.etc_group_changed": 200.0,
                        "process.parent": {"pid": 10, "comm": "bash", "started": parent_started,
                                           "uid": 0, "groups": [0]},
                        "process.session_leader": {"pid": 9, "comm": "bash", "started": 50.0,
                                                   "uid": 0, "groups": [0]}}.items():
        facts.put(name, value, CACHED)
    return facts


def test_a_session_of_another_user_is_not_this_users_login() -> None:
    """Seen by hand: root's shell (started before usermod) ran `setpriv --reuid=U
    --clear-groups cat NODE`; the verdict said U was added to the group 'only after this
    process's session started (bash ...)', a session of root's, and offered newgrp."""
    story = session_story(_switched(100.0), 44)
    assert story is not None and story.session is None and story.after_session is None
    assert story.switched_from is not None and story.switched_from["pid"] == 10
    later = session_story(_switched(300.0), 44)  # switched after the group file changed
    assert later is not None and later.after_session is False
    base = {"node.mode": "0660", "node.uid": 0, "node.gid": 44, "node.major": 195,
            "node.minor": 0, "node.path": "/dev/nvidia0", "node.mount_nodev": False,
            "node.group_name": "gpu", "process.fsuid": 1001, "process.fsgid": 1001,
            "process.groups": [1001], "process.cap_effective": "0", "userns.level": 0,
            "host.user_groups": [1001, 44], "host.user_name": "late",
            "process.host_process": True}
    facts = _switched(100.0)
    for name, value in base.items():
        facts.put(name, value, CACHED)
    event = Event(time=250.0, sensor="bpf", syscall="openat", errno=13,
                  process=Process(pid=5, tid=5, uid=1001), node=Node(path=b"/dev/nvidia0"))
    verdict = explain_facts(event, facts)
    assert verdict.reason == R.NOT_IN_GROUP, verdict.to_json()
    assert verdict.summary.startswith("late is listed in group gpu (gid 44) in /etc/group, but "
                                      "this process does not carry it: its parent bash (pid 10)"
                                      " runs as another user"), verdict.summary
    commands = [f.command for f in verdict.fixes]
    assert commands[0] == "runuser -u late -- '<command>'", commands
    assert not any(c.startswith(("usermod", "newgrp", "sg ")) for c in commands), commands


def test_group_drop_story_needs_a_grant_and_finds_the_dropper() -> None:
    facts = Facts()
    assert group_drop_story(facts, 44) is None
    facts.put("container.oci", {"user": {"additional_gids": [44]}}, CACHED)
    facts.put("process.group_changes", [
        {"time": 5.0, "call": "setgroups", "by": {"pid": 3, "comm": "runc:[2:INIT]"},
         "before": {"gid": 0, "egid": 0, "fsgid": 0, "groups": [], "ngroups": 0},
         "after": {"gid": 0, "egid": 0, "fsgid": 0, "groups": [44], "ngroups": 1}},
        {"time": 6.0, "call": "setgroups", "by": {"pid": 3, "comm": "gosu"},
         "before": {"gid": 0, "egid": 0, "fsgid": 0, "groups": [44], "ngroups": 1},
         "after": {"gid": 0, "egid": 0, "fsgid": 0, "groups": [], "ngroups": 0}}], CACHED)
    story = group_drop_story(facts, 44)
    assert story is not None and story.dropped_by is not None
    assert story.dropped_by["by"]["comm"] == "gosu" and "OCI" in story.granted_by[0]


HOSTILE = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
NAMES = ("device_cgroup.changes", "device_cgroup.at_start", "container.oci",
         "process.group_changes", "process.session_leader", "process.parent",
         "host.etc_group_changed", "container.init_groups", "host.dev_char_link",
         "cgroup.paths", "container.etc_passwd")


@fuzz(300)
@given(values=st.fixed_dictionaries({n: HOSTILE for n in NAMES}), eperm=st.booleans())
def test_recorded_history_facts_of_any_shape_never_crash_a_verdict(values: dict[str, Any],
                                                                   eperm: bool) -> None:
    """A journal fed to `explain` may hold anything under these names."""
    ran("hostile history facts")
    facts = Facts()
    base = {"node.mode": "0660", "node.uid": 0, "node.gid": 44, "node.major": 195,
            "node.minor": 0, "node.path": "/dev/nvidia0", "node.mount_nodev": False,
            "process.fsuid": 1000, "process.fsgid": 1000, "process.groups": [1000],
            "process.cap_effective": "0", "userns.level": 0, "host.user_groups": [44],
            "process.host_process": True, "container.id": "x",
            "device_cgroup.v1_rules": RUNC_DEFAULT}
    for name, value in {**base, **values}.items():
        facts.put(name, value, CACHED)
    event = Event(time=10.0, sensor="bpf", syscall="openat", errno=1 if eperm else 13,
                  process=Process(pid=5, tid=5), node=Node(path=b"/dev/nvidia0"))
    verdict = explain_facts(event, facts)
    assert verdict.reason in R.REASONS and verdict.summary


def test_the_oci_rule_list_is_read_in_order_as_runtimes_apply_it() -> None:
    """docker's shape: deny all, allows, then a deny of one device; --device appends."""
    from tracer.enrichment.device_rules import OciDeviceRules
    rules = OciDeviceRules.from_oci([
        DENY_ALL, {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
        {"allow": True, "type": "c", "major": None, "minor": None, "access": "m"},
        {"allow": False, "type": "c", "major": 10, "minor": 229, "access": "rwm"},
        {"allow": True, "type": "c", "major": 195, "minor": 0, "access": "rw"}])
    assert rules is not None
    assert rules.may("c", 195, 0, "rw").allowed is True
    assert rules.may("c", 195, 1, "rw").allowed is False
    assert rules.may("c", 195, 1, "m").allowed is True      # mknod of anything: docker's rule
    assert rules.may("c", 10, 229, "rw").allowed is False   # the later deny wins
    assert OciDeviceRules.from_oci([{"allow": True, "type": "x"}]) is None
    assert OciDeviceRules.from_oci("nonsense") is None


def test_the_runtime_s_own_setgroups_is_not_a_process_dropping_a_grant() -> None:
    """Rootless runc's init replaces the host groups with the container's (the gid is not
    mapped): that is CAUSES #1, group_dropped_in_userns, not group_dropped_by_process."""
    facts = Facts()
    facts.put("process.group_changes", [
        {"time": 5.0, "call": "setgroups", "by": {"pid": 3, "comm": "runc:[2:INIT]"},
         "before": {"gid": 1000, "egid": 1000, "fsgid": 1000, "groups": [44, 1000], "ngroups": 2},
         "after": {"gid": 1000, "egid": 1000, "fsgid": 1000, "groups": [1000], "ngroups": 1}}],
              CACHED)
    assert group_drop_story(facts, 44) is None
