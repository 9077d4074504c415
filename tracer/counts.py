"""Cumulative counts -> increments: the one model every stage uses for it.

Two kinds of cumulative count reach gputrace:

* an aggregate's exact count (a denial event opens it with its count, `update`
  events carry the new total); updates can arrive late, so a lower value adds
  nothing (``on_decrease="ignore"``);
* a kernel counter read again and again (audit's ``lost``); it goes down only
  when someone reset it (``auditctl --reset-lost``) or it wrapped, so the new
  value is all new (``on_decrease="restart"``).

The pipeline's summary, the Prometheus sink, the report and the audit sensor all
turn counts into increments through `CountDeltas`; the bound on remembered keys
(oldest forgotten first) keeps a storm of distinct keys from growing memory.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Hashable, Optional, TypeVar

T = TypeVar("T")
MAX_KEYS = 65536


class CountDeltas(Generic[T]):
    """Per key: the last cumulative count seen, and a caller's payload (labels,
    an aggregate) that rides along with it."""

    def __init__(self, max_keys: int = MAX_KEYS, on_decrease: str = "ignore") -> None:
        if on_decrease not in ("ignore", "restart"):
            raise ValueError(f"on_decrease must be 'ignore' or 'restart', not {on_decrease!r}")
        self.max_keys = max_keys
        self.restart_on_decrease = on_decrease == "restart"
        self._seen: "OrderedDict[Hashable, tuple[int, Optional[T]]]" = OrderedDict()
        self.forgotten = 0  # keys pushed out by the bound

    def start(self, key: Hashable, count: int, payload: Optional[T] = None) -> int:
        """A new series for `key` (a denial event): all of `count` is new."""
        self._put(key, count, payload)
        return count

    def advance(self, key: Hashable, count: int) -> Optional[int]:
        """The increment from the last count of `key` to `count`; None when `key`
        was never started (or forgotten): the caller decides what that means."""
        known = self._seen.get(key)
        if known is None:
            return None
        last, payload = known
        if count >= last:
            delta = count - last
        elif self.restart_on_decrease:
            delta = count
        else:
            delta = 0
            count = last
        self._put(key, count, payload)
        return delta

    def payload(self, key: Hashable) -> Optional[T]:
        known = self._seen.get(key)
        return None if known is None else known[1]

    def last(self, key: Hashable) -> Optional[int]:
        known = self._seen.get(key)
        return None if known is None else known[0]

    def __len__(self) -> int:
        return len(self._seen)

    def _put(self, key: Hashable, count: int, payload: Optional[T]) -> None:
        self._seen[key] = (count, payload)
        self._seen.move_to_end(key)
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
            self.forgotten += 1


class KernelCounter:
    """A kernel counter read now and then: the total it grew by since the first
    reading, surviving resets and wraps (each counted as a restart from zero)."""

    def __init__(self, first_reading: int) -> None:
        self._deltas: CountDeltas[None] = CountDeltas(max_keys=1, on_decrease="restart")
        self._deltas.start("value", first_reading)
        self.total = 0

    def read(self, value: int) -> int:
        self.total += self._deltas.advance("value", value) or 0
        return self.total
