"""The journal: every event with its verdict as JSON lines under the state directory.

Crash safety comes from how lines are written, not from a recovery log: each
line goes to the kernel in one `write()` on an O_APPEND descriptor as soon as it
is consumed, so a SIGKILL can at most cut the line being written.  On open, a
file that does not end in a newline gets one, so the cut line stays alone; the
reader skips it and counts it (`JournalRead.lost`).  A full disk discards the
event (counted), never stops the daemon, and writing resumes when space returns.

Layout: ``<dir>/current.jsonl`` plus rotated ``<dir>/journal-<UTC stamp>-<seq>.jsonl``,
oldest first by name; rotation is by size, retention by count and age.
"""

from __future__ import annotations

import datetime as _dt
import errno as errno_mod
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from tracer.event import Event

CURRENT = "current.jsonl"
ROTATED_PREFIX = "journal-"


def journal_files(directory: str) -> list[str]:
    """Rotated files oldest first, then the current file (those that exist)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    rotated = sorted(n for n in names if n.startswith(ROTATED_PREFIX) and n.endswith(".jsonl"))
    out = [os.path.join(directory, n) for n in rotated]
    if CURRENT in names:
        out.append(os.path.join(directory, CURRENT))
    return out


@dataclass
class JournalSink:
    directory: str
    max_file_bytes: int = 16 * 1024 * 1024
    max_files: int = 8
    max_age_days: float = 30.0
    fsync_interval_s: float = 1.0
    on_discard: Callable[[str], None] = lambda reason: None  # bounded reason, e.g. "disk_full"
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self.fd = -1
        self.size = 0
        self.lines_written = 0
        self.discarded: Counter[str] = Counter()
        self._dirty = False
        self._last_sync = time.monotonic()
        self._broken_tail = False  # a failed write may have left half a line
        os.makedirs(self.directory, mode=0o750, exist_ok=True)
        self._open_current()

    def _open_current(self) -> None:
        path = os.path.join(self.directory, CURRENT)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self.size = os.fstat(self.fd).st_size
        self._broken_tail = self.size > 0 and not _ends_with_newline(path)

    def consume(self, event: Event) -> None:
        line = (json.dumps(event.to_json(), separators=(",", ":")) + "\n").encode("utf-8")
        if self.size and self.size + len(line) > self.max_file_bytes:
            self._rotate_quietly()
        try:
            if self._broken_tail:
                self._write_all(b"\n")  # keep the cut line apart from the next one
                self._broken_tail = False
            self._write_all(line)
        except OSError as exc:
            reason = "disk_full" if exc.errno in (errno_mod.ENOSPC, errno_mod.EDQUOT) else "write_error"
            self._broken_tail = True
            self.discarded[reason] += 1
            self.on_discard(reason)
            return
        self.lines_written += 1
        self._dirty = True
        if time.monotonic() - self._last_sync >= self.fsync_interval_s:
            self.sync()

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            self.size += written
            view = view[written:]

    def sync(self) -> None:
        if self._dirty and self.fd >= 0:
            try:
                os.fsync(self.fd)
            except OSError:
                pass  # counted where the write failed; fsync errors repeat there
            self._dirty = False
        self._last_sync = time.monotonic()

    def _rotate_quietly(self) -> None:
        try:
            self.rotate()
        except OSError:
            self.discarded["rotate_error"] += 1  # keep appending to the current file

    def rotate(self) -> None:
        """Close the current file under a rotated name and start a new one."""
        self.sync()
        stamp = _dt.datetime.fromtimestamp(self.clock(), _dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        seq = len(journal_files(self.directory))
        target = os.path.join(self.directory, f"{ROTATED_PREFIX}{stamp}-{seq:06d}.jsonl")
        os.rename(os.path.join(self.directory, CURRENT), target)
        os.close(self.fd)
        self._open_current()
        self.apply_retention()

    def apply_retention(self) -> None:
        rotated = journal_files(self.directory)
        rotated = [p for p in rotated if os.path.basename(p) != CURRENT]
        excess = rotated[:max(len(rotated) - self.max_files, 0)]
        cutoff = self.clock() - self.max_age_days * 86400 if self.max_age_days else None
        for path in rotated:
            try:
                if path in excess or (cutoff is not None and os.stat(path).st_mtime < cutoff):
                    os.unlink(path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        if self.fd >= 0:
            self.sync()
            os.close(self.fd)
            self.fd = -1


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


@dataclass
class JournalRead:
    events: list[Event] = field(default_factory=list)
    lost: Counter[str] = field(default_factory=Counter)  # reason -> lines that did not read back
    files: int = 0

    @property
    def lost_total(self) -> int:
        return sum(self.lost.values())


MAX_LINE_BYTES = 4 << 20  # explained lines are ~10 kB; a longer one was not written by us


def iter_lines(directory: str, lost: Optional[Counter[str]] = None,
               max_line: int = MAX_LINE_BYTES) -> Iterator[tuple[str, int, bytes, bool]]:
    """(file, line number, raw line, complete) for every line, oldest first, read one
    line at a time (a journal of any size streams in bounded memory): a line longer
    than `max_line` is skipped and counted in `lost` as `line_too_long`."""
    for path in journal_files(directory):
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            continue  # rotated away while we listed
        with handle:
            number = 0
            while True:
                raw = handle.readline(max_line + 1)
                if not raw:
                    break
                number += 1
                if len(raw) > max_line and not raw.endswith(b"\n"):
                    while raw and not raw.endswith(b"\n"):  # the rest of it, in bounded reads
                        raw = handle.readline(max_line)
                    if lost is not None:
                        lost["line_too_long"] += 1
                    continue
                complete = raw.endswith(b"\n")
                raw = raw.rstrip(b"\n")
                if raw:
                    yield path, number, raw, complete


@dataclass
class JournalStream:
    """Events of a journal as they are read; `lost` and `read` fill in as it goes."""
    directory: str
    since: Optional[float] = None
    lost: Counter[str] = field(default_factory=Counter)  # reason -> lines that did not read back
    read: int = 0
    files: int = 0

    def __iter__(self) -> Iterator[Event]:
        self.files = len(journal_files(self.directory))
        for _path, _number, raw, complete in iter_lines(self.directory, self.lost):
            try:
                event = Event.from_json(json.loads(raw))
            except (ValueError, KeyError, TypeError, RecursionError):
                self.lost["unterminated_line" if not complete else "unreadable_line"] += 1
                continue
            if self.since is None or event.time >= self.since:
                self.read += 1
                yield event

    @property
    def lost_total(self) -> int:
        return sum(self.lost.values())


def read_journal(directory: str, since: Optional[float] = None) -> JournalRead:
    """Every event that reads back (at or after `since`), and a count of what did not."""
    stream = JournalStream(directory, since)
    events = list(stream)
    return JournalRead(events=events, lost=stream.lost, files=stream.files)
