"""Node metadata is read race-free inside a container root.

A hostile container keeps exchanging its /dev directory with a symlink to a
host directory whose node has other metadata (minor, mode, owner, ACL).  The
live statter opens the node with O_PATH under openat2(RESOLVE_IN_ROOT) and
reads stat and ACL from that one fd, so it sees the container's node or
nothing, never the host's.  The same swap against the old approach (resolve the
path in Python, then stat by path) does leak: the test can fail.
"""

from __future__ import annotations

import ctypes
import json
import os
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

from tests.support.nodes import NodeSpec, make_node
from tracer.enrichment.node import NodeStat, stat_in_root
from tracer.in_root import resolve_in_root

RENAME_EXCHANGE = 2
INSIDE_MINOR, HOST_MINOR = 3, 77
HOST_ACL_UID = 4242
ACL_USER_1234_RW = struct.pack("<HHI", 2, 6, 1234)  # ACL_USER entry, rw-, uid 1234

# exchanges rootfs/dev and rootfs/dev.swap (a symlink to the host directory) forever
SWAPPER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
a, b = (os.fsencode(p) for p in sys.argv[1:3])
print("ready", flush=True)
while True:
    if libc.renameat2(-100, a, -100, b, 2) != 0:
        sys.exit(ctypes.get_errno())
"""


def naive_stat(root: str, path: str) -> Optional[NodeStat]:
    """What stat_in_root did before: resolve in Python, then lstat/getxattr by path."""
    resolved = resolve_in_root(root, path)
    if resolved is None:
        return None
    try:
        st = os.lstat(resolved)
        try:
            acl: Optional[bytes] = os.getxattr(resolved, "system.posix_acl_access",
                                               follow_symlinks=False)
        except OSError:
            acl = None
    except OSError:
        return None
    is_dev = stat.S_ISCHR(st.st_mode)
    return NodeStat(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                    major=os.major(st.st_rdev) if is_dev else None,
                    minor=os.minor(st.st_rdev) if is_dev else None, acl_xattr=acl)


@pytest.fixture
def swapping_container(tmp_path: Path) -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    host_dir = tmp_path / "host-dev"
    host_dir.mkdir()
    make_node(str(host_dir / "nvidia0"), NodeSpec(
        195, HOST_MINOR, mode=0o600, uid=0, gid=0, setfacl=(f"u:{HOST_ACL_UID}:rw",)))
    root = tmp_path / "rootfs"
    (root / "dev").mkdir(parents=True)
    make_node(str(root / "dev" / "nvidia0"), NodeSpec(195, INSIDE_MINOR, mode=0o660, gid=44))
    (root / "dev.swap").symlink_to(host_dir)  # absolute: on the host it names host_dir
    assert ctypes.CDLL(None, use_errno=True).renameat2 is not None
    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, str(root / "dev"),
                                str(root / "dev.swap")], stdout=subprocess.PIPE, text=True)
    assert swapper.stdout is not None and swapper.stdout.readline().strip() == "ready"
    try:
        yield str(root)
    finally:
        swapper.kill()
        swapper.wait()


def observe(statter: Callable[[str, str], Optional[NodeStat]], root: str,
            seconds: float, stop_at_leak: bool) -> tuple[int, int, int]:
    """(container's node seen, host node seen, nothing) over `seconds` of tries."""
    inside = host = none = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(200):
            st = statter(root, "/dev/nvidia0")
            if st is None or not stat.S_ISCHR(st.mode):
                none += 1
            elif st.minor == HOST_MINOR or st.acl_xattr is not None or st.mode & 0o777 == 0o600:
                host += 1
            else:
                assert st.minor == INSIDE_MINOR and st.gid == 44
                inside += 1
        if stop_at_leak and host:
            break
    return inside, host, none


def test_node_metadata_never_comes_from_a_host_file_swapped_in(swapping_container: str) -> None:
    inside, host, none = observe(stat_in_root, swapping_container, 4.0, stop_at_leak=False)
    print(f"stat_in_root under the swap: container node {inside}, host node {host}, none {none}")
    assert host == 0
    assert inside > 100 and none > 100  # both states of the swap were really met


WITHOUT_OPENAT2 = r"""
import ctypes, errno, json, os, sys
from tests.support.restricted_open import seccomp_errno_for
from tests.test_node_stat_race import observe
from tracer import in_root
from tracer.enrichment.node import stat_in_root
seccomp_errno_for(437, errno.ENOSYS)  # openat2, as an old container profile answers it
root_fd = os.open(sys.argv[1], os.O_PATH)
assert in_root._openat2_in_root(root_fd, "dev", os.O_PATH) == -1
assert ctypes.get_errno() == errno.ENOSYS
print(json.dumps(observe(stat_in_root, sys.argv[1], 4.0, stop_at_leak=False)))
"""


def test_without_openat2_the_walk_by_file_descriptors_never_leaks_either(
        swapping_container: str) -> None:
    """openat2 refused with ENOSYS (kernels before 5.6, old seccomp profiles): the
    fallback walks the path one fd at a time, and the same swap still shows the
    container's node or nothing.  (The path-string fallback it replaced is the
    naive statter of the next test, which leaks.)"""
    out = subprocess.run([sys.executable, "-c", WITHOUT_OPENAT2, swapping_container],
                         capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    inside, host, none = json.loads(out.stdout)
    print(f"fd walk under the swap: container node {inside}, host node {host}, none {none}")
    assert host == 0
    assert inside > 100 and none > 100


def test_the_swap_leaks_through_resolve_then_stat_by_path(swapping_container: str) -> None:
    """The oracle for the test above: the path-based statter is caught out."""
    inside, host, none = observe(naive_stat, swapping_container, 20.0, stop_at_leak=True)
    print(f"path-based statter under the swap: container node {inside}, host node {host}")
    assert host > 0


def test_stat_in_root_reads_the_acl_through_the_fd(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    (tmp_path / "dev").mkdir()
    make_node(str(tmp_path / "dev" / "renderD128"),
              NodeSpec(226, 128, mode=0o660, gid=44, setfacl=("u:1234:rw",)))
    os.symlink("renderD128", tmp_path / "dev" / "render")  # a last symlink is followed, in root
    st = stat_in_root(str(tmp_path), "/dev/render")
    assert st is not None and (st.major, st.minor, st.gid) == (226, 128, 44)
    assert st.acl_xattr is not None and ACL_USER_1234_RW in st.acl_xattr
    assert st.resolved.endswith("/dev/renderD128")
    os.symlink("/../../../../etc/passwd", tmp_path / "dev" / "escape")
    assert stat_in_root(str(tmp_path), "/dev/escape") is None
