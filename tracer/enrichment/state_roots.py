"""Where an OCI runtime keeps its containers' state, found, not listed: from the
runtime's own command line (`runc --root DIR`, caught by the kernel as it made
the container's cgroup), from the container monitor's (conmon's `--runtime-arg
--root=DIR`, its XDG_RUNTIME_DIR: rootless podman without a login session uses
/tmp/podman-run-UID), from a containerd shim's namespace, and from the engines
running when gputrace starts (dockerd's --exec-root).

A directory another mount namespace holds (a private /tmp: the unit's
PrivateTmp=yes hides /tmp/podman-run-UID) is reached through the process's own
root: opened with openat2(RESOLVE_IN_ROOT) from /proc/PID/root, and watched and
read through that O_PATH descriptor (/proc/self/fd/N), so a path swapped after
it was found cannot redirect us.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Optional

from tracer.enrichment import procfs
from tracer.host import HostPaths
from tracer.in_root import open_in_root
from tracer.sensors.container_starts import MonitorCommand, RuntimeCommand, monitor_command

MAX_HELD_ROOTS = 64     # directories held open for another mount namespace
MAX_ENV_BYTES = 64 << 10
MAX_ARGV_BYTES = 64 << 10
CONTAINERD_RUNC_ROOT = "/run/containerd/runc"  # the runc v2 shim's default Root option


@dataclass(frozen=True)
class FoundRoot:
    """A state root: `named` as the runtime names it in its own mount namespace,
    `directory` as this process reaches it, and why we believe it."""

    named: str
    directory: str
    runtime: str
    why: str


def argv_of(host: HostPaths, pid: int) -> tuple[bytes, ...]:
    raw = procfs.read_bytes(host.proc_pid(pid, "cmdline"), MAX_ARGV_BYTES) or b""
    words = raw.split(b"\0")
    while words and not words[-1]:
        words.pop()
    return tuple(words)


def env_of(host: HostPaths, pid: int, *names: str) -> dict[str, str]:
    raw = procfs.read_bytes(host.proc_pid(pid, "environ"), MAX_ENV_BYTES) or b""
    out = {}
    for item in raw.split(b"\0"):
        key, eq, value = item.partition(b"=")
        name = key.decode("ascii", "replace")
        if eq and name in names:
            out[name] = value.decode("utf-8", "surrogateescape")
    return out


def _rootless(host: HostPaths, pid: int) -> Optional[bool]:
    """Does the process run as a user other than root (runc's test for honouring
    XDG_RUNTIME_DIR)?  None when it is gone."""
    text = procfs.read_text(host.proc_pid(pid, "status"), 4096)
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("Uid:"):
            fields = line.split()
            return len(fields) > 2 and fields[2] != "0"
    return None


def runtime_default_root(runtime: str, rootless: bool, xdg: Optional[str]) -> str:
    """runc's and crun's own rule: $XDG_RUNTIME_DIR/<runtime> for a rootless caller
    that has it, else /run/<runtime>."""
    if rootless and xdg and os.path.isabs(xdg):
        return os.path.join(xdg, runtime)
    return os.path.join("/run", runtime)


def root_of_runtime(host: HostPaths, cmd: RuntimeCommand, pid: int, uid: Optional[int] = None,
                    userns_level: Optional[int] = None) -> tuple[str, str]:
    """(named root, why) for a runtime's create/run command line; `uid` and
    `userns_level` as the kernel saw the runtime, when known (root in the initial
    user namespace never takes XDG_RUNTIME_DIR: nothing to read)."""
    if cmd.root:
        return cmd.root, f"{cmd.runtime} --root {cmd.root} (pid {pid})"
    if uid == 0 and userns_level == 0:
        return os.path.join("/run", cmd.runtime), f"{cmd.runtime}'s default for root (pid {pid})"
    xdg = env_of(host, pid, "XDG_RUNTIME_DIR").get("XDG_RUNTIME_DIR")
    root = runtime_default_root(cmd.runtime, bool(_rootless(host, pid)), xdg)
    return root, f"{cmd.runtime}'s default for pid {pid}" + (f" (XDG_RUNTIME_DIR={xdg})" if xdg else "")


def root_of_monitor(host: HostPaths, mon: MonitorCommand, pid: int) -> Optional[tuple[str, str]]:
    """(named root, why) for a container's monitor: conmon passes the runtime its
    --root (or the runtime takes its default in conmon's environment); a
    containerd shim runs runc with Root=/run/containerd/runc/<namespace>."""
    if mon.monitor == "containerd-shim":
        if not mon.namespace:
            return None
        return (os.path.join(CONTAINERD_RUNC_ROOT, mon.namespace),
                f"containerd shim (pid {pid}) of namespace {mon.namespace}")
    if mon.runtime is None:
        return None
    for arg in mon.runtime_args:
        if arg.startswith("--root="):
            return arg.split("=", 1)[1], f"conmon (pid {pid}) --runtime-arg {arg}"
    xdg = env_of(host, pid, "XDG_RUNTIME_DIR").get("XDG_RUNTIME_DIR")
    root = runtime_default_root(mon.runtime, bool(_rootless(host, pid)), xdg)
    return root, (f"{mon.runtime}'s default in the environment of conmon (pid {pid})"
                  + (f": XDG_RUNTIME_DIR={xdg}" if xdg else ""))


class RootReacher:
    """Turns a root named by a process into a directory this process can use."""

    def __init__(self, host: HostPaths) -> None:
        self.host = host
        self._held: dict[tuple[str, str], str] = {}   # (mount ns, named) -> /proc/self/fd/N
        self._lock = threading.Lock()
        self.counters: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def reach(self, pid: int, named: str) -> Optional[str]:
        """`named` as process `pid` sees it: the path itself when we share its mount
        namespace, else an O_PATH descriptor opened through its root; PID 1's root
        when `pid` is gone.  None when it is not a directory there."""
        if not os.path.isabs(named):
            return None
        for who in (pid, 1):
            ns = procfs.read_link(self.host.proc_pid(who, "ns", "mnt"))
            if ns is None:
                continue
            if ns == procfs.read_link(os.path.join(self.host.proc, "self/ns/mnt")):
                local = os.path.join(os.path.dirname(self.host.dev.rstrip("/")) or "/",
                                     named.lstrip("/"))
                return local if os.path.isdir(local) else None
            return self._held_dir(ns, who, named)
        return None

    def _held_dir(self, ns: str, pid: int, named: str) -> Optional[str]:
        with self._lock:
            known = self._held.get((ns, named))
            if known is not None:
                return known
            if len(self._held) >= MAX_HELD_ROOTS:
                self._count("state_roots_not_held")
                return None
            fd = open_in_root(self.host.proc_pid(pid, "root"), named,
                              os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            if fd is None:
                return None
            path = f"/proc/self/fd/{fd}/."  # "." : a watch or lstat sees the dir, not the link
            self._held[(ns, named)] = path
            self._count("state_roots_via_proc_root")
            return path


def engine_roots(host: HostPaths, limit: int = 100000) -> list[tuple[int, str, str, str]]:
    """State roots of engines and monitors running now: (pid, named root, runtime,
    why).  dockerd's runc state is <exec-root>/runtime-runc/moby (default exec root
    /var/run/docker); each conmon's as root_of_monitor finds it (rootless podman
    with or without a login session)."""
    out = []
    for name in procfs.list_dir(host.proc)[:limit]:
        if not name.isdigit():
            continue
        pid = int(name)
        comm = (procfs.read_text(host.proc_pid(pid, "comm"), 64) or "").strip()
        if comm == "dockerd":
            words = [a.decode("utf-8", "surrogateescape") for a in argv_of(host, pid)]
            exec_root = "/var/run/docker"
            for i, word in enumerate(words):
                if word == "--exec-root" and i + 1 < len(words):
                    exec_root = words[i + 1]
                elif word.startswith("--exec-root="):
                    exec_root = word.split("=", 1)[1]
            out.append((pid, os.path.join(exec_root, "runtime-runc", "moby"), "runc",
                        f"dockerd (pid {pid}) --exec-root {exec_root}"))
        elif comm == "conmon":
            mon = monitor_command(argv_of(host, pid))
            found = root_of_monitor(host, mon, pid) if mon is not None else None
            if mon is not None and found is not None and mon.runtime:
                out.append((pid, found[0], mon.runtime, found[1]))
    return out
