"""Pure parsers for /etc files, driver params, logind sessions and the ACL xattr.

Each takes the raw content and a `SkipCounter`; malformed input is skipped and
counted with a bounded reason, never raised.

`TextMemo` keeps what such a parser made of a text, by the exact text: every
container start reads files whose text repeats from one container to the next
(the runtime's default `devices.list`, one image's `/etc/group`).  The file is
still read each time (what it holds now is the fact); only parsing the very
same text again is skipped, and the malformed lines the parser counted are
counted again for each caller, so nothing about a file is borrowed from
another.  Bounded in entries and in text bytes; results must be immutable (a
tuple) or copied by the caller.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Iterator, Optional, TypeVar

from tracer.facts import SkipCounter
from tracer.enrichment.parse_proc import decimal


@dataclass(frozen=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


def colon_records(text: str, fields: int, numeric: tuple[int, ...], skips: SkipCounter,
                  reason: str) -> Iterator[tuple[list[str], list[int]]]:
    """The lines of a colon-separated /etc file as (fields, the `numeric` fields as
    ints); blank and comment lines pass, a line with another field count, an empty
    name or a bad number is skipped and counted as `reason`."""
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(":")
        numbers = [decimal(parts[i]) for i in numeric] if len(parts) == fields else [None]
        if not parts[0] or None in numbers:
            skips.skip(reason)
            continue
        yield parts, [n for n in numbers if n is not None]


def parse_group_file(text: str, skips: SkipCounter) -> list[GroupEntry]:
    """/etc/group: `name:password:gid:member,member`."""
    return [GroupEntry(parts[0], gid, tuple(m for m in parts[3].split(",") if m))
            for parts, (gid,) in colon_records(text, 4, (2,), skips, "group:bad_line")]


@dataclass(frozen=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int
    home: str


def parse_passwd_file(text: str, skips: SkipCounter) -> list[PasswdEntry]:
    """/etc/passwd: `name:password:uid:gid:gecos:home:shell`."""
    return [PasswdEntry(parts[0], uid, gid, parts[5])
            for parts, (uid, gid) in colon_records(text, 7, (2, 3), skips, "passwd:bad_line")]


def group_name(groups: list[GroupEntry], gid: int) -> Optional[str]:
    return next((g.name for g in groups if g.gid == gid), None)


def group_by_name(groups: list[GroupEntry], name: str) -> Optional[GroupEntry]:
    return next((g for g in groups if g.name == name), None)


def user_gids(user: PasswdEntry, groups: list[GroupEntry]) -> list[int]:
    """What initgroups() gives a login of this user: primary gid + listed groups."""
    gids = [user.gid] + [g.gid for g in groups if user.name in g.members]
    return sorted(set(gids))


def parse_nvidia_params(text: str, skips: SkipCounter) -> dict[str, object]:
    """/proc/driver/nvidia/params: `Name: value`; numbers are decimal, strings quoted."""
    out: dict[str, object] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not key or " " in key:
            skips.skip("nvidia_params:bad_line")
            continue
        number = decimal(value[1:] if value.startswith("-") else value)
        if number is not None:
            out[key] = -number if value.startswith("-") else number
        elif len(value) >= 2 and value[0] == value[-1] == '"':
            out[key] = value[1:-1]
        else:
            out[key] = value
    return out


def parse_logind_session(text: str, skips: SkipCounter) -> dict[str, str]:
    """/run/systemd/sessions/ID: systemd env-style `KEY=VALUE` lines."""
    out = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.replace("_", "").isalnum():
            skips.skip("logind_session:bad_line")
            continue
        out[key] = value
    return out


T = TypeVar("T")
MEMO_ENTRIES = 32
MEMO_TEXT_BYTES = 256 << 10   # all kept texts together
MEMO_ONE_TEXT = 64 << 10      # a larger text is parsed every time, never kept


class TextMemo(Generic[T]):
    """`memo(text, skips)` is `parse(text, skips)`, parsed once per distinct text."""

    def __init__(self, parse: Callable[[str, SkipCounter], T], max_entries: int = MEMO_ENTRIES,
                 max_bytes: int = MEMO_TEXT_BYTES) -> None:
        self.parse = parse
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[T, dict[str, int]]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __call__(self, text: str, skips: SkipCounter) -> T:
        with self._lock:
            kept = self._items.get(text)
            if kept is not None:
                self._items.move_to_end(text)
                self.hits += 1
        if kept is None:
            own = SkipCounter()
            kept = (self.parse(text, own), dict(own.counts))
            self._keep(text, kept)
        value, skipped = kept
        if skipped:
            skips.counts.update(skipped)
        return value

    def _keep(self, text: str, kept: tuple[T, dict[str, int]]) -> None:
        with self._lock:
            self.misses += 1
            if len(text) > MEMO_ONE_TEXT or text in self._items:
                return
            self._items[text] = kept
            self._bytes += len(text)
            while self._items and (len(self._items) > self.max_entries
                                   or self._bytes > self.max_bytes):
                old, _ = self._items.popitem(last=False)
                self._bytes -= len(old)

    def __len__(self) -> int:
        return len(self._items)
