"""What the container tracker may hold, per owner of the directories it watches.

Rootless state directories belong to their users, and every directory in them
costs the tracker an inotify watch (and, until its state is read, a pending
entry).  Without a bound per user, one user making 5,000 directories would use
the whole budget and blind the tracker for everyone else's containers.  So:

- at most `per_user` watches (and pending entries) on directories one user owns;
- all users together at most `total - root_reserve`: root's own state
  directories (/run/runc, docker's, containerd's) keep `root_reserve` to themselves;
- at most `total` in all.

Refusals are returned as bounded reasons for the caller to count.
"""

from __future__ import annotations

from collections import Counter
from typing import Generic, Hashable, Optional, TypeVar

MAX_WATCHES = 4096
USER_WATCHES = 512
ROOT_RESERVE = 1024
ROOT_UID = 0

K = TypeVar("K", bound=Hashable)


class OwnerBudget(Generic[K]):
    """Items (watch descriptors, pending paths) held per owner uid, bounded."""

    def __init__(self, total: int = MAX_WATCHES, per_user: int = USER_WATCHES,
                 root_reserve: int = ROOT_RESERVE) -> None:
        if not 0 <= root_reserve < total or per_user < 1:
            raise ValueError("tracker budget: need 0 <= root_reserve < total and per_user >= 1")
        self.total, self.per_user, self.root_reserve = total, per_user, root_reserve
        self._owner: dict[K, int] = {}
        self._held: Counter[int] = Counter()
        self._users = 0  # items held by owners other than root

    def __contains__(self, item: K) -> bool:
        return item in self._owner

    def __len__(self) -> int:
        return len(self._owner)

    def refusal(self, owner: int) -> Optional[str]:
        """Why one more item for `owner` would exceed a bound; None if it fits."""
        if len(self._owner) >= self.total:
            return "limit"
        if owner != ROOT_UID:
            if self._held[owner] >= self.per_user:
                return "user_budget"
            if self._users >= self.total - self.root_reserve:
                return "users_limit"
        return None

    def take(self, item: K, owner: int) -> Optional[str]:
        """Hold `item` for `owner` unless a bound refuses (the reason is returned)."""
        if item in self._owner:
            return None
        why = self.refusal(owner)
        if why is None:
            self._owner[item] = owner
            self._held[owner] += 1
            self._users += owner != ROOT_UID
        return why

    def release(self, item: K) -> Optional[int]:
        """Let go of `item`; its owner, or None if it was not held."""
        owner = self._owner.pop(item, None)
        if owner is not None:
            self._held[owner] -= 1
            if not self._held[owner]:
                del self._held[owner]
            self._users -= owner != ROOT_UID
        return owner

    def owner_of(self, item: K) -> Optional[int]:
        return self._owner.get(item)

    def held_by(self, owner: int) -> int:
        return self._held[owner]
