"""The kernel's container-start signals (bpf/container_start.bpf.c), decoded, and
what an OCI runtime's or a container monitor's command line says: the runtime's
state root (--root), the container id, the bundle.

Which signals, and why, was measured on this project's machine (runc, crun,
rootful and rootless podman, docker, containerd): a cgroup mkdir comes from
rootful runtimes only (a rootless one on a v1 host makes no cgroup), with the
runtime itself as the task (its command line names the state root and the
id); the exec of pid 1 of a new pid namespace comes from every runtime, just
before the container's program runs, with the container's own namespaces and
cgroup.  See docs/architecture.md.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from typing import Optional

from tracer.event import UserNs
from tracer.sensors.bpf_constants import (CGROUP_NAME_CAP, EV_START, F_CGROUP_NAMED, F_CGROUP_V1,
                                          F_START_ARGV_CUT, F_START_PATH_CUT, START_ARGV_CAP,
                                          START_EXEC, START_MKDIR, START_PATH_CAP)
from tracer.sensors.bpf_event import DecodeError

# Mirrors struct start_event; the C side asserts sizeof() == START_EVENT_SIZE.
START = struct.Struct("<IIQQ" "IIIIII" "II" "IIII" "16s" f"{CGROUP_NAME_CAP}s{CGROUP_NAME_CAP}s"
                      f"{START_PATH_CAP}s{START_ARGV_CAP}s")
START_EVENT_SIZE = START.size
ID = re.compile(r"[0-9A-Za-z_.-]{1,128}")
RUNTIMES = ("runc", "crun")
ENGINE_OF_NAMESPACE = {"moby": "docker", "k8s.io": "kubernetes"}  # containerd namespaces


def is_start_record(raw: bytes) -> bool:
    return len(raw) >= 4 and struct.unpack_from("<I", raw)[0] == EV_START


def _cstr(raw: bytes) -> bytes:
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


@dataclass(frozen=True)
class ContainerStart:
    """One signal.  exec: `pid` is the container's init (pid 1 in its namespace),
    the namespaces and cgroup are the container's.  mkdir: `pid` is the task that
    made the cgroup (the runtime), `cgroup_id`/`path` the new cgroup, `argv` the
    maker's command line as the kernel read it from its memory."""

    how: str                      # "exec" | "mkdir"
    time: float                   # epoch seconds
    cgroup_id: int
    pid: int
    ppid: int
    uid: int
    userns: UserNs
    mntns: int
    pidns: int
    comm: bytes
    level: int = 0                # mkdir: the cgroup's depth
    cgroup_leaf: Optional[bytes] = None
    cgroup_parent: Optional[bytes] = None
    cgroup_hierarchy: Optional[str] = None
    path: Optional[bytes] = None
    path_cut: bool = False
    argv: tuple[bytes, ...] = ()
    argv_cut: bool = False


def decode_start(raw: bytes, clock_offset: float) -> ContainerStart:
    if len(raw) < START_EVENT_SIZE:
        raise DecodeError("short_start_record")
    (kind, how, ts_ns, cgroup_id, tgid, ppid, uid, uns_inum, uns_level, uns_owner, mntns, pidns,
     level, flags, argv_len, _pad, comm, leaf, parent, path, argv) = START.unpack_from(raw)
    if kind != EV_START or how not in (START_EXEC, START_MKDIR):
        raise DecodeError("bad_start_record")
    named = bool(flags & F_CGROUP_NAMED)
    args = tuple(a for a in argv[:min(argv_len, START_ARGV_CAP)].split(b"\0"))
    while args and not args[-1]:
        args = args[:-1]
    return ContainerStart(
        how="exec" if how == START_EXEC else "mkdir", time=clock_offset + ts_ns / 1e9,
        cgroup_id=cgroup_id, pid=tgid, ppid=ppid, uid=uid,
        userns=UserNs(uns_inum, uns_level, uns_owner), mntns=mntns, pidns=pidns,
        comm=_cstr(comm), level=level,
        cgroup_leaf=_cstr(leaf) if named else None, cgroup_parent=_cstr(parent) if named else None,
        cgroup_hierarchy=("v1 devices" if flags & F_CGROUP_V1 else "v2") if named else None,
        path=_cstr(path) if how == START_MKDIR else None, path_cut=bool(flags & F_START_PATH_CUT),
        argv=args, argv_cut=bool(flags & F_START_ARGV_CUT))


