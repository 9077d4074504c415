"""Runtime state as untrusted input: the files and the init pid a state
directory names, checked against who owns that directory.

Rootless runtimes keep their state in the user's own `/run/user/UID` (or
`/tmp/podman-run-UID`), so whatever is there was written by that user, not by
a runtime we trust: a FIFO named `state.json` (an open would block forever), a
symlink to a root-owned file, a 4 GiB file, a state naming pid 1 so that the
host would be snapshotted under a name the user chose.  `StateFiles` reads for
one state directory's owner:

- files open non-blocking, without following a final symlink, regular files
  only, no larger than the caller's cap;
- under a directory owned by a user (not root), a file must be that user's own;
- an init pid must run in a user namespace that user created (not the initial
  one): rootless containers always have one.

A refusal is counted by its reason through `count` (the snapshot store's
counter, taken under its lock), never raised.
"""

from __future__ import annotations

import os
import stat
from typing import Callable, Optional

from tracer.enrichment.backfill import userns_chain

STATE_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
ROOT_UID = 0


def _no_count(_reason: str) -> None:
    return None


def read_sized(fd: int, size: int, limit: int) -> bytes:
    """Up to `limit` + 1 bytes of a regular file whose fstat said `size`: what
    it holds, plus whatever it grew by (so a caller sees it passed `limit`).
    One read of the size it has, not of the limit: read() allocates what it is
    asked for (4 MiB per state.json, ~100 us a file measured)."""
    want = min(size, limit) + 1
    data = os.read(fd, want)
    if len(data) < want or len(data) > limit:
        return data
    return data + os.read(fd, limit + 1 - len(data))  # it grew since the fstat


class StateFiles:
    """Reads for one state directory, trusted as far as its owner is: root's
    (the runtime's own) or a user's (that user's word only about that user)."""

    def __init__(self, owner: int = ROOT_UID, count: Callable[[str], None] = _no_count) -> None:
        self.owner = owner
        self.count = count

    @classmethod
    def of(cls, directory: str, count: Callable[[str], None] = _no_count) -> "Optional[StateFiles]":
        """For the directory itself, by its owner (lstat: a symlink is no state dir)."""
        try:
            st = os.lstat(directory)
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            count("state_not_a_directory")
            return None
        return cls(st.st_uid, count)

    @property
    def rootless(self) -> bool:
        return self.owner != ROOT_UID

    def read(self, path: str, limit: int, tail: bool = False) -> Optional[bytes]:
        """At most `limit` bytes of a regular file (its last `limit` with `tail`);
        None when absent or refused.  Without `tail` a larger file is refused whole:
        a truncated JSON document is not a smaller one."""
        try:
            fd = os.open(path, STATE_FILE_FLAGS)
        except OSError as err:
            if err.errno == 40:  # ELOOP: the last component is a symlink
                self.count("state_symlink")
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self.count("state_not_regular")
                return None
            if self.rootless and st.st_uid != self.owner:
                self.count("state_wrong_owner")
                return None
            if st.st_size > limit and not tail:
                self.count("state_too_large")
                return None
            if tail and st.st_size > limit:
                os.lseek(fd, st.st_size - limit, os.SEEK_SET)
            data = read_sized(fd, st.st_size, limit)
            if len(data) > limit and not tail:  # grew since the fstat
                self.count("state_too_large")
                return None
            return data[:limit]
        except OSError:
            return None
        finally:
            os.close(fd)

    def init_pid(self, proc_root: str, pid: Optional[int]) -> tuple[Optional[int], Optional[int]]:
        """(the pid, its user namespace inode) when the pid may be this directory's
        container init; (None, None) when it may not (counted).  Root's state is the
        runtime's own: any pid.  A user's: a process in a user namespace that user
        created, never the initial one (pid 1, any host process)."""
        if pid is None or pid <= 0:
            return None, None
        if not self.rootless:
            return pid, None
        found = userns_chain(os.path.join(proc_root, str(pid), "ns", "user"))
        if found is None:
            self.count("state_pid_unverified")  # gone already: nothing is read from it
            return None, None
        if found.level == 0:
            self.count("state_pid_initial_userns")
            return None, None
        if found.top_owner != self.owner:
            self.count("state_pid_other_owner")
            return None, None
        return pid, found.inum

    def same_init(self, proc_root: str, pid: int, userns_inum: Optional[int]) -> bool:
        """After the snapshot: the pid still runs in the namespace we checked (it
        was not reused by another process while we read)."""
        if userns_inum is None:
            return True
        try:
            return os.stat(os.path.join(proc_root, str(pid), "ns", "user")).st_ino == userns_inum
        except OSError:
            return False
