"""Every caller the known facts allow, for the DAC layer of the access model.

A credential the sensor could not capture (fsuid, membership of one gid, the
capabilities, the user namespace's id maps) is not given a default: each unknown
answer is tried both ways, one `Caller` per combination, and the access model's
DAC layer is decided only when every caller gets the same answer.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from tracer.verdict.access_model import Credentials, NodeFacts

MAY_READ = 4
MAY_WRITE = 2
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2


@dataclass(frozen=True)
class Caller:
    """One complete answer to every question the DAC layer asks of the caller."""

    fsuid: Optional[int]      # None: none of the uids the node names
    holds: frozenset[int]     # which of the gids the node names the caller holds
    caps: int
    mapped: bool              # the node's uid and gid are mapped in the caller's userns
    initial: bool             # the caller is in the initial user namespace

    def has_cap(self, cap: int) -> bool:
        return bool(self.caps >> cap & 1)


MAX_CALLERS = 4096  # combinations of unknowns tried; more leaves the layer unknown


def callers(node: "NodeFacts", creds: "Credentials",
             mask: int) -> tuple[Optional[list[Caller]], list[str]]:
    """Every caller the known facts allow (one when all is known), and what is unknown."""
    uids = list(dict.fromkeys([node.uid] + [u for u, _ in (node.acl.users if node.acl else ())]))
    gids = list(dict.fromkeys([node.gid] + [g for g, _ in (node.acl.groups if node.acl else ())]))
    unknown: list[str] = []
    fsuids: list[Optional[int]] = [creds.fsuid]
    if creds.fsuid is None:
        fsuids = [None] + uids
        unknown.append("the process's fsuid")
    held: list[list[tuple[int, bool]]] = []
    for gid in gids:
        answer = creds.in_group(gid)
        if answer is None:
            unknown.append(f"whether it holds gid {gid} ({creds.why_not_known(gid)})")
            held.append([(gid, False), (gid, True)])
        else:
            held.append([(gid, answer)])
    caps: list[int] = [creds.cap_effective or 0]
    if creds.cap_effective is None:
        wanted = [CAP_DAC_OVERRIDE] + ([CAP_DAC_READ_SEARCH] if mask == MAY_READ else [])
        caps = [sum(1 << c for c in chosen) for n in range(len(wanted) + 1)
                for chosen in itertools.combinations(wanted, n)]
        unknown.append("its capabilities (CAP_DAC_OVERRIDE" +
                       (", CAP_DAC_READ_SEARCH)" if mask == MAY_READ else ")"))
    mapped = [True, False]
    if creds.userns.known:
        mapped = [creds.userns.has_uid(node.uid) and creds.userns.has_gid(node.gid)]
    elif creds.cap_effective != 0:
        unknown.append("its user namespace")
    count = len(fsuids) * len(caps) * len(mapped)
    for options in held:
        count *= len(options)
    if count > MAX_CALLERS:
        return None, unknown
    out = [Caller(uid, frozenset(g for g, yes in combo if yes), cap, m, creds.userns.is_initial)
           for uid in fsuids for combo in itertools.product(*held) for cap in caps for m in mapped]
    return out, unknown
