"""A child process that performs syscalls as a chosen identity, for tests.

The parent (root) starts a fresh interpreter running this file with a JSON plan.
The child, in this order: sets its comm, joins the cgroups named in
``cgroup_procs`` (while still root), drops to the host ``groups``/``gid``/``uid``,
optionally unshares a user namespace (the parent writes ``setgroups``,
``uid_map`` and ``gid_map`` for it), switches to the ``inner`` ids, lowers its
effective capabilities to ``cap_effective``, changes directory, reports its
truth (ids, caps, namespaces, cgroups as /proc shows them), runs ``actions`` and
reports one result per action.  With ``hold`` it then waits for ``release()``.

Plan keys (all optional)::

    comm, comm_b64            process name (str, or exact bytes in base64)
    cgroup_procs              list of cgroup.procs files to write our pid into
    groups, gid, uid          host supplementary groups, real/effective/saved ids
    userns                    {"uid_map": "0 1000 1\\n...", "gid_map": ..., "setgroups": "allow"|"deny"}
    inner                     {"uid", "gid", "groups"} set inside the user namespace
    cap_effective             int mask; the effective set becomes permitted & mask
    chdir, report_truth        directory to enter; whether to send the truth (default yes)
    await_go                  after the truth, wait for `Actor.go()` before acting
    actions, hold             see run_action(); hold = stay alive until `release()`

Every failure inside the child comes back as ``ActorResult.error``; the parent
never waits longer than its timeout.
"""

from __future__ import annotations

import base64
import ctypes
import errno as errno_mod
import json
import os
import platform
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

CLONE_NEWUSER = 0x10000000
PR_SET_NAME = 15
SYS_OPENAT2 = 437
SYS_CAPGET = 125 if platform.machine() == "x86_64" else 90
SYS_CAPSET = 126 if platform.machine() == "x86_64" else 91
SYS_CREAT = 85 if platform.machine() == "x86_64" else None
AT_FDCWD = -100
LINUX_CAPABILITY_VERSION_3 = 0x20080522
RESOLVE_FLAGS = {"RESOLVE_NO_XDEV": 0x01, "RESOLVE_NO_MAGICLINKS": 0x02,
                 "RESOLVE_NO_SYMLINKS": 0x04, "RESOLVE_BENEATH": 0x08,
                 "RESOLVE_IN_ROOT": 0x10, "RESOLVE_CACHED": 0x20}
STATUS_KEYS = ("Uid", "Gid", "Groups", "CapEff", "CapPrm", "NoNewPrivs")
DEFAULT_TIMEOUT = 30.0


# ---------------------------------------------------------------- child side

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def parse_flags(value: Any, table: Optional[dict[str, int]] = None) -> int:
    """`"O_RDWR|O_CLOEXEC"`, a list of names, or an int -> int."""
    if isinstance(value, int):
        return value
    names = value if isinstance(value, list) else str(value).split("|")
    total = 0
    for name in (n.strip() for n in names):
        if not name:
            continue
        if name.isdigit():
            total |= int(name)
        elif table is not None and name in table:
            total |= table[name]
        elif isinstance(getattr(os, name, None), int):
            total |= getattr(os, name)
        else:
            raise ValueError(f"unknown flag {name!r}")
    return total


def _check(ret: int) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _outcome(op: str, err: int, **extra: Any) -> dict[str, Any]:
    out = {"op": op, "errno": err, "errname": errno_mod.errorcode.get(err, "") if err else ""}
    out.update(extra)
    return out


