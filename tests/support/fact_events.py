"""A denial and its facts written by hand, for verdict tests whose subject is the
catalog's logic (the facts a real enrichment would give are listed in each test)."""

from __future__ import annotations

import os
from typing import Any, Optional

from tracer.event import Event, Node, Process, UserNs
from tracer.facts import LIVE, Facts
from tracer.verdict.explain import explain_facts
from tracer.verdict.reasons import Verdict

INIT_USERNS = 4026531837


def denial_with_facts(path: str, major: int, minor: int, err: int, facts: dict[str, Any], *,
                      uid: int = 0, groups: tuple[int, ...] = (), caps: int = 0,
                      userns: Optional[UserNs] = None, source: str = LIVE
                      ) -> tuple[Event, Facts, Verdict]:
    """An O_RDWR open of `path` (major:minor) refused with `err`, explained from `facts`
    (None values are left out: not known)."""
    proc = Process(pid=4321, tid=4321, comm=b"app", uid=uid, gid=uid, euid=uid, egid=uid,
                   fsuid=uid, fsgid=uid, groups=list(groups), ngroups=len(groups),
                   cap_effective=caps, userns=userns or UserNs(INIT_USERNS, 0, 0))
    event = Event(time=1.0, sensor="bpf", syscall="openat", errno=err, process=proc,
                  node=Node(path=path.encode(), major=major, minor=minor), open_flags=os.O_RDWR)
    known = Facts()
    base = {"node.path": path, "node.major": major, "node.minor": minor, "node.type": "char",
            "node.uid": 0, "node.mount_nodev": False, "process.fsuid": uid,
            "process.fsgid": uid, "process.groups": list(groups),
            "process.cap_effective": f"{caps:x}", "userns.level": 0}
    for name, value in {**base, **facts}.items():
        if value is not None:
            known.put(name, value, source, "fixture")
    return event, known, explain_facts(event, known)