@dataclass(frozen=True)
class RuntimeCommand:
    """What `runc|crun [global options] create|run [options] <id>` says."""

    runtime: str
    command: str
    container_id: Optional[str]
    root: Optional[str]            # --root; None: the runtime's default
    bundle: Optional[str]


_GLOBAL_VALUED = {"--root", "--log", "--log-format", "--criu", "--rootless", "--cgroup-manager"}
_COMMANDS = {"create", "run"}


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def runtime_command(argv: tuple[bytes, ...], cut: bool = False) -> Optional[RuntimeCommand]:
    """runc's or crun's create/run command line; None for anything else.  The
    container id is the last argument (both runtimes' syntax), unless the line
    was cut."""
    if not argv:
        return None
    runtime = os.path.basename(_text(argv[0]))
    if runtime not in RUNTIMES:
        return None
    words = [_text(a) for a in argv[1:]]
    root = bundle = command = None
    i = 0
    while i < len(words):
        word = words[i]
        name, eq, value = word.partition("=")
        if command is None:
            if name in _GLOBAL_VALUED:
                if not eq:
                    value = words[i + 1] if i + 1 < len(words) else ""
                    i += 1
                if name == "--root":
                    root = value
            elif word in _COMMANDS:
                command = word
            elif not word.startswith("-"):
                return None  # another command (start, delete, exec, ...)
        elif name in ("--bundle", "-b"):
            if not eq:
                value = words[i + 1] if i + 1 < len(words) else ""
                i += 1
            bundle = value
        i += 1
    if command is None:
        return None
    cid = words[-1] if words and not cut and ID.fullmatch(words[-1]) else None
    return RuntimeCommand(runtime, command, cid, root or None, bundle or None)


@dataclass(frozen=True)
class MonitorCommand:
    """A container's monitor, the parent of its init: podman's conmon or a
    containerd shim; what its command line names."""

    monitor: str                   # "conmon" | "containerd-shim"
    engine: str                    # podman, cri-o (conmon); docker, kubernetes, containerd (shim)
    container_id: Optional[str]
    runtime: Optional[str]         # conmon -r
    namespace: Optional[str]       # shim -namespace (moby: docker, k8s.io: Kubernetes)
    name: Optional[str]            # conmon -n
    runtime_args: tuple[str, ...] = ()


def _option(words: list[str], *names: str) -> Optional[str]:
    for i, word in enumerate(words):
        for name in names:
            if word == name and i + 1 < len(words):
                return words[i + 1]
            if word.startswith(name + "="):
                return word.split("=", 1)[1]
    return None


def monitor_command(argv: tuple[bytes, ...]) -> Optional[MonitorCommand]:
    if not argv:
        return None
    words = [_text(a) for a in argv]
    base = os.path.basename(words[0])
    if base == "conmon":
        extra = tuple(words[i + 1] for i, w in enumerate(words[:-1]) if w == "--runtime-arg")
        runtime = _option(words, "-r", "--runtime")
        engine = "podman" if any("podman" in w or "libpod" in w for w in words) else "cri-o"
        return MonitorCommand("conmon", engine, _option(words, "-c", "--cid"),
                              os.path.basename(runtime) if runtime else None, None,
                              _option(words, "-n", "--name"), extra)
    if base.startswith("containerd-shim"):
        namespace = _option(words, "-namespace", "--namespace")
        engine = ENGINE_OF_NAMESPACE.get(namespace or "", "containerd")
        return MonitorCommand("containerd-shim", engine, _option(words, "-id", "--id"), "runc",
                              namespace, None)
    return None


def mkdir_hierarchy(proc_root: str = "/proc") -> Optional[int]:
    """The cgroup hierarchy whose mkdirs signal container starts: the v2 one (id 0)
    when cgroup2 is mounted, else the v1 devices controller's (/proc/cgroups)."""
    try:
        with open(os.path.join(proc_root, "self/mountinfo"), "rb") as f:
            if any(b" - cgroup2 " in line for line in f):
                return 0
        with open(os.path.join(proc_root, "cgroups"), "rb") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 4 and fields[0] == b"devices" and fields[1].isdigit():
                    return int(fields[1]) if fields[3] == b"1" and int(fields[1]) else None
    except OSError:
        return None
    return None
