"""Reading files under the injected host roots: bounded, never raising."""

from __future__ import annotations

import os
import stat
from typing import Optional

MAX_FILE_BYTES = 1 << 20  # /proc and /etc files we read are far smaller
CHUNK_BYTES = 16 << 10    # /proc files report no size: read this much at a time


def read_bytes(path: str, limit: int = MAX_FILE_BYTES) -> Optional[bytes]:
    """At most `limit` bytes of the file, read to its end.  Chunk by chunk: a
    read() asking for the whole limit at once allocates it (1 MiB per small
    /proc file, measured at ~45 us of the ~50 us such a read took)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except (OSError, ValueError):
        return None
    try:
        first = os.read(fd, min(limit, CHUNK_BYTES))
        if not first or len(first) >= limit:
            return first
        chunks = [first]
        got = len(first)
        while got < limit:  # seq_file reads may stop short of the end: read to EOF
            chunk = os.read(fd, min(limit - got, CHUNK_BYTES))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_text(path: str, limit: int = MAX_FILE_BYTES) -> Optional[str]:
    raw = read_bytes(path, limit)
    return None if raw is None else raw.decode("utf-8", "replace")


REGULAR_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def read_regular(path: str, limit: int,
                 owner: Optional[int] = None) -> Optional[tuple[bytes, os.stat_result]]:
    """A configuration file's bytes and stat: a regular file only (a FIFO, a device or
    a socket under that name is never read, and the open cannot block), refused whole
    when larger than `limit`, and with `owner`, only when that uid or root owns it (a
    file in a user's home is that user's word only, never another's)."""
    try:
        fd = os.open(path, REGULAR_FLAGS)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit \
                or owner is not None and st.st_uid not in (owner, 0):
            return None
        data = os.read(fd, limit + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return (data, st) if len(data) <= limit else None


def read_regular_text(path: str, limit: int, owner: Optional[int] = None) -> Optional[str]:
    found = read_regular(path, limit, owner)
    return None if found is None else found[0].decode("utf-8", "replace")


def read_link(path: str) -> Optional[str]:
    try:
        return os.readlink(path)
    except OSError:
        return None


def list_dir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def ns_inum(link_target: Optional[str]) -> Optional[int]:
    """The inode number from a /proc/PID/ns/* link target like `user:[4026531837]`."""
    if not link_target or "[" not in link_target or not link_target.endswith("]"):
        return None
    digits = link_target[link_target.index("[") + 1:-1]
    return int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 20 else None


def process_in_namespace(proc_root: str, kind: str, inum: int, prefer: tuple[int, ...] = (),
                         limit: int = 100000) -> Optional[int]:
    """A live pid in the namespace of `kind` ("mnt", "user") with inode `inum`.
    What belongs to the namespace itself (a mount table, a user namespace's id
    maps) is the same for all its members, so a gone member's can be read there."""
    want = f"{kind}:[{inum}]"
    for pid in prefer:
        if read_link(os.path.join(proc_root, str(pid), "ns", kind)) == want:
            return pid
    for name in list_dir(proc_root)[:limit]:
        if name.isdigit() and read_link(os.path.join(proc_root, name, "ns", kind)) == want:
            return int(name)
    return None


def process_in_mount_namespace(proc_root: str, inum: int, prefer: tuple[int, ...] = (1,),
                               limit: int = 100000) -> Optional[int]:
    """A live pid whose mount namespace has inode `inum` (its mount table)."""
    return process_in_namespace(proc_root, "mnt", inum, prefer, limit)


def host_mount_namespace(proc_root: str) -> Optional[int]:
    """The host's mount namespace: PID 1's, or this tracer's own where PID 1's
    cannot be read (a sandbox that hides it)."""
    return ns_inum(read_link(os.path.join(proc_root, "1", "ns", "mnt"))) or \
        ns_inum(read_link(os.path.join(proc_root, "self", "ns", "mnt")))


_host_ns: dict[tuple[str, str], frozenset[int]] = {}


def host_namespaces(proc_root: str, kind: str) -> frozenset[int]:
    """The host's namespace inodes of `kind`: PID 1's and this tracer's own (PID 1's
    may be hidden by a sandbox; a tracer in a container may share the host's).
    Kept once read from the live /proc: PID 1 and this process live as long as we
    do, gputrace enters no namespace, and whether PID 1's links are readable to us
    (ptrace access) does not change either."""
    known = _host_ns.get((proc_root, kind))
    if known is not None:
        return known
    found = (ns_inum(read_link(os.path.join(proc_root, pid, "ns", kind))) for pid in ("1", "self"))
    inums = frozenset(inum for inum in found if inum)
    if inums and is_live_proc(proc_root):
        _host_ns[(proc_root, kind)] = inums
    return inums


_live_proc: dict[str, bool] = {}


def is_live_proc(proc_root: str) -> bool:
    """`proc_root` is this system's /proc (not a fixture tree a test made)."""
    live = _live_proc.get(proc_root)
    if live is None:
        live = _live_proc[proc_root] = os.path.realpath(proc_root) == "/proc"
    return live
