"""Facts about the device node: stat, ACL, label, mount flags and node class.

The stat goes through a `NodeStatter` so fixture tests need no real device
nodes; the live one resolves the path inside the process's root without letting
a symlink lead out of that root.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass
from typing import Any, Callable, Optional

from tracer.facts import SkipCounter
from tracer.enrichment.posix_acl import AclEntry, build_posix_acl, parse_posix_acl
from tracer.in_root import open_in_root
from tracer.sensors.gpu_nodes import classify_node  # the one GPU-node model

ACL_XATTR = "system.posix_acl_access"
SELINUX_XATTR = "security.selinux"


@dataclass(frozen=True)
class NodeStat:
    mode: int            # full st_mode
    uid: int
    gid: int
    major: Optional[int]  # of st_rdev, for device nodes
    minor: Optional[int]
    acl_xattr: Optional[bytes] = None
    selinux: Optional[str] = None
    resolved: str = ""    # the path actually stat'ed

    @property
    def is_char_device(self) -> bool:
        return stat.S_ISCHR(self.mode)

    def acl(self, skips: SkipCounter) -> Optional[list[AclEntry]]:
        return None if self.acl_xattr is None else parse_posix_acl(self.acl_xattr, skips)


NodeStatter = Callable[[str, str], Optional[NodeStat]]
"""(root, path) -> NodeStat, or None when the node does not exist."""


def fd_xattr(fd: int, name: str) -> Optional[bytes]:
    """An xattr of the inode an O_PATH fd holds (fgetxattr refuses O_PATH fds with
    EBADF, so through /proc/self/fd/N, a magic link to exactly that inode)."""
    try:
        return os.getxattr(f"/proc/self/fd/{fd}", name)
    except OSError as err:
        if err.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES):
            return None
        raise


def stat_in_root(root: str, path: str) -> Optional[NodeStat]:
    """The live statter: the node opened with O_PATH inside `root` (never opening
    the device itself), then fstat and the ACL and label xattrs of that same inode,
    so a path swapped between steps cannot mix another file's metadata in."""
    fd = open_in_root(root, path, os.O_PATH)
    if fd is None:
        return None
    try:
        st = os.fstat(fd)
        acl = fd_xattr(fd, ACL_XATTR)
        label = fd_xattr(fd, SELINUX_XATTR)
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            where = os.path.join(root, path.lstrip("/"))
    except OSError:
        return None
    finally:
        os.close(fd)
    is_dev = stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
    return NodeStat(
        mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
        major=os.major(st.st_rdev) if is_dev else None,
        minor=os.minor(st.st_rdev) if is_dev else None,
        acl_xattr=acl,
        selinux=label.rstrip(b"\0").decode("utf-8", "replace") if label else None,
        resolved=where)


class FixtureNodeStats:
    """A statter reading recorded node stats (JSON: path -> {mode: "020660", uid,
    gid, major, minor, acl: [[tag, perm, id]...], selinux}); `root` is ignored."""

    def __init__(self, json_path: str) -> None:
        with open(json_path, encoding="utf-8") as f:
            self.nodes: dict[str, Any] = json.load(f)

    def __call__(self, root: str, path: str) -> Optional[NodeStat]:
        rec = self.nodes.get(path)
        if rec is None:
            return None
        acl = None
        if rec.get("acl") is not None:
            acl = build_posix_acl([AclEntry(t, p, i) for t, p, i in rec["acl"]])
        return NodeStat(mode=int(rec["mode"], 8), uid=rec["uid"], gid=rec["gid"],
                        major=rec.get("major"), minor=rec.get("minor"), acl_xattr=acl,
                        selinux=rec.get("selinux"), resolved=path)


def host_devname(sys_root: str, major: int, minor: int) -> Optional[str]:
    """The node's name under /dev from /sys/dev/char/M:m/uevent (DEVNAME=)."""
    try:
        with open(os.path.join(sys_root, "dev/char", f"{major}:{minor}", "uevent"),
                  encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("DEVNAME="):
                    return line.split("=", 1)[1].strip() or None
    except OSError:
        return None
    return None
