"""Throwaway device nodes, users, groups, nodev mounts and device cgroups for tests.

Everything made here is removed again: context managers undo on exit, and the
fixtures in tests/conftest.py wrap them.  Nodes use char majors with no driver
(195 = NVIDIA, 226 = DRM on this VM), so a permitted open fails with ENXIO and a
refused one with EACCES (DAC, nodev) or EPERM (device cgroup).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import stat
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import pytest

from tracer.enrichment.posix_acl import PosixAcl

ACL_XATTR = "system.posix_acl_access"
DEVICES_CGROUP_ROOT = "/sys/fs/cgroup/devices"


def unique(prefix: str = "gttest") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass(frozen=True)
class NodeSpec:
    major: int
    minor: int
    mode: int = 0o660
    uid: int = 0
    gid: int = 0
    acl: Optional[PosixAcl] = None      # written as the ACL xattr (sets group bits to the mask)
    setfacl: Sequence[str] = ()         # alternatively, setfacl -m entries like "u:1000:rw"


def make_node(path: str, spec: NodeSpec) -> str:
    """mknod + chown + chmod + optional ACL; returns ``path``."""
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(spec.major, spec.minor))
    os.chown(path, spec.uid, spec.gid)
    os.chmod(path, spec.mode)
    if spec.acl is not None:
        os.setxattr(path, ACL_XATTR, spec.acl.to_xattr(spec.mode))
    if spec.setfacl:
        subprocess.run(["setfacl", "-m", ",".join(spec.setfacl), path], check=True,
                       capture_output=True)
    return path


def read_acl(path: str) -> Optional[PosixAcl]:
    """The node's access ACL as the kernel holds it, or None without one."""
    try:
        raw = os.getxattr(path, ACL_XATTR)
    except OSError:
        return None
    return PosixAcl.from_xattr(raw)


@contextlib.contextmanager
def node_dir(parent: str = "/dev") -> Iterator[str]:
    """A fresh ``gttest`` directory (mode 0755) for nodes, removed with its content."""
    path = os.path.join(parent, unique())
    os.mkdir(path, 0o755)
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def device_node(spec: NodeSpec, parent: str = "/dev") -> Iterator[str]:
    """One node in its own throwaway directory."""
    with node_dir(parent) as directory:
        yield make_node(os.path.join(directory, "node"), spec)


@contextlib.contextmanager
def nodev_mount(options: str = "nodev") -> Iterator[str]:
    """A small tmpfs mounted with ``options`` (nodev by default), unmounted after."""
    where = tempfile.mkdtemp(prefix="gttest-mnt-")
    os.chmod(where, 0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"{options},size=64k,mode=0755", "gttest", where],
                   check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", where], check=False, capture_output=True)
        os.rmdir(where)


@contextlib.contextmanager
def device_cgroup(rules: Sequence[tuple[str, str]] = ()) -> Iterator[str]:
    """A child cgroup of the v1 devices controller with ``rules`` written in order.

    Each rule is ``(file, text)``, e.g. ``("devices.deny", "c 195:* rwm")``.
    Yields the cgroup directory; its ``cgroup.procs`` is what an actor joins.
    Removal waits for members to be gone (callers reap their actors first).
    """
    path = os.path.join(DEVICES_CGROUP_ROOT, unique())
    os.mkdir(path)
    try:
        for name, text in rules:
            with open(os.path.join(path, name), "w") as handle:
                handle.write(text)
        yield path
    finally:
        os.rmdir(path)


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


@dataclass(frozen=True)
class ThrowawayUser:
    name: str
    uid: int
    gid: int          # primary group id


@contextlib.contextmanager
def throwaway_group(gid: Optional[int] = None, name: Optional[str] = None) -> Iterator[tuple[str, int]]:
    """groupadd a ``gt`` group; yields (name, gid)."""
    name = name or f"gt{uuid.uuid4().hex[:8]}"
    _run(["groupadd"] + (["-g", str(gid)] if gid is not None else []) + [name])
    try:
        import grp
        yield name, grp.getgrnam(name).gr_gid
    finally:
        subprocess.run(["groupdel", name], capture_output=True)


@contextlib.contextmanager
def throwaway_user(groups: Sequence[str] = (), uid: Optional[int] = None,
                   name: Optional[str] = None) -> Iterator[ThrowawayUser]:
    """useradd a ``gt`` user (no home, own primary group) in ``groups``."""
    name = name or f"gt{uuid.uuid4().hex[:8]}"
    argv = ["useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin"]
    if uid is not None:
        argv += ["-u", str(uid)]
    if groups:
        argv += ["-G", ",".join(groups)]
    _run(argv + [name])
    try:
        import pwd
        entry = pwd.getpwnam(name)
        yield ThrowawayUser(name, entry.pw_uid, entry.pw_gid)
    finally:
        subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", name], capture_output=True)  # if userdel left it


# pytest fixtures over the helpers above.  Expose them suite-wide with
# `pytest_plugins = ["tests.support.nodes"]` in tests/conftest.py, or import them.

@pytest.fixture
def gttest_node_dir() -> Iterator[str]:
    """An empty ``/dev/gttest-*`` directory (devtmpfs, so ACLs work), removed after."""
    with node_dir("/dev") as directory:
        yield directory


@pytest.fixture
def make_device_node(gttest_node_dir: str) -> Callable[[str, NodeSpec], str]:
    """``make_device_node(name, NodeSpec(...))`` -> path inside ``gttest_node_dir``."""
    def make(name: str, spec: NodeSpec) -> str:
        return make_node(os.path.join(gttest_node_dir, name), spec)
    return make


@pytest.fixture
def nodev_tmpfs() -> Iterator[str]:
    """A tmpfs mounted ``nodev``; device nodes made in it open with EACCES."""
    with nodev_mount("nodev") as where:
        yield where


@pytest.fixture
def make_group() -> Iterator[Callable[..., tuple[str, int]]]:
    """``make_group(gid=None)`` -> (name, gid) of a throwaway ``gt*`` group, deleted after."""
    with contextlib.ExitStack() as stack:
        yield lambda gid=None: stack.enter_context(throwaway_group(gid))


@pytest.fixture
def make_user() -> Iterator[Callable[..., ThrowawayUser]]:
    """``make_user(groups=("gtabc",), uid=None)`` -> a throwaway ``gt*`` user, deleted after."""
    with contextlib.ExitStack() as stack:
        yield lambda groups=(), uid=None: stack.enter_context(throwaway_user(groups, uid))


@pytest.fixture
def make_device_cgroup() -> Iterator[Callable[[Sequence[tuple[str, str]]], str]]:
    """``make_device_cgroup([("devices.deny", "c 195:* rwm")])`` -> v1 cgroup dir, removed after."""
    with contextlib.ExitStack() as stack:
        yield lambda rules: stack.enter_context(device_cgroup(rules))


@contextlib.contextmanager
def char195_nodes(prefix: str) -> Iterator[Callable[..., str]]:
    """A factory of fresh char 195 nodes `<prefix><minor>` (a free minor in 16-249),
    each `make(mode, gid=0)`; every node it made is removed on exit."""
    made: list[str] = []

    def make(mode: int, gid: int = 0) -> str:
        for minor in random.sample(range(16, 250), 234):
            path = f"{prefix}{minor}"
            if not os.path.exists(path):
                made.append(make_node(path, NodeSpec(195, minor, mode, 0, gid)))
                return path
        raise RuntimeError("no free minor")
    try:
        yield make
    finally:
        for path in made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
