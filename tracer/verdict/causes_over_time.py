"""Causes that are told over time: device rules revoked by a re-apply, a session
older than the group, a group granted and then dropped, and the ACL mask.

Each builder is asked only after the access model showed the layer refusing
(the device cgroup for EPERM, the DAC group or ACL check for EACCES); the
facts then tell the story.  Each returns the classification, or None when
the facts do not show that story.  Pure.
"""

from __future__ import annotations

from typing import Any, Optional

from tracer.enrichment.device_rules import access_from_mask
from tracer.enrichment.id_map import IdMap
from tracer.facts import Facts
from tracer.verdict import reasons as R
from tracer.verdict.classification import Classification
from tracer.verdict.device_rule_story import RuleStory, clock, device_rule_story
from tracer.verdict.group_story import group_drop_story, session_story
from tracer.verdict.model_input import ModelRun

REVOKED_EVIDENCE = ["device_cgroup.changes", "device_cgroup.at_start", "container.oci",
                    "device_cgroup.v1_rules", "device_cgroup.v2_programs", "host.dev_char_link",
                    "cgroup.paths", "container.name", "container.engine", "node.major",
                    "node.minor"]


def _container(facts: Facts) -> str:
    name = facts.get("container.name") or facts.get("container.id")
    return str(name)[:64] if name else "of this process"


def revoked_device(facts: Facts, run: ModelRun, layer: str,
                   ctx: dict[str, Any]) -> Optional[Classification]:
    """The refusing device layer once allowed the node: who took it away, and when.
    A node never granted gets its note added to `ctx` and None."""
    major, minor = facts.get("node.major"), facts.get("node.minor")
    if not isinstance(major, int) or not isinstance(minor, int):
        return None
    kind = "b" if facts.get("node.type") == "block" else "c"
    story = device_rule_story(facts, layer, kind, major, minor, access_from_mask(run.mask))
    if story is None:
        return None
    if story.story == "never_granted":
        ctx["never_granted"] = (
            "It was never allowed: not when the container started, not by any change since"
            + (", and the container's OCI config does not grant it." if story.in_config is False
               else "."))
        return None
    link = facts.get("host.dev_char_link")
    ctx.update(story=story.story, manager=story.manager, container=_container(facts),
               dev_char_missing=isinstance(link, dict) and link.get("exists") is False,
               dev_char_path=f"/dev/char/{major}:{minor}", config_rule=story.config_rule,
               cgroup_v1=_v1_path(facts), allow_rule=f"{kind} {major}:{minor} rw",
               device_layer=layer)
    notes = _revoked_notes(story)
    confidence = "high" if story.dropped is not None and story.in_config is not None else "medium"
    return Classification(R.DEVICE_CGROUP_REVOKED, confidence, REVOKED_EVIDENCE, ctx, notes,
                          summary=_revoked_sentence(story, ctx))


def _v1_path(facts: Facts) -> Optional[str]:
    paths = facts.get("cgroup.paths")
    if not isinstance(paths, dict):
        return None
    return next((str(p) for c, p in paths.items() if "devices" in str(c).split(",")), None)


def _revoked_sentence(story: RuleStory, ctx: dict[str, Any]) -> str:
    what = f"{ctx['path']} ({ctx['major']}:{ctx['minor']})"
    when = (f"at {clock(story.dropped.get('time'))}, when {story.who()} re-applied its device rules"
            if story.dropped is not None else
            "some time after it started (gputrace did not see the change)")
    if story.story == "config_not_kept":
        why = (f": systemd keeps a device rule only while {ctx['dev_char_path']} exists, and it "
               "does not" if ctx["manager"] == "systemd" and ctx["dev_char_missing"] else "")
        return (f"Container {ctx['container']}'s OCI config grants {what}, but the grant was "
                f"dropped {when}{why}; the next re-apply drops it again.")
    return (f"{what} was allowed in container {ctx['container']} until it was dropped {when}; "
            "the grant came from outside the container's OCI config (a runtime hook or a "
            "devices.allow write), so every re-apply of the rules (systemctl daemon-reload, "
            "a resource update, a restart) drops it again.")


def _revoked_notes(story: RuleStory) -> list[str]:
    notes = []
    if story.granted is not None:
        by = story.granted.get("by")
        who = f" by {by.get('comm')} (pid {by.get('pid')})" if isinstance(by, dict) else ""
        notes.append(f"Granted after the container started, at {clock(story.granted.get('time'))}"
                     f"{who} ({story.granted.get('how')}).")
    else:
        notes.append("Allowed when the container started, though its OCI config "
                     + ("does not grant it." if story.in_config is False else
                        "grants it." if story.in_config else "was not read."))
    if story.dropped is not None:
        notes.append(f"Dropped at {clock(story.dropped.get('time'))} by {story.who()} "
                     f"({story.dropped.get('how')}): {'; '.join(story.diff)}.")
    return notes


def _gid_text(ctx: dict[str, Any]) -> str:
    return f"group {ctx['group']} (gid {ctx['gid']})"