def _open_dirfd(action: dict[str, Any]) -> int:
    if action.get("dirfd") is None:
        return AT_FDCWD
    return os.open(action["dirfd"], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def _attempt(op: str, action: dict[str, Any]) -> int:
    """Run one syscall; return 0 or the errno it failed with."""
    dirfd = AT_FDCWD
    try:
        dirfd = _open_dirfd(action)
        path = action["path"]
        if op == "open":
            flags = parse_flags(action.get("flags", "O_RDONLY")) | os.O_CLOEXEC
            os.close(os.open(path, flags, action.get("mode", 0o600), dir_fd=None if dirfd == AT_FDCWD else dirfd))
        elif op == "openat2":
            how = _OpenHow(parse_flags(action.get("flags", "O_RDONLY")) | os.O_CLOEXEC,
                           action.get("mode", 0), parse_flags(action.get("resolve", 0), RESOLVE_FLAGS))
            fd = _check(_libc.syscall(SYS_OPENAT2, dirfd, os.fsencode(path),
                                      ctypes.byref(how), ctypes.sizeof(how)))
            os.close(fd)
        elif op == "creat":
            if SYS_CREAT is None:
                fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, action.get("mode", 0o600))
            else:
                fd = _check(_libc.syscall(SYS_CREAT, os.fsencode(path), action.get("mode", 0o600)))
            os.close(fd)
        else:
            raise ValueError(f"unknown op {op!r}")
        return 0
    except OSError as exc:
        return exc.errno or 0
    finally:
        if dirfd != AT_FDCWD:
            os.close(dirfd)


def _do_ioctl(action: dict[str, Any]) -> dict[str, Any]:
    flags = parse_flags(action.get("open_flags", "O_RDONLY")) | os.O_CLOEXEC
    try:
        fd = os.open(action["path"], flags)
    except OSError as exc:
        return _outcome("ioctl", exc.errno or 0, stage="open", path=action["path"])
    try:
        ret = _libc.ioctl(fd, int(action["cmd"]), int(action.get("arg", 0)))
        err = ctypes.get_errno() if ret < 0 else 0
        return _outcome("ioctl", err, stage="ioctl", path=action["path"], ret=ret)
    finally:
        os.close(fd)


def _do_open_loop(action: dict[str, Any]) -> dict[str, Any]:
    flags = parse_flags(action.get("flags", "O_RDONLY")) | os.O_CLOEXEC
    path, count = action["path"], int(action["count"])
    counts: dict[str, int] = {}
    last = 0
    for _ in range(count):
        try:
            os.close(os.open(path, flags))
            last = 0
        except OSError as exc:
            last = exc.errno or 0
            name = errno_mod.errorcode.get(last, str(last))
            counts[name] = counts.get(name, 0) + 1
    return _outcome("open_loop", last, path=path, attempts=count, failures=counts,
                    succeeded=count - sum(counts.values()))


def run_action(action: dict[str, Any]) -> dict[str, Any]:
    op = action.get("op")
    if op in ("open", "openat2", "creat"):
        return _outcome(op, _attempt(op, action), path=action["path"])
    if op == "ioctl":
        return _do_ioctl(action)
    if op == "open_loop":
        return _do_open_loop(action)
    if op == "sleep":
        time.sleep(float(action["seconds"]))
        return _outcome("sleep", 0)
    raise ValueError(f"unknown action op {op!r}")


def _set_comm(plan: dict[str, Any]) -> None:
    if "comm_b64" in plan:
        raw = base64.b64decode(plan["comm_b64"])
    elif "comm" in plan:
        raw = str(plan["comm"]).encode("utf-8")
    else:
        return
    _check(_libc.prctl(PR_SET_NAME, ctypes.c_char_p(raw[:15]), 0, 0, 0))


def _set_ids(ids: dict[str, Any]) -> None:
    if "groups" in ids:
        os.setgroups([int(g) for g in ids["groups"]])
    if "gid" in ids:
        os.setresgid(int(ids["gid"]), int(ids["gid"]), int(ids["gid"]))
    if "uid" in ids:
        os.setresuid(int(ids["uid"]), int(ids["uid"]), int(ids["uid"]))


def _lower_effective_caps(mask: int) -> None:
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.syscall(SYS_CAPGET, ctypes.byref(header), data))
    for word in range(2):
        data[word].effective = data[word].permitted & ((mask >> (32 * word)) & 0xFFFFFFFF)
    _check(_libc.syscall(SYS_CAPSET, ctypes.byref(header), data))


