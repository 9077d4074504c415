"""Paths resolved as a process whose root is ROOT sees them, with no way out of ROOT.

The sensor (matching a refused open by device number) and the enrichment (node
stat, a container's /etc/group) both look inside another process's root, a
directory its owner controls.  Both go through here:

    fd = open_in_root("/proc/PID/root", "/dev/nvidia0", os.O_PATH)
    text = read_in_root("/proc/PID/root", "/etc/group")

openat2(RESOLVE_IN_ROOT) lets the kernel resolve the whole path as chroot(ROOT)
would.  Where openat2 is missing (kernels before 5.6, seccomp profiles that
answer ENOSYS) the path is walked one component at a time from file
descriptors we hold (`walk_in_root`): each step is an openat relative to the
previous directory's fd with O_NOFOLLOW, symlinks are read from their own fd,
`..` returns to the directory fd we came from, so swapping a component for a
symlink between steps changes nothing we already hold.  Both are race-free.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from typing import Optional

MAX_SYMLINKS = 40  # the kernel's own limit (MAXSYMLINKS)
MAX_FILE_BYTES = 1 << 20

_SYS_OPENAT2 = 437  # the same on x86_64 and arm64
_RESOLVE_NO_MAGICLINKS, _RESOLVE_IN_ROOT = 0x02, 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def resolve_in_root(root: str, path: str) -> Optional[str]:
    """The host path of `path` as seen by a process whose root is `root`, as a
    string (for showing where a file was found; opening goes through
    `open_in_root`, since a path string can be swapped under us).

    Symlinks are followed by hand: absolute targets restart at `root` and `..`
    stops at `root`, as chroot would, so nothing leads outside.  None if missing.
    """
    pending = [p for p in path.split("/") if p]
    done: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = os.path.join(root, *done, part)
        try:
            st = os.lstat(candidate)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):  # open() follows the last one too
            links += 1
            if links > MAX_SYMLINKS:
                return None
            try:
                target = os.readlink(candidate)
            except OSError:  # replaced or gone since the lstat (the process exited)
                return None
            if target.startswith("/"):
                done = []
            pending = [p for p in target.split("/") if p] + pending
            continue
        done.append(part)
    return os.path.join(root, *done)


def _openat2_in_root(root_fd: int, path: str, flags: int) -> int:
    """openat2(root_fd, path, RESOLVE_IN_ROOT|RESOLVE_NO_MAGICLINKS).  -1 with
    errno set on failure."""
    how = _OpenHow(flags, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    return int(_libc.syscall(_SYS_OPENAT2, root_fd, os.fsencode(path), ctypes.byref(how),
                             ctypes.sizeof(how)))


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def walk_in_root(root_fd: int, path: str, flags: int) -> Optional[int]:
    """`path` opened under `root_fd` one component at a time, never by a path
    string: what openat2(RESOLVE_IN_ROOT) does, without it.  None when missing,
    refused, a loop, or a component changed kind while we looked."""
    if not path:
        return None
    stack = [os.dup(root_fd)]  # directory fds from the root down to where we are
    pending = _components(path)
    links = 0
    try:
        while pending:
            part = pending.pop(0)
            if part == ".":
                continue
            if part == "..":
                if len(stack) > 1:  # never above the root, never the kernel's ".."
                    os.close(stack.pop())
                continue
            fd = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
            kind = stat.S_IFMT(os.fstat(fd).st_mode)
            if kind == stat.S_IFLNK:
                links += 1
                try:
                    target = os.readlink("", dir_fd=fd)  # the link this fd holds
                finally:
                    os.close(fd)
                if links > MAX_SYMLINKS:
                    return None
                if target.startswith("/"):
                    _close_all(stack[1:])
                    del stack[1:]
                if not target:
                    return None
                pending = _components(target) + pending
                continue
            if pending and kind != stat.S_IFDIR:
                os.close(fd)
                return None
            if not pending:
                return _final(stack[-1], part, fd, flags)
            stack.append(fd)
        return _final(stack[-1], ".", os.dup(stack[-1]), flags)  # ended on a directory
    except OSError:
        return None
    finally:
        _close_all(stack)


def _components(path: str) -> list[str]:
    """The names to walk; a trailing '/' asks for a directory, as "." does."""
    return [p for p in path.split("/") if p] + (["."] if path.endswith("/") else [])


def _final(parent: int, name: str, held: int, flags: int) -> Optional[int]:
    """The last component with the caller's flags.  O_PATH: the fd we hold.  Else
    opened again by name with O_NOFOLLOW and kept only if it is the same inode."""
    if flags & os.O_PATH:
        return held
    try:
        want = os.fstat(held)
        if name == ".":
            fd = os.open(f"/proc/self/fd/{held}", flags | os.O_CLOEXEC)
        else:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        got = os.fstat(fd)
        if (got.st_dev, got.st_ino) != (want.st_dev, want.st_ino):
            os.close(fd)
            return None
        return fd
    finally:
        os.close(held)


def open_in_root(root: str, path: str, flags: int) -> Optional[int]:
    """An fd for `path` opened as the process whose root is `root` would see it,
    with no way out of that root; None when missing or refused."""
    try:
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return open_in_root_fd(root_fd, path, flags)
    finally:
        os.close(root_fd)


def open_in_root_fd(root_fd: int, path: str, flags: int) -> Optional[int]:
    """`open_in_root` from a root directory fd already held (several files of one root)."""
    fd = _openat2_in_root(root_fd, path, flags | os.O_CLOEXEC)
    if fd < 0 and ctypes.get_errno() == errno.ENOSYS:
        try:
            return walk_in_root(root_fd, path, flags)
        except OSError:
            return None
    return fd if fd >= 0 else None


def read_in_root(root: str, path: str, limit: int = MAX_FILE_BYTES,
                 owner: Optional[int] = None) -> Optional[str]:
    """Read `path` as the process whose root is `root` would, but with no way out:
    a symlink swapped in after any check still cannot lead outside the container.
    Regular files only (no fifo can block us), non-blocking, at most `limit` bytes;
    with `owner`, only a file that uid owns."""
    return _read_fd(open_in_root(root, path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK),
                    limit, owner)


def read_in_root_fd(root_fd: int, path: str, limit: int = MAX_FILE_BYTES,
                    owner: Optional[int] = None) -> Optional[str]:
    """`read_in_root` from a root directory fd already held."""
    return _read_fd(open_in_root_fd(root_fd, path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK),
                    limit, owner)


def _read_fd(fd: Optional[int], limit: int, owner: Optional[int]) -> Optional[str]:
    if fd is None:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # no fifos, devices or sockets
            return None
        if owner is not None and st.st_uid != owner:
            return None
        data = os.read(fd, min(st.st_size, limit) + 1)  # read() allocates what it is asked for
        if len(data) > st.st_size:  # it grew since the fstat
            data += os.read(fd, max(0, limit - len(data)))
        return data[:limit].decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)
