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
from tracer.enrichment.access_history import V1, AccessHistory, RuleState, v1_key
from tracer.event import Event, Node, Process
from tracer.facts import CACHED, Facts
from tracer.sensors.access_change_records import (CHG_EVENT_SIZE, ChangeDecodeError,
                                                  DeviceProgramCall, GroupCall, _LAYOUT,
                                                  decode_change)
from tracer.sensors.bpf_constants import CHG_MAX_GROUPS
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
                                  ngb=1, nga=0, before=[44], after=[])
    values.update(fields)
    groups_b = (values["before"] + [0] * CHG_MAX_GROUPS)[:CHG_MAX_GROUPS]
    groups_a = (values["after"] + [0] * CHG_MAX_GROUPS)[:CHG_MAX_GROUPS]
    order = ["kind", "tgid", "tid", "ppid", "ts", "ret", "cg", "uid", "mntns", "pidns", "level",
             "comm", "pcomm", "cmd", "attach", "flags", "prog", "repl", "ptype", "target", "call",
             "gb", "eb", "fb", "ga", "ea", "fa", "ngb", "nga"]
    return _LAYOUT.pack(*[values[k] for k in order], *groups_b, *groups_a, 0)


def test_a_program_replace_and_a_setgroups_decode() -> None:
    assert CHG_EVENT_SIZE == 416  # struct chg_event, asserted in the C too
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
        assert exc.reason in {"short_record", "bad_kind", "bad_command", "bad_call"}


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