def _ns_inode(kind: str) -> int:
    link = os.readlink(f"/proc/self/ns/{kind}")  # "user:[4026531837]"
    return int(link[link.index("[") + 1:-1])


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.read()


def collect_truth() -> dict[str, Any]:
    """What /proc says about this process, read by the process itself."""
    with open("/proc/self/comm", "rb") as handle:
        comm = handle.read().rstrip(b"\n")
    status = {}
    for line in _read("/proc/self/status").splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_KEYS:
            status[key] = value.strip()
    return {
        "pid": os.getpid(), "tid": threading.get_native_id(),
        "ppid": os.getppid(),
        "comm": comm.decode("utf-8", "replace"), "comm_b64": base64.b64encode(comm).decode("ascii"),
        "status": status,
        "ns": {kind: _ns_inode(kind) for kind in ("user", "mnt", "pid", "cgroup")},
        "cgroup": _read("/proc/self/cgroup"),
        "uid_map": _read("/proc/self/uid_map"), "gid_map": _read("/proc/self/gid_map"),
    }


class _Channel:
    def __init__(self, to_parent: int, from_parent: int) -> None:
        self.to_parent, self.from_parent = to_parent, from_parent

    def send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message) + "\n").encode("utf-8")
        while data:
            data = data[os.write(self.to_parent, data):]

    def receive_line(self) -> str:
        line = b""
        while not line.endswith(b"\n"):
            chunk = os.read(self.from_parent, 1)
            if not chunk:
                return ""  # parent went away
            line += chunk
        return line.decode().strip()


def child_main(argv: list[str]) -> None:
    channel = _Channel(int(argv[1]), int(argv[2]))
    try:
        plan = json.loads(argv[3])
        _set_comm(plan)
        for procs in plan.get("cgroup_procs", []):
            with open(procs, "w") as handle:
                handle.write(str(os.getpid()))
        _set_ids(plan)
        if plan.get("userns"):
            _check(_libc.unshare(CLONE_NEWUSER))
            channel.send({"stage": "unshared"})
            answer = channel.receive_line()
            if answer != "go":
                raise RuntimeError(f"parent could not map the user namespace: {answer or 'EOF'}")
            _set_ids(plan.get("inner") or {})
        if "cap_effective" in plan:
            _lower_effective_caps(int(plan["cap_effective"]))
        if plan.get("chdir"):
            os.chdir(plan["chdir"])
        if plan.get("report_truth", True):
            channel.send({"stage": "truth", "truth": collect_truth()})
        if plan.get("await_go") and channel.receive_line() != "go":
            raise RuntimeError("parent did not say go")
        results = [run_action(action) for action in plan.get("actions", [])]
        channel.send({"stage": "results", "results": results})
        if plan.get("hold"):
            channel.receive_line()
    except BaseException as exc:  # report everything; the parent decides
        try:
            channel.send({"stage": "error", "error": f"{type(exc).__name__}: {exc}"})
        finally:
            os._exit(1)
    os._exit(0)


# --------------------------------------------------------------- parent side

class ActorError(RuntimeError):
    """The actor failed or did not answer in time."""


@dataclass
class ActorResult:
    pid: int
    truth: Optional[dict[str, Any]] = None
    results: list[dict[str, Any]] = field(default_factory=list)
    error: Optional[str] = None
    returncode: Optional[int] = None
    stderr: str = ""

    @property
    def comm(self) -> bytes:
        return base64.b64decode(self.truth["comm_b64"]) if self.truth else b""

    def errnos(self) -> list[int]:
        return [r["errno"] for r in self.results]

    def check(self) -> "ActorResult":
        if self.error is not None:
            raise ActorError(f"actor {self.pid} failed: {self.error}; stderr: {self.stderr.strip()[-500:]}")
        return self


