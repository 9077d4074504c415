"""The id map model: one uid_map or gid_map, ids inside a user namespace <-> ids
in its parent (read from the initial namespace: kernel ids).  Parsed here once,
used by enrichment, the verdict and the kernel-differential test alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from tracer.facts import SkipCounter
from tracer.enrichment.parse_proc import decimal

ID_LIMIT = 2 ** 32


@dataclass(frozen=True)
class IdMapRange:
    inside: int
    outside: int
    count: int


@dataclass(frozen=True)
class IdMap:
    ranges: tuple[IdMapRange, ...] = ()

    @classmethod
    def parse(cls, text: str, skips: Optional[SkipCounter] = None, what: str = "id_map") -> "IdMap":
        """/proc/PID/uid_map or gid_map: `inside outside count` per line; bad lines
        are skipped and counted."""
        skips = skips if skips is not None else SkipCounter()
        ranges = []
        for line in text.splitlines():
            parts = line.split()
            if not parts:
                continue
            numbers = [decimal(p) for p in parts]
            if len(parts) != 3 or None in numbers:
                skips.skip(f"{what}:bad_line")
                continue
            inside, outside, count = (int(n or 0) for n in numbers)
            if count == 0 or inside + count > ID_LIMIT or outside + count > ID_LIMIT:
                skips.skip(f"{what}:bad_range")
                continue
            ranges.append(IdMapRange(inside, outside, count))
        return cls(tuple(ranges))

    @classmethod
    def from_rows(cls, rows: Any) -> "IdMap":
        """From the fact's JSON rows [[inside, outside, count], ...] (validated)."""
        text = "\n".join(" ".join(str(v) for v in row) for row in rows or [] if isinstance(row, list))
        return cls.parse(text)

    def rows(self) -> list[list[int]]:
        return [[r.inside, r.outside, r.count] for r in self.ranges]

    def to_inside(self, outside_id: int) -> Optional[int]:
        for r in self.ranges:
            if r.outside <= outside_id < r.outside + r.count:
                return r.inside + (outside_id - r.outside)
        return None

    def to_outside(self, inside_id: int) -> Optional[int]:
        for r in self.ranges:
            if r.inside <= inside_id < r.inside + r.count:
                return r.outside + (inside_id - r.inside)
        return None
