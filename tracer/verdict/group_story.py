"""Groups over time: a session older than the group, or a group granted and then
dropped.  Both start where the DAC check refused because the process lacks
the node's group; the facts then tell which story it is.  Pure.

* Session older than the group: the user is listed in the group (host
  /etc/group) but the process does not carry it, and /etc/group changed after
  the session the process belongs to started: supplementary groups are set at
  login and inherited, so only a new session (or `newgrp`/`sg`) has them.
* Granted, then dropped: the container's config grants the gid (OCI
  `process.user.additionalGids`, from `--group-add`/`supplementalGroups`, or
  crun's keep-groups) or its init started with it, and a process in the
  container called setgroups without it (`gosu user:group`, `su-exec`,
  `setpriv --clear-groups`, `initgroups()` against the image's /etc/group).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from tracer.enrichment.id_map import IdMap
from tracer.facts import Facts

SLACK_S = 0.01   # /etc/group's mtime and a start time come from different clocks


@dataclass
class SessionStory:
    group_changed: Optional[float]        # /etc/group's mtime
    session: Optional[dict[str, Any]]     # the earliest known process of the session
    after_session: Optional[bool]         # the group file changed after it started
    process_started: Optional[float] = None
    # no process of the session is known to run as the user, but its parent (or
    # session leader) runs as another: a program switched to the user (su, setpriv,
    # runuser, a service manager) and set the groups then, at a time not known
    switched_from: Optional[dict[str, Any]] = None


def _lacks(entry: Any, gid: int) -> bool:
    groups = entry.get("groups") if isinstance(entry, dict) else None
    return isinstance(groups, list) and gid not in groups


def _number(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def session_story(facts: Facts, gid: int) -> Optional[SessionStory]:
    """For a process lacking `gid` whose user /etc/group lists in it; None when a live
    ancestor of its session running as the same user holds the gid (then the process
    dropped it itself).  Only the process's own uid's ancestors are its login session:
    a parent of another user (root's shell that ran setpriv or su) says nothing of
    when this user's groups were set."""
    uid = facts.get("process.uid")
    known = [e for e in (facts.get("process.session_leader"), facts.get("process.parent"))
             if isinstance(e, dict)]
    same = [e for e in known if isinstance(uid, int) and e.get("uid") == uid]
    if any(isinstance(e.get("groups"), list) and gid in e["groups"] for e in same):
        return None
    session = next((e for e in same if _lacks(e, gid) and _number(e.get("started")) is not None),
                   None)
    started = _number(facts.get("process.started"))
    start = _number(session["started"]) if session else started
    changed = _number(facts.get("host.etc_group_changed"))
    after = None if changed is None or start is None else changed > start + SLACK_S
    switched = None
    if session is None and known and not same:
        switched = known[-1]  # the parent, else the session leader
        begun = _number(switched.get("started"))
        if after is None and changed is not None and begun is not None \
                and changed + SLACK_S < begun:
            after = False  # the switch came after the group file changed
    return SessionStory(changed, session, after, started, switched)


@dataclass
class DropStory:
    granted_by: list[str] = field(default_factory=list)   # the evidence of the grant
    dropped_by: Optional[dict[str, Any]] = None           # the set*gid call, as recorded
    init_had_it: bool = False


def _mapped(facts: Facts, inside: int) -> Optional[int]:
    rows = facts.get("userns.gid_map")
    return IdMap.from_rows(rows).to_outside(inside) if rows else inside


def _config_gids(facts: Facts) -> list[int]:
    oci = facts.get("container.oci")
    user = oci.get("user") if isinstance(oci, dict) else None
    raw = user.get("additional_gids") if isinstance(user, dict) else None
    out = []
    for gid in raw if isinstance(raw, list) else []:
        if isinstance(gid, int) and not isinstance(gid, bool):
            kernel = _mapped(facts, gid)
            if kernel is not None:
                out.append(kernel)
    return out


def _holds(side: Any, gid: int) -> bool:
    if not isinstance(side, dict):
        return False
    ids = [side.get(k) for k in ("gid", "egid", "fsgid")]
    groups = side.get("groups")
    return gid in ids or (isinstance(groups, list) and gid in groups)


def _complete(side: Any) -> bool:
    groups = side.get("groups") if isinstance(side, dict) else None
    return isinstance(groups, list) and side.get("ngroups") == len(groups)


# the OCI runtime's own init sets the container's groups before it runs the entrypoint:
# its setgroups is the runtime applying the config (in a rootless user namespace it
# drops host groups that cannot be mapped: CAUSES #1), not a process dropping a grant
RUNTIME_INIT_COMMS = ("runc:", "crun", "runc", "youki", "runsc", "conmon")


def _by_runtime(call: dict[str, Any]) -> bool:
    by = call.get("by")
    comm = by.get("comm") if isinstance(by, dict) else None
    return isinstance(comm, str) and comm.startswith(RUNTIME_INIT_COMMS)


def group_drop_story(facts: Facts, gid: int) -> Optional[DropStory]:
    """The grant and the drop of `gid` in the process's container; None without a grant."""
    story = DropStory()
    if gid in _config_gids(facts):
        story.granted_by.append("the container's OCI config (process.user.additionalGids, "
                                "as --group-add or supplementalGroups write it)")
    host_groups = facts.get("host.user_groups") or []
    if facts.get("container.keep_original_groups") is True and gid in host_groups:
        story.granted_by.append("keep-groups (annotation run.oci.keep_original_groups=1)")
    init_groups = facts.get("container.init_groups")
    if isinstance(init_groups, list) and gid in init_groups:
        story.init_had_it = True
        story.granted_by.append("the container's init, which held it when the container started")
    calls = facts.get("process.group_changes")
    for call in calls if isinstance(calls, list) else []:
        if isinstance(call, dict) and not _by_runtime(call) and _holds(call.get("before"), gid) \
                and not _holds(call.get("after"), gid) and _complete(call.get("before")) \
                and _complete(call.get("after")):
            story.dropped_by = call   # the latest one wins
    if story.dropped_by is not None and not story.granted_by:
        by = story.dropped_by.get("by")
        story.granted_by.append(f"{by.get('comm') if isinstance(by, dict) else 'the caller'}'s "
                                "groups before its call")
    if not story.granted_by:
        return None
    return story
