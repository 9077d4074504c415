"""Facts: one observed value each, with where it came from.

A fact is keyed by a dotted name (`node.mode`, `process.gid_map`,
`host.owner_groups`) so verdict evidence can cite it, and it is JSON-able so
`Event.facts` round-trips through the journal for offline `explain`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Optional

LIVE = "live"          # read from /proc, /sys, /etc... now
KERNEL = "kernel"      # captured in the kernel with the event
INFERRED = "inferred"  # derived from other facts (the rule is in `origin`)
CACHED = "cached"      # taken from the per-userns/cgroup cache: seen live earlier

SOURCES = (LIVE, KERNEL, INFERRED, CACHED)


@dataclass(frozen=True)
class Fact:
    value: Any
    source: str
    origin: str = ""  # the file or rule it came from

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "source": self.source, "origin": self.origin}

    @classmethod
    def from_json(cls, d: Any) -> "Fact":
        if not isinstance(d, dict) or "value" not in d:
            raise ValueError("fact must be an object with a value")
        source = str(d.get("source", INFERRED))
        if source not in SOURCES:
            raise ValueError(f"unknown fact source {source!r}")
        return cls(d["value"], source, str(d.get("origin", "")))


class SkipCounter:
    """Counts malformed input that parsers skipped, by a bounded reason."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def skip(self, reason: str) -> None:
        self.counts[reason] += 1

    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: "SkipCounter") -> None:
        self.counts.update(other.counts)


class Facts:
    """A mapping of fact name -> Fact, plus the parse skips met on the way."""

    def __init__(self, facts: Optional[dict[str, Fact]] = None) -> None:
        self._facts: dict[str, Fact] = dict(facts or {})
        self.skips = SkipCounter()

    def put(self, name: str, value: Any, source: str, origin: str = "") -> None:
        if value is None:
            return
        self._facts[name] = Fact(value, source, origin)

    def put_fact(self, name: str, fact: Fact) -> None:
        self._facts[name] = fact

    def update(self, other: "Facts", source_override: Optional[str] = None) -> None:
        for name, fact in other.items():
            if name in self._facts:
                continue  # what we observed for this process wins over shared facts
            if source_override:
                fact = Fact(fact.value, source_override, fact.origin)
            self._facts[name] = fact
        self.skips.merge(other.skips)

    def get(self, name: str, default: Any = None) -> Any:
        fact = self._facts.get(name)
        return default if fact is None else fact.value

    def fact(self, name: str) -> Optional[Fact]:
        return self._facts.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._facts

    def items(self) -> Iterator[tuple[str, Fact]]:
        return iter(sorted(self._facts.items()))

    def names(self) -> list[str]:
        return sorted(self._facts)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: fact.to_json() for name, fact in self.items()}
        if self.skips.counts:
            out["_skipped"] = dict(self.skips.counts)
        return out

    @classmethod
    def from_json(cls, d: Any) -> "Facts":
        if not isinstance(d, dict):
            raise ValueError("facts must be a JSON object")
        out = cls()
        for name, raw in d.items():
            if name == "_skipped":
                if isinstance(raw, dict):
                    out.skips.counts.update({str(k): int(v) for k, v in raw.items()})
                continue
            out._facts[str(name)] = Fact.from_json(raw)
        return out