class Actor:
    """A started actor; `pid` is valid at once, `wait()` returns its results."""

    def __init__(self, plan: dict[str, Any], timeout: float = DEFAULT_TIMEOUT) -> None:
        self.plan, self.timeout = plan, timeout
        from_child_r, from_child_w = os.pipe()
        to_child_r, to_child_w = os.pipe()
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__),
             str(from_child_w), str(to_child_r), json.dumps(plan)],
            pass_fds=(from_child_w, to_child_r), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=self._stderr)
        os.close(from_child_w)
        os.close(to_child_r)
        self._from_child, self._to_child = from_child_r, to_child_w
        self._buffer = b""
        self.pid = self._proc.pid
        self.result = ActorResult(pid=self.pid)
        self._done = False
        if plan.get("userns"):
            self._map_user_namespace()

    def __enter__(self) -> "Actor":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _next_message(self, deadline: float) -> Optional[dict[str, Any]]:
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise ActorError(f"actor {self.pid} did not answer within {self.timeout}s; "
                                 f"stderr: {self._read_stderr()[-500:]}")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 65536)
                if not chunk:
                    return None
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    def _map_user_namespace(self) -> None:
        message = self._next_message(time.monotonic() + self.timeout)
        if message is None or message.get("stage") != "unshared":
            self._absorb(message)
            return
        userns = self.plan["userns"]
        answer = "go"
        try:
            if userns.get("setgroups"):
                self._write_proc("setgroups", userns["setgroups"])
            for key in ("uid_map", "gid_map"):
                if userns.get(key):
                    self._write_proc(key, userns[key])
        except OSError as exc:
            answer = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        os.write(self._to_child, (answer + "\n").encode())

    def _write_proc(self, name: str, text: str) -> None:
        with open(f"/proc/{self.pid}/{name}", "w") as handle:
            handle.write(text if text.endswith("\n") else text + "\n")

    def _absorb(self, message: Optional[dict[str, Any]]) -> None:
        if message is None:
            self._done = True
            if self.result.error is None and not self.result.results:
                self.result.error = "actor exited without reporting results"
        elif message.get("stage") == "truth":
            self.result.truth = message["truth"]
        elif message.get("stage") == "results":
            self.result.results = message["results"]
            self._done = True
        elif message.get("stage") == "error":
            self.result.error = message["error"]
            self._done = True

    def truth(self) -> Optional[dict[str, Any]]:
        """Block until the child reported its truth (or finished)."""
        deadline = time.monotonic() + self.timeout
        while self.result.truth is None and not self._done:
            self._absorb(self._next_message(deadline))
        return self.result.truth

    def wait(self) -> ActorResult:
        """Block until results arrive; a held child stays alive until `release()`."""
        deadline = time.monotonic() + self.timeout
        while not self._done:
            self._absorb(self._next_message(deadline))
        if not self.plan.get("hold") or self.result.error is not None:
            self._reap()
        return self.result

    def go(self) -> None:
        """Let an ``await_go`` child start its actions."""
        os.write(self._to_child, b"go\n")

    def release(self) -> ActorResult:
        if self._proc.returncode is None:
            try:
                os.write(self._to_child, b"release\n")
            except BrokenPipeError:
                pass
        self._reap()
        return self.result

    def kill(self) -> None:
        if self._proc.returncode is None:
            os.kill(self.pid, signal.SIGKILL)
        self._reap()

    def _read_stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")

    def _reap(self) -> None:
        try:
            self.result.returncode = self._proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.result.returncode = self._proc.wait()
        self.result.stderr = self._read_stderr()
        for fd in (self._from_child, self._to_child):
            try:
                os.close(fd)
            except OSError:
                pass
        self._from_child = self._to_child = -1


def start(plan: dict[str, Any], timeout: float = DEFAULT_TIMEOUT) -> Actor:
    """Start an actor; the user namespace, if any, is mapped before this returns."""
    return Actor(plan, timeout)


def spawn(plan: dict[str, Any], timeout: float = DEFAULT_TIMEOUT) -> ActorResult:
    """Run an actor to completion (released at once if the plan holds it)."""
    actor = start(plan, timeout)
    try:
        result = actor.wait()
    finally:
        actor.release()
    return result


if __name__ == "__main__":
    child_main(sys.argv)
