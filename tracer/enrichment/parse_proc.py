"""Pure parsers for /proc and cgroup files.

Each takes the file's text and a `SkipCounter`; a malformed line is skipped and
counted with a bounded reason, never raised.  Results are plain, JSON-able data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from tracer.facts import SkipCounter
from tracer.sensors.gpu_nodes import parse_proc_devices  # the one /proc/devices parser

MAX_DECIMAL_DIGITS = 20  # a u64; also far below int()'s 4300-digit limit


def decimal(text: str) -> Optional[int]:
    """A non-negative ASCII decimal, else None.  str.isdigit() alone is not enough:
    it accepts '²' and other Unicode digits that int() rejects."""
    if not 0 < len(text) <= MAX_DECIMAL_DIGITS or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


@dataclass(frozen=True)
class Mount:
    mount_id: int
    parent_id: int
    dev: str  # "major:minor" of the filesystem
    root: str
    mount_point: str
    options: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...] = field(default=())


def _unescape_mount_field(raw: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal
    out, i = [], 0
    while i < len(raw):
        if raw[i] == "\\" and i + 3 < len(raw) and all(c in "01234567" for c in raw[i + 1:i + 4]):
            out.append(chr(int(raw[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str, skips: SkipCounter) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split(" ")
        try:
            sep = parts.index("-", 6)
        except ValueError:
            skips.skip("mountinfo:no_separator")
            continue
        mount_id, parent_id = decimal(parts[0]), decimal(parts[1])
        if sep + 3 > len(parts) or mount_id is None or parent_id is None:
            skips.skip("mountinfo:bad_line")
            continue
        mounts.append(Mount(
            mount_id=mount_id, parent_id=parent_id, dev=parts[2],
            root=_unescape_mount_field(parts[3]),
            mount_point=_unescape_mount_field(parts[4]),
            options=tuple(parts[5].split(",")), fstype=parts[sep + 1],
            source=_unescape_mount_field(parts[sep + 2]),
            super_options=tuple(parts[sep + 3].split(",")) if sep + 3 < len(parts) else (),
        ))
    return mounts


def mount_holding(path: str, mounts: list[Mount]) -> Optional[Mount]:
    """The mount a path lies on: longest mount point prefix, the later one when stacked."""
    best: Optional[Mount] = None
    for mount in mounts:
        mp = mount.mount_point.rstrip("/") or "/"
        if mp == "/" or path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) >= len(best.mount_point.rstrip("/") or "/"):
                best = mount
    return best


def parse_status(text: str, skips: SkipCounter) -> dict[str, str]:
    """/proc/PID/status: `Key:\\tvalue` lines."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep or not key or " " in key.strip():
            skips.skip("status:bad_line")
            continue
        out[key.strip()] = value.strip()
    return out


def status_ints(status: dict[str, str], key: str, skips: SkipCounter) -> Optional[list[int]]:
    raw = status.get(key)
    if raw is None:
        return None
    try:
        return [int(p) for p in raw.split()]
    except ValueError:
        skips.skip(f"status:bad_{key}")
        return None


def status_hex(status: dict[str, str], key: str, skips: SkipCounter) -> Optional[int]:
    raw = status.get(key)
    if raw is None:
        return None
    try:
        return int(raw, 16)
    except ValueError:
        skips.skip(f"status:bad_{key}")
        return None


@dataclass(frozen=True)
class CgroupLine:
    hierarchy: int
    controllers: tuple[str, ...]
    path: str


def parse_proc_cgroup(text: str, skips: SkipCounter) -> list[CgroupLine]:
    """/proc/PID/cgroup: `hierarchy-ID:controller-list:path`; v2 is `0::path`."""
    out = []
    for line in text.splitlines():
        if not line:
            continue
        parts = line.split(":", 2)
        hierarchy = decimal(parts[0]) if len(parts) == 3 else None
        if hierarchy is None or not parts[2].startswith("/"):
            skips.skip("cgroup:bad_line")
            continue
        ctrls = tuple(c for c in parts[1].split(",") if c)
        out.append(CgroupLine(hierarchy, ctrls, parts[2]))
    return out




@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/PID/stat a timeline needs."""

    comm: str
    ppid: int
    session: int
    start_ticks: int   # clock ticks after boot


def parse_proc_stat(text: str, skips: SkipCounter) -> Optional[ProcStat]:
    """/proc/PID/stat: `pid (comm) state ppid pgrp session ... starttime(22) ...`;
    comm may hold spaces and parentheses, so fields are counted after the last ')'."""
    open_at, close_at = text.find("("), text.rfind(")")
    fields = text[close_at + 1:].split() if 0 <= open_at < close_at else []
    if len(fields) < 20:
        skips.skip("stat:bad_line")
        return None
    ppid, session, start = decimal(fields[1]), decimal(fields[3]), decimal(fields[19])
    if ppid is None or session is None or start is None:
        skips.skip("stat:bad_field")
        return None
    return ProcStat(text[open_at + 1:close_at][:64], ppid, session, start)


def parse_boot_time(text: str, skips: SkipCounter) -> Optional[int]:
    """`btime` of /proc/stat: the boot time in epoch seconds."""
    for line in text.splitlines():
        if line.startswith("btime "):
            value = decimal(line.split()[1]) if len(line.split()) == 2 else None
            if value is None:
                skips.skip("proc_stat:bad_btime")
            return value
    skips.skip("proc_stat:no_btime")
    return None
