"""A burst of real denied opens from an unprivileged process, for fault and bounds tests.

`denied_dir()` makes /dev/nvidia-gtfuzz-<id>, a root-owned 0700 directory: any
open below it by another user fails with EACCES during path lookup, and its
path starts with the default GPU prefix /dev/nvidia, so the sensor reports
each one.  `storm()` runs a fresh interpreter as `uid` that opens `count`
paths there and reports what the kernel answered, so tests know the exact
number of attempts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator

STORM_CODE = r"""
import errno, json, os, sys, time
base, count, names, name_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
hold_s = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
failures = {}
for i in range(count):
    name = f"{i % names if names else i:08d}-" + "x" * name_len
    try:
        os.close(os.open(os.path.join(base, name), os.O_RDONLY))
    except OSError as exc:
        key = errno.errorcode.get(exc.errno, str(exc.errno))
        failures[key] = failures.get(key, 0) + 1
print(json.dumps({"pid": os.getpid(), "attempts": count, "failures": failures}), flush=True)
time.sleep(hold_s)  # held: the process stays alive until the test is done with it
"""


@dataclass(frozen=True)
class StormResult:
    pid: int
    attempts: int
    failures: dict[str, int]


@contextlib.contextmanager
def denied_dir(tag: str = "gtfuzz") -> Iterator[str]:
    path = f"/dev/nvidia-{tag}-{uuid.uuid4().hex[:8]}"
    os.mkdir(path, 0o700)
    os.chown(path, 0, 0)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _drop_to(uid: int) -> Callable[[], None]:
    def drop() -> None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    return drop


@contextlib.contextmanager
def held_storm(base: str, count: int, uid: int = 65534, names: int = 0,
               name_len: int = 8, hold_s: float = 120.0) -> Iterator[StormResult]:
    """Like `storm`, but the process stays alive inside the `with` block (so a
    test can see what is kept for a live process); it is killed and reaped after."""
    proc = subprocess.Popen([sys.executable, "-c", STORM_CODE, base, str(count), str(names),
                             str(name_len), str(hold_s)],
                            stdout=subprocess.PIPE, text=True, preexec_fn=_drop_to(uid), cwd="/")
    try:
        assert proc.stdout is not None
        out = json.loads(proc.stdout.readline())
        yield StormResult(out["pid"], out["attempts"], out["failures"])
    finally:
        proc.kill()
        proc.wait()


def storm(base: str, count: int, uid: int = 65534, names: int = 0,
          name_len: int = 8, timeout: float = 300.0) -> StormResult:
    """`count` opens as `uid` below `base`, cycling over `names` distinct names
    (0: every open a new name)."""
    drop = _drop_to(uid)
    proc = subprocess.run([sys.executable, "-c", STORM_CODE, base, str(count),
                           str(names), str(name_len)],
                          capture_output=True, text=True, timeout=timeout, preexec_fn=drop,
                          cwd="/")
    if proc.returncode != 0:
        raise RuntimeError(f"storm failed: {proc.stderr.strip()}")
    out = json.loads(proc.stdout)
    return StormResult(out["pid"], out["attempts"], out["failures"])
