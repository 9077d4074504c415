"""Reading files under the injected host roots: bounded, never raising."""

from __future__ import annotations

import os
from typing import Optional

MAX_FILE_BYTES = 1 << 20  # /proc and /etc files we read are far smaller


def read_bytes(path: str, limit: int = MAX_FILE_BYTES) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError:
        return None


def read_text(path: str, limit: int = MAX_FILE_BYTES) -> Optional[str]:
    raw = read_bytes(path, limit)
    return None if raw is None else raw.decode("utf-8", "replace")


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


def host_namespaces(proc_root: str, kind: str) -> set[int]:
    """The host's namespace inodes of `kind`: PID 1's and this tracer's own (PID 1's
    may be hidden by a sandbox; a tracer in a container may share the host's)."""
    found = (ns_inum(read_link(os.path.join(proc_root, pid, "ns", kind))) for pid in ("1", "self"))
    return {inum for inum in found if inum}
