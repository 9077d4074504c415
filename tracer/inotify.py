"""Linux inotify through ctypes: the one reader that the GPU node watcher
(sensors/node_watch.py) and the container tracker (enrichment/container_tracker.py)
share, so that the struct inotify_event layout and the flags exist in one place.

    watcher = Inotify()                         # non-blocking, close-on-exec
    wd = watcher.add_watch(b"/dev", IN_CREATE)  # -1 when the kernel refuses
    for wd, mask, name in watcher.events(): ...
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from typing import Iterator

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE, IN_DELETE_SELF = 0x40, 0x80, 0x100, 0x200, 0x400
IN_Q_OVERFLOW, IN_IGNORED, IN_MASK_ADD, IN_ISDIR = 0x4000, 0x8000, 0x20000000, 0x40000000
IN_ONLYDIR, IN_DONT_FOLLOW = 0x01000000, 0x02000000
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
EVENT_HEAD = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name
READ_BYTES = 64 << 10


def parse_events(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(wd, mask, name without its NUL padding) for each event in `data`."""
    offset = 0
    while offset + EVENT_HEAD.size <= len(data):
        wd, mask, _cookie, length = EVENT_HEAD.unpack_from(data, offset)
        raw = data[offset + EVENT_HEAD.size:offset + EVENT_HEAD.size + length]
        offset += EVENT_HEAD.size + length
        yield wd, mask, raw.split(b"\0", 1)[0]


class Inotify:
    """One inotify instance.  `fd` can be given to select/poll."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")

    def add_watch(self, path: bytes, mask: int) -> int:
        return int(self._libc.inotify_add_watch(self.fd, path, mask))

    def events(self) -> list[tuple[int, int, bytes]]:
        """The events pending now (none when nothing is pending); OSError if the fd broke."""
        try:
            data = os.read(self.fd, READ_BYTES)
        except BlockingIOError:
            return []
        return list(parse_events(data))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
