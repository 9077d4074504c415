"""Per-container rate limit on distinct denial events.

The kernel already folds repeats of one (process, node, errno) into exact
counts; what it cannot fold is a storm of *distinct* denials (random paths,
fresh processes) from one container.  Each cgroup gets a token bucket; events
over its rate are dropped before enrichment and counted, never silently.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Hashable

from tracer.event import Event


def bucket_key(event: Event) -> Hashable:
    """The container an event belongs to: its cgroup, else its user namespace, else its uid."""
    p = event.process
    if p.cgroup_id is not None and p.cgroup_id > 1:
        return ("cgroup", p.cgroup_id)
    if p.userns.level is not None and p.userns.level > 0 and p.userns.inum:
        return ("userns", p.userns.inum)
    return ("uid", p.uid)  # None (unknown) is one bucket of its own


class RateLimiter:
    def __init__(self, per_second: float, burst: int, max_buckets: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if per_second <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate, self.burst, self.max_buckets, self.clock = per_second, float(burst), max_buckets, clock
        self._buckets: "OrderedDict[Hashable, tuple[float, float]]" = OrderedDict()

    def allow(self, event: Event) -> bool:
        key = bucket_key(event)
        now = self.clock()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > self.max_buckets:  # least recently seen container first
            self._buckets.popitem(last=False)
        return allowed


def configured(per_second: float, burst: int) -> "RateLimiter | None":
    """The limiter a configuration asks for; None when the rate is 0 (no limit)."""
    return RateLimiter(per_second, burst) if per_second > 0 else None
