"""Facts: one observed value each, with where it came from.

Every fact on an event has one shape, (name, value, source, origin), whichever
stage added it: the sensor (audit's exe/cwd/proctitle/keys, BPF loss markers,
node lifecycle changes) or enrichment (`node.mode`, `process.gid_map`, ...).
A fact is keyed by a dotted name so verdict evidence can cite it; values are
typed (ints, bools, lists, dicts) and JSON-able, so `Event.facts` round-trips
through the journal for offline `explain`.  Stages add facts and never
overwrite another stage's: `Facts.update` keeps what is already there.
"""

from __future__ import annotations

import base64
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Optional

LIVE = "live"          # read from /proc, /sys, /etc... now
KERNEL = "kernel"      # captured in the kernel with the event
INFERRED = "inferred"  # derived from other facts (the rule is in `origin`)
CACHED = "cached"      # taken from the per-userns/cgroup cache: seen live earlier
SENSOR = "sensor"      # reported by the sensor with the event (audit records, BPF flags)

SOURCES = (LIVE, KERNEL, INFERRED, CACHED, SENSOR)
# journals written before facts had one shape: {"audit": {...}} and bare sensor values
OLD_AUDIT_ORIGIN = "audit records"
OLD_BARE_NAMES = frozenset({"sensor.unaggregated", "sensor.path_unresolved",
                            "sensor.first_event_lost",
                            "node.change", "node.mode", "node.uid", "node.gid"})  # node events


def lossy_text(raw: "bytes | str") -> str:
    """Untrusted bytes (a path, a name) as text that every sink can encode: the
    UTF-8 reading, U+FFFD for bytes that are not UTF-8.  A str that came from
    os.fsdecode (surrogateescape) is turned back into its bytes first."""
    if isinstance(raw, str):
        raw = os.fsencode(raw)
    return raw.decode("utf-8", "replace")


def _encodable(text: str) -> bool:
    if not isinstance(text, str) or text.isascii():  # a caller's odd origin is not ours to judge
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _clean(value: Any) -> bool:
    if isinstance(value, str):
        return _encodable(value)
    if isinstance(value, list):
        return all(_clean(v) for v in value)
    if isinstance(value, dict):
        return all(_clean(k) and _clean(v) for k, v in value.items())
    return True


def _lossy_nested(value: Any) -> Any:
    """`value` itself when every str in it encodes (the common case: no copy)."""
    if _clean(value):
        return value
    if isinstance(value, str):
        return value if _encodable(value) else lossy_text(value)
    if isinstance(value, list):
        return [_lossy_nested(v) for v in value]
    if isinstance(value, dict):
        return {_lossy_nested(k): _lossy_nested(v) for k, v in value.items()}
    return value


def _old_bare_value(name: str, raw: Any) -> Any:
    """An old sensor's bare value, checked for the type that sensor wrote."""
    if name.startswith("sensor."):
        ok = isinstance(raw, bool)
    elif name == "node.mode":
        ok = isinstance(raw, str) and 3 <= len(raw) <= 4 and all(c in "01234567" for c in raw)
    elif name in ("node.uid", "node.gid"):
        ok = isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < 1 << 32
    else:
        ok = isinstance(raw, str)
    if not ok:
        raise ValueError(f"fact {name!r} has a value of the wrong type")
    return raw


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

    def __len__(self) -> int:
        return len(self._facts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Facts):
            return NotImplemented
        return self._facts == other._facts and self.skips.counts == other.skips.counts

    def __repr__(self) -> str:
        return f"Facts({self.to_json()!r})"

    def put(self, name: str, value: Any, source: str, origin: str = "") -> None:
        """A str that carries os.fsdecode's surrogates (a path that is not UTF-8)
        is stored as put_bytes stores it; nested ones and origins become U+FFFD:
        no fact can make a sink fail to encode it."""
        if value is None:
            return
        if not _encodable(origin):
            origin = lossy_text(origin)
        if isinstance(value, str) and not _encodable(value):
            self.put_bytes(name, value, source, origin)
            return
        if isinstance(value, (list, dict)):
            value = _lossy_nested(value)
        self._facts[name] = Fact(value, source, origin)

    def put_bytes(self, name: str, raw: "bytes | str | None", source: str,
                  origin: str = "") -> None:
        """Untrusted bytes as a fact, losslessly, by the convention of Event JSON:
        the text when it is UTF-8, else U+FFFD for the bad bytes and a sibling
        `<name>_b64` fact with the exact bytes."""
        if raw is None:
            return
        if isinstance(raw, str):
            raw = os.fsencode(raw)
        text = lossy_text(raw)
        self.put(name, text, source, origin)
        if text.encode("utf-8") != raw:
            self.put(name + "_b64", base64.b64encode(raw).decode("ascii"), source, origin)

    def put_fact(self, name: str, fact: Fact) -> None:
        self._facts[name] = fact

    def update(self, other: "Facts", source_override: Optional[str] = None) -> None:
        """Add `other`'s facts; a name already here is kept, never overwritten."""
        for name, fact in other.items():
            if name in self._facts:
                continue  # what was observed first (sensor, then this process) wins
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

    def enriched(self) -> bool:
        """Whether a stage after the sensor has added facts (enrichment ran)."""
        return any(fact.source != SENSOR for fact in self._facts.values())

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: fact.to_json() for name, fact in self.items()}
        if self.skips.counts:
            out["_skipped"] = dict(self.skips.counts)
        return out

    @classmethod
    def from_json(cls, d: Any) -> "Facts":
        """Reads the one shape, and the older ones still found in journals:
        `{"audit": {key: value}}` and bare sensor values (`{"node.change": "created"}`)."""
        if not isinstance(d, dict):
            raise ValueError("facts must be a JSON object")
        out = cls()
        for name, raw in d.items():
            name = str(name)
            if name == "_skipped":
                if isinstance(raw, dict):
                    out.skips.counts.update({str(k): int(v) for k, v in raw.items()})
            elif isinstance(raw, dict) and "value" in raw:
                out._facts[name] = Fact.from_json(raw)
            elif name == "audit" and isinstance(raw, dict):
                for key, value in raw.items():
                    out._facts[f"audit.{key}"] = Fact(value, SENSOR, OLD_AUDIT_ORIGIN)
            elif name in OLD_BARE_NAMES:
                out._facts[name] = Fact(_old_bare_value(name, raw), SENSOR)
            else:
                raise ValueError(f"fact {name[:60]!r} must be an object with a value")
        return out

    def without(self, names: "set[str] | frozenset[str]") -> "Facts":
        """These facts less `names` (skips kept)."""
        out = Facts({name: fact for name, fact in self._facts.items() if name not in names})
        out.skips.merge(self.skips)
        return out

    def from_sensor(self) -> "Facts":
        """Only the facts the sensor reported with the event (a `sensor.*` fact may
        be cached: a node identity the sensor took from a container snapshot)."""
        return Facts({name: fact for name, fact in self._facts.items()
                      if fact.source == SENSOR or name.startswith("sensor.")})
