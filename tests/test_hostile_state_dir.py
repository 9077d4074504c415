"""A user's runtime state directory is the user's to write: the tracker reads it
as hostile input (real directories owned by a real uid, real FIFOs and
symlinks, real processes in real user namespaces).

- a FIFO named state.json does not block the tracker;
- a symlink (the file or the container's directory) does not lead into root's state;
- a state naming pid 1, or any process not in a user namespace that user made,
  snapshots nothing;
- 5,000 directories use that user's watch budget, not everyone's;
- a user's directory named like root's container cannot replace or end its snapshot.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from tracer.enrichment.container_store import SnapshotStore
from tracer.enrichment.container_tracker import ContainerTracker
from tracer.enrichment.state_files import StateFiles
from tracer.enrichment.tracker_budget import USER_WATCHES
from tracer.host import HostPaths
from tracer.inotify import IN_Q_OVERFLOW, Inotify

pytestmark = pytest.mark.kernel
HOSTILE, OTHER = 1951, 1952  # uids of two users (no account needed for a uid)
ROOT_ID = "f" * 64


def wait_until(predicate, timeout: float = 20.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError("timed out")


def owned_dir(path: Path, uid: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, uid)
    return path


def write_state(directory: Path, pid: int, uid: int = 0) -> None:
    """runc's state.json, written by rename as runc does, owned by `uid`."""
    directory.mkdir(exist_ok=True)
    os.chown(directory, uid, uid)
    tmp = directory / "state.json.tmp"
    tmp.write_text(json.dumps({"id": directory.name, "init_process_pid": pid, "config": {}}))
    os.chown(tmp, uid, uid)
    os.rename(tmp, directory / "state.json")


@pytest.fixture
def tree() -> Iterator[tuple[Path, HostPaths]]:
    """run/ in a directory the users can reach (the live /proc, /sys): root's runc
    root and two users' roots."""
    base = Path(tempfile.mkdtemp(prefix="gttest-statedir-", dir="/tmp"))
    base.chmod(0o755)
    run = base / "run"
    (run / "runc").mkdir(parents=True)
    for uid in (HOSTILE, OTHER):
        owned_dir(run / "user" / str(uid), uid)
        owned_dir(run / "user" / str(uid) / "runc", uid)
    try:
        yield run, HostPaths(run=str(run))
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def userns_sleeper() -> Iterator[callable]:
    started: list[subprocess.Popen] = []

    def start(uid: int) -> int:
        """A process of `uid` in a user namespace `uid` created: a rootless init."""
        proc = subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                                 "unshare", "-U", "sleep", "60"])
        started.append(proc)
        wait_until(lambda: os.readlink(f"/proc/{proc.pid}/ns/user")
                   != os.readlink("/proc/self/ns/user"), 10)
        return proc.pid
    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def tracker_for(host: HostPaths, store: SnapshotStore) -> ContainerTracker:
    return ContainerTracker(host, store).start()


def test_a_fifo_named_state_json_does_not_block_the_tracker(tree) -> None:
    run, host = tree
    box = owned_dir(run / "user" / str(HOSTILE) / "runc" / ("a" * 64), HOSTILE)
    os.mkfifo(box / "state.json")
    os.chown(box / "state.json", HOSTILE, HOSTILE)
    store = SnapshotStore()
    tracker = tracker_for(host, store)  # scans the FIFO at start, in this thread
    try:
        write_state(run / "runc" / ROOT_ID, 0)
        wait_until(lambda: store.get(ROOT_ID) is not None, 10)
        os.mkfifo(box / "status")  # crun's name, made after start: read from the tracker thread
        (box / "status").chmod(0o644)
        write_state(run / "runc" / ("e" * 64), 0)
        wait_until(lambda: store.get("e" * 64) is not None, 10)
    finally:
        tracker.close()
    assert store.get("a" * 64) is None
    assert store.stats()["state_not_regular"] >= 1


def test_the_reader_never_opens_a_fifo_for_reading(tmp_path: Path) -> None:
    """Opened without O_NONBLOCK, a FIFO's open waits for a writer forever."""
    fifo = tmp_path / "state.json"
    os.mkfifo(fifo)
    result: list[object] = []
    reader = threading.Thread(target=lambda: result.append(StateFiles().read(str(fifo), 1 << 20)),
                              daemon=True)
    reader.start()
    reader.join(5)
    assert result == [None]


def test_symlinks_do_not_lead_into_roots_state(tree) -> None:
    run, host = tree
    write_state(run / "runc" / ROOT_ID, os.getpid())  # root's container: its init is us
    users = run / "user" / str(HOSTILE) / "runc"
    linked_file = owned_dir(users / ("b" * 64), HOSTILE)
    os.symlink(run / "runc" / ROOT_ID / "state.json", linked_file / "state.json")
    os.lchown(linked_file / "state.json", HOSTILE, HOSTILE)
    os.symlink(run / "runc" / ROOT_ID, users / ("c" * 64))
    os.lchown(users / ("c" * 64), HOSTILE, HOSTILE)
    store = SnapshotStore()
    tracker_for(host, store).close()  # the start scan reads everything there is
    assert store.get(ROOT_ID) is not None
    assert store.get("b" * 64) is None and store.get("c" * 64) is None
    stats = store.stats()
    assert stats["state_symlink"] >= 1 and stats["tracker_symlink_skipped"] >= 1