def stale_session(facts: Facts, gid: int, ctx: dict[str, Any]) -> Optional[Classification]:
    """A host process lacking a group /etc/group lists its user in."""
    story = session_story(facts, gid)
    ctx["unit"] = _unit(facts)
    ctx["session_holds"] = story is None  # its session holds it: dropped on the way
    if story is not None and story.switched_from is not None and not story.after_session:
        by = story.switched_from
        ctx["groups_set_by"] = f"{str(by.get('comm'))[:64]} (pid {by.get('pid')})"
    if story is None or not story.after_session and (story.after_session is False
                                                     or story.switched_from is not None):
        return None
    evidence = ["host.user_groups", "process.groups", "host.etc_group_changed",
                "process.session_leader", "process.parent", "process.started", "node.gid",
                "node.group_name", "cgroup.paths"]
    who = story.session
    if story.after_session:
        summary = (
            f"{ctx['user']} was listed in {_gid_text(ctx)} only after this process's session "
            f"started ({who.get('comm') if who else 'the process'}"
            f"{' pid ' + str(who.get('pid')) if who else ''} at "
            f"{clock(who.get('started') if who else story.process_started)}; /etc/group changed at "
            f"{clock(story.group_changed)}): a session keeps the groups it had at login, so "
            f"{ctx['path']} refuses this process until it runs in a new session.")
        return Classification(R.SESSION_PREDATES_GROUP, "high", evidence, ctx, summary=summary)
    summary = (
        f"{ctx['user']} is listed in {_gid_text(ctx)} in /etc/group, but this process does not "
        f"carry it: its session most likely started before the user was added (when it "
        f"started is not known; /etc/group changed at {clock(story.group_changed)}).")
    return Classification(R.SESSION_PREDATES_GROUP, "medium", evidence, ctx,
                          ["The process and its session leader had exited, so the session's "
                           "start could not be compared with /etc/group."], summary=summary)


def _unit(facts: Facts) -> Optional[str]:
    """The systemd unit (service) the process runs in, from its cgroup path."""
    paths = facts.get("cgroup.paths")
    for path in (paths.values() if isinstance(paths, dict) else []):
        for part in reversed(str(path).split("/")):
            if part.endswith(".service"):
                return part[:128]
    return None


def dropped_group(facts: Facts, gid: int, ctx: dict[str, Any],
                  recorded_only: bool) -> Optional[Classification]:
    """The container granted `gid` and a process in it dropped it.  `recorded_only`:
    only when the probe recorded the dropping call."""
    story = group_drop_story(facts, gid)
    if story is None or (recorded_only and story.dropped_by is None):
        return None
    if story.dropped_by is None and not (ctx["in_container"] and (
            story.init_had_it or any("OCI" in g for g in story.granted_by))):
        return None
    evidence = ["process.group_changes", "container.oci", "container.init_groups",
                "container.keep_original_groups", "process.groups", "node.gid",
                "node.group_name", "container.etc_group", "container.etc_passwd"]
    call = story.dropped_by
    granted = story.granted_by[0]
    ctx["container_user"] = _container_user(facts)
    ctx["container_user_gid"] = _inside_gid(facts, facts.get("process.fsgid"))
    if call is not None:
        raw_by = call.get("by")
        by: dict[str, Any] = raw_by if isinstance(raw_by, dict) else {}
        ctx.update(dropper=str(by.get("comm") or "?"), dropper_pid=by.get("pid"))
        summary = (
            f"{'G' + _gid_text(ctx)[1:]}, which {ctx['path']} requires, was granted by "
            f"{granted}, but {ctx['dropper']} (pid {by.get('pid')}, child of "
            f"{by.get('parent_comm')}) called {call.get('call')} at {clock(call.get('time'))} "
            "without it, so this process lacks it.")
        return Classification(R.GROUP_DROPPED_BY_PROCESS, "high", evidence, ctx, summary=summary)
    ctx.update(dropper=None, dropper_pid=None)
    summary = (
        f"{'G' + _gid_text(ctx)[1:]}, which {ctx['path']} requires, was granted by "
        f"{granted}, but this process lacks it: a process in the container (its entrypoint, gosu, su-exec, setpriv, "
        "initgroups) set its groups without it.")
    return Classification(R.GROUP_DROPPED_BY_PROCESS, "medium", evidence, ctx,
                          ["No set*gid call was recorded for this container (gputrace's "
                           "access-change probe was not running when it started)."],
                          summary=summary)


def _inside_gid(facts: Facts, kernel_gid: Any) -> Optional[int]:
    """A kernel gid as the container sees it (through its gid_map)."""
    if not isinstance(kernel_gid, int):
        return None
    rows = facts.get("userns.gid_map")
    return IdMap.from_rows(rows).to_inside(kernel_gid) if rows else kernel_gid


def _container_user(facts: Facts) -> Optional[str]:
    """The container user's name in the image's /etc/passwd, by the process's uid."""
    table, uid = facts.get("container.etc_passwd"), facts.get("process.fsuid")
    if not isinstance(table, dict):
        return None
    return next((str(n) for n, u in table.items() if u == uid), None)


def acl_mask(run: ModelRun, ctx: dict[str, Any]) -> Optional[Classification]:
    """The ACL grants the access, its mask withholds it."""
    decision = run.decision
    if decision is None or decision.check != "dac_acl_mask":
        return None
    summary = (f"The ACL mask of {ctx['path']} withholds what this process asks for: "
               f"{decision.detail}; the mask caps every named user and group entry of the ACL.")
    return Classification(R.ACL_MASK_WITHHOLDS, "high",
                          ["node.acl", "node.mode", "process.groups", "process.fsuid", "node.gid"],
                          ctx, summary=summary)
