"""A process's supplementary groups as the kernel holds them: one model.

The kernel keeps `group_info->gid[]` sorted ascending (groups_sort() on every
setgroups), so a list captured from its start is the *lowest* `len(gids)` of
`count`.  Membership is then decided either way for every gid up to the last
captured one, and unknown above it; a sensor that cannot see groups at all
(audit) gives `gids=None` and every answer is unknown.  Nothing here guesses.

    held = SupplementaryGroups.from_facts([27, 44, ...1024 gids], 1100)
    held.holds(44) -> True;  held.holds(45) -> False;  held.holds(70000) -> None
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class SupplementaryGroups:
    gids: Optional[tuple[int, ...]]  # ascending; None: not known at all
    count: Optional[int] = None      # the true number of groups; None: len(gids)

    @classmethod
    def unknown(cls) -> "SupplementaryGroups":
        return cls(None)

    @classmethod
    def from_facts(cls, groups: Any, ngroups: Any = None) -> "SupplementaryGroups":
        """From `process.groups` / `process.ngroups` (a journal's may be anything)."""
        if not isinstance(groups, (list, tuple)):
            return cls(None)
        gids = tuple(sorted(int(g) for g in groups))
        count = int(ngroups) if isinstance(ngroups, int) and not isinstance(ngroups, bool) else None
        return cls(gids, count if count is not None and count > len(gids) else None)

    @property
    def complete(self) -> bool:
        return self.gids is not None and (self.count is None or self.count <= len(self.gids))

    def holds(self, kgid: int) -> Optional[bool]:
        """Whether `kgid` is among the groups; None when the capture cannot tell."""
        if self.gids is None:
            return None
        if kgid in self.gids:
            return True
        if self.complete or (self.gids and kgid < self.gids[-1]):
            return False  # sorted: it would sit among those captured
        return None

    def why_unknown(self, kgid: int) -> str:
        if self.gids is None:
            return "the sensor cannot capture supplementary groups"
        top = self.gids[-1] if self.gids else None
        return (f"the process has {self.count} supplementary groups and the lowest "
                f"{len(self.gids)} were captured (up to gid {top}); gid {kgid} is above them")