def test_a_state_naming_pid_1_or_a_host_process_snapshots_nothing(tree, userns_sleeper) -> None:
    run, host = tree
    users = run / "user" / str(HOSTILE) / "runc"
    write_state(users / ("1" * 64), 1, HOSTILE)
    write_state(users / ("2" * 64), os.getpid(), HOSTILE)  # root, initial userns
    write_state(users / ("3" * 64), userns_sleeper(OTHER), HOSTILE)  # another user's userns
    mine = userns_sleeper(HOSTILE)
    write_state(users / ("4" * 64), mine, HOSTILE)  # the control: a real rootless init
    store = SnapshotStore()
    tracker_for(host, store).close()
    for cid in ("1", "2", "3"):
        assert store.get(cid * 64) is None, cid
    held = store.get("4" * 64)
    assert held is not None and held.pid == mine and held.owner == HOSTILE
    stats = store.stats()
    assert stats["tracker_state_rejected"] == 3
    assert stats["state_pid_initial_userns"] >= 1 and stats["state_pid_other_owner"] == 1
    assert stats.get("state_pid_initial_userns", 0) + stats.get("state_pid_unverified", 0) == 2


def test_a_users_dir_named_like_roots_container_neither_replaces_nor_ends_it(
        tree, userns_sleeper) -> None:
    run, host = tree
    store = SnapshotStore()
    tracker = tracker_for(host, store)
    try:
        write_state(run / "runc" / ROOT_ID, os.getpid())
        wait_until(lambda: store.get(ROOT_ID) is not None, 10)
        fake = run / "user" / str(HOSTILE) / "runc" / ROOT_ID
        write_state(fake, userns_sleeper(HOSTILE), HOSTILE)
        wait_until(lambda: store.stats().get("snapshot_id_taken", 0) >= 1, 10)
        (fake / "state.json").unlink()
        fake.rmdir()
        time.sleep(0.5)
    finally:
        tracker.close()
    held = store.get(ROOT_ID)
    assert held is not None and held.owner == 0 and held.pid == os.getpid()
    assert held.died is None


FLOOD = "import os, sys\nfor i in range(5000): os.mkdir(os.path.join(sys.argv[1], f'{i:064x}'))"


def test_five_thousand_directories_use_one_users_budget_only(tree, userns_sleeper) -> None:
    run, host = tree
    store = SnapshotStore()
    tracker = tracker_for(host, store)
    flood = run / "user" / str(HOSTILE) / "runc"
    try:
        t0 = time.monotonic()
        subprocess.run(["setpriv", f"--reuid={HOSTILE}", f"--regid={HOSTILE}", "--clear-groups",
                        sys.executable, "-c", FLOOD, str(flood)], check=True, timeout=120)
        made_s = time.monotonic() - t0
        write_state(run / "runc" / ROOT_ID, 0)  # root's next container, right after the flood
        root_s = wait_until(lambda: store.get(ROOT_ID) is not None, 30)
        wait_until(lambda: tracker.watch_budget.held_by(HOSTILE) >= USER_WATCHES, 30)
        other = userns_sleeper(OTHER)  # another user's rootless container
        write_state(run / "user" / str(OTHER) / "runc" / ("d" * 64), other, OTHER)
        other_s = wait_until(lambda: store.get("d" * 64) is not None, 30)
        held = {uid: tracker.watch_budget.held_by(uid) for uid in (0, HOSTILE, OTHER)}
        pending = tracker.pending.held_by(HOSTILE)
    finally:
        tracker.close()
    stats = store.stats()
    print(f"\n5,000 dirs in {made_s:.2f}s; watches held {held}, pending of the flooder "
          f"{pending}; root's next container snapshotted after {root_s * 1000:.0f} ms, "
          f"another user's after {other_s * 1000:.0f} ms; counters "
          f"{ {k: v for k, v in stats.items() if k.startswith('tracker_')} }")
    assert held[HOSTILE] <= USER_WATCHES and pending <= USER_WATCHES
    assert stats["tracker_watch_user_budget"] >= 5000 - USER_WATCHES
    assert held[OTHER] >= 1


def test_events_lost_to_a_queue_overflow_are_found_by_a_rescan(tree) -> None:
    """The kernel drops events when its queue overflows (a flood of directories):
    the tracker looks at its state roots again instead of missing what was lost."""
    run, host = tree
    store = SnapshotStore()
    tracker = ContainerTracker(host, store)
    tracker._inotify = Inotify()
    try:
        tracker._watch_roots()
        write_state(run / "runc" / ROOT_ID, 0)  # its events stay unread: as if lost
        assert store.get(ROOT_ID) is None
        tracker._dispatch([(-1, IN_Q_OVERFLOW, b"")])
        tracker._rescan_if_due()
    finally:
        tracker._inotify.close()
    assert store.get(ROOT_ID) is not None
    assert store.stats()["tracker_queue_overflow"] == 1 and store.stats()["tracker_rescans"] == 1


def test_state_files_are_read_only_when_regular_owned_and_small(tmp_path: Path) -> None:
    owned_dir(tmp_path / "u", HOSTILE)
    big = tmp_path / "u" / "big.json"
    big.write_bytes(b" " * 5000)
    os.chown(big, HOSTILE, HOSTILE)
    foreign = tmp_path / "u" / "root.json"
    foreign.write_text("{}")
    counts: dict[str, int] = {}

    def count(reason: str) -> None:
        counts[reason] = counts.get(reason, 0) + 1
    files = StateFiles(HOSTILE, count)
    assert files.read(str(big), 4096) is None
    assert files.read(str(big), 4096, tail=True) == b" " * 4096
    assert files.read(str(foreign), 4096) is None
    assert StateFiles(0, count).read(str(foreign), 4096) == b"{}"  # root's: not an owner matter
    assert counts == {"state_too_large": 1, "state_wrong_owner": 1}
    assert stat.S_ISREG(os.stat(big).st_mode)
