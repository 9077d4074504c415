"""The walk by file descriptors (used where openat2 is missing) agrees with the
kernel's own openat2(RESOLVE_IN_ROOT) on every path through a tree of hostile
symlinks: absolute and relative links, links climbing out with `..`, loops,
links to files used as directories.  The kernel is the model here."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Iterator, Optional

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.example_counts import fuzz, print_example_counts, ran  # noqa: F401
from tracer import in_root
from tracer.in_root import read_in_root, walk_in_root

PARTS = ["dev", "etc", "..", ".", "abs", "rel", "up", "loop", "group", "nvidia0", "missing",
         "file", "deep", "fifo", "outside", ""]


@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    base = tmp_path_factory.mktemp("inroot")
    (base / "host-secret").write_text("SECRET\n")
    root = base / "rootfs"
    for d in ("dev", "etc", "etc/deep"):
        (root / d).mkdir(parents=True)
    (root / "etc" / "group").write_text("video:x:44:\n")
    (root / "dev" / "nvidia0").write_text("not a node\n")
    (root / "file").write_text("x\n")
    os.mkfifo(root / "etc" / "fifo")
    links = {"dev/abs": "/etc", "dev/rel": "../etc/group", "etc/up": "../../../../..",
             "etc/loop": "loop", "etc/deep/abs": "/etc/deep/../../dev/abs/group",
             "outside": str(base / "host-secret"), "dev/file": "/file/x",
             "etc/deep/up": "../../.."}
    for name, target in links.items():
        os.symlink(target, root / name)
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def _identity(fd: Optional[int]) -> Optional[tuple[int, int]]:
    if fd is None or fd < 0:
        return None
    try:
        st = os.fstat(fd)
        return st.st_dev, st.st_ino
    finally:
        os.close(fd)


def _kernel(root_fd: int, path: str) -> Optional[tuple[int, int]]:
    fd = in_root._openat2_in_root(root_fd, path, os.O_PATH | os.O_CLOEXEC)
    if fd < 0:
        assert ctypes.get_errno() != 38, "openat2 is the model: this kernel must have it"
    return _identity(fd)


@fuzz(1500)
@given(st.lists(st.sampled_from(PARTS), min_size=1, max_size=8), st.booleans())
def test_the_walk_opens_what_openat2_opens(hostile_root: int, parts: list[str],
                                           absolute: bool) -> None:
    ran("walk_in_root == openat2 RESOLVE_IN_ROOT")
    path = ("/" if absolute else "") + "/".join(parts)
    assert _identity(walk_in_root(hostile_root, path, os.O_PATH)) == _kernel(hostile_root, path), path


def test_reading_through_the_walk_stays_in_the_root(hostile_root: int, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """read_in_root with openat2 refused: links resolve in the root, a fifo is not
    opened for reading (it would block), the host file is never read."""
    def enosys(*_: object) -> int:
        ctypes.set_errno(38)
        return -1
    monkeypatch.setattr(in_root, "_openat2_in_root", enosys)
    root = f"/proc/self/fd/{hostile_root}"
    assert read_in_root(root, "/dev/rel") == "video:x:44:\n"
    assert read_in_root(root, "/etc/deep/abs") == "video:x:44:\n"
    assert read_in_root(root, "/etc/up/etc/group") == "video:x:44:\n"
    assert read_in_root(root, "/outside") is None
    assert read_in_root(root, "/etc/fifo") is None
    assert read_in_root(root, "/etc/loop") is None
    assert read_in_root(root, "/dev/file") is None
