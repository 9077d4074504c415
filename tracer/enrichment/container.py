"""Which container engine and OCI runtime run the process, its id and name.

`detect_container` is pure: it weighs clues (cgroup paths, ancestor processes,
the `container=` variable, /run/.containerenv, runtime state dirs) and says for
each answer which clue gave it.  `gather_state_dirs` is the only I/O here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional

from tracer.enrichment import procfs
from tracer.in_root import read_in_root
from tracer.host import HostPaths

_ID = r"([0-9a-f]{64})"
# (pattern on a cgroup path, engine); the first group is the container id
_CGROUP_PATTERNS = [
    (re.compile(r"libpod-(?:conmon-)?" + _ID), "podman"),
    (re.compile(r"crio-(?:conmon-)?" + _ID), "cri-o"),
    (re.compile(r"cri-containerd-" + _ID), "containerd"),
    (re.compile(r"docker-" + _ID + r"\.scope"), "docker"),
    (re.compile(r"/docker/" + _ID), "docker"),
    (re.compile(r"lxc\.payload\.([^/]+)"), "lxc"),
    (re.compile(r"^/lxc/([^/]+)"), "lxc"),
]
_KUBEPODS = re.compile(r"kubepods")
_ENV_ENGINES = {"podman": "podman", "docker": "docker", "lxc": "lxc", "oci": "oci",
                "crio": "cri-o", "cri-o": "cri-o"}
RUNTIMES = ("runc", "crun")


@dataclass
class ContainerClues:
    cgroup_paths: list[str] = field(default_factory=list)
    ancestors: list[dict[str, object]] = field(default_factory=list)
    env_container: Optional[str] = None
    containerenv: Optional[dict[str, str]] = None  # /run/.containerenv key=value
    state_dirs: dict[str, str] = field(default_factory=dict)  # runtime -> dir holding the id
    userns_level: Optional[int] = None  # None: the sensor could not capture it
    userns_owner_uid: Optional[int] = None


Answer = tuple[object, str]  # (value, the clue it came from)


def _argv_option(argv: list[str], *names: str) -> Optional[str]:
    for i, arg in enumerate(argv):
        if arg in names and i + 1 < len(argv):
            return argv[i + 1]
        for name in names:
            if name.startswith("--") and arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _from_ancestors(clues: ContainerClues, out: dict[str, Answer]) -> None:
    for anc in clues.ancestors:
        comm = str(anc.get("comm", ""))
        argv = [str(a) for a in anc.get("argv", [])]  # type: ignore[attr-defined]
        where = f"ancestor {comm} (pid {anc.get('pid')})"
        if comm == "conmon":
            exit_cmd = _argv_option(argv, "--exit-command") or ""
            engine = "podman" if "podman" in exit_cmd or "libpod" in " ".join(argv) else "cri-o"
            out.setdefault("engine", (engine, where))
            runtime = _argv_option(argv, "-r", "--runtime")
            if runtime:
                out.setdefault("runtime", (os.path.basename(runtime), where + " -r"))
            cid = _argv_option(argv, "-c", "--cid")
            if cid:
                out.setdefault("id", (cid, where + " -c"))
            name = _argv_option(argv, "-n", "--name")
            if name:
                out.setdefault("name", (name, where + " -n"))
            return
        if comm.startswith("containerd-shim"):
            namespace = _argv_option(argv, "-namespace", "--namespace")
            engine = {"moby": "docker", "k8s.io": "kubernetes"}.get(namespace or "", "containerd")
            out.setdefault("engine", (engine, where))
            runtime = "crun" if "crun" in " ".join(argv) else "runc"
            out.setdefault("runtime", (runtime, where))
            cid = _argv_option(argv, "-id", "--id")
            if cid:
                out.setdefault("id", (cid, where + " -id"))
            return
        if comm in ("lxc-start", "lxc-monitord") or comm.startswith("[lxc monitor]"):
            out.setdefault("engine", ("lxc", where))
            return


def detect_container(clues: ContainerClues) -> dict[str, Answer]:
    """engine, runtime, id, name, kubernetes, rootless -> (value, clue)."""
    out: dict[str, Answer] = {}
    for path in clues.cgroup_paths:
        for pattern, engine in _CGROUP_PATTERNS:
            match = pattern.search(path)
            if match:
                out.setdefault("engine", (engine, f"cgroup path {path}"))
                key = "name" if engine == "lxc" else "id"
                out.setdefault(key, (match.group(1), f"cgroup path {path}"))
        if _KUBEPODS.search(path):
            out.setdefault("kubernetes", (True, f"cgroup path {path}"))
    _from_ancestors(clues, out)
    env = clues.containerenv
    if env is not None:
        engine = env.get("engine", "podman").split("-")[0] or "podman"
        out.setdefault("engine", (engine, "/run/.containerenv"))
        if env.get("id"):
            out.setdefault("id", (env["id"], "/run/.containerenv id"))
        if env.get("name"):
            out.setdefault("name", (env["name"], "/run/.containerenv name"))
        if env.get("rootless") in ("0", "1"):
            out.setdefault("rootless", (env["rootless"] == "1", "/run/.containerenv rootless"))
    if clues.env_container:
        engine = _ENV_ENGINES.get(clues.env_container, clues.env_container)
        out.setdefault("engine", (engine, f"environ container={clues.env_container}"))
    for runtime, where in sorted(clues.state_dirs.items()):
        out.setdefault("runtime", (runtime, f"runtime state dir {where}"))
    level, owner = clues.userns_level, clues.userns_owner_uid
    if ("engine" in out or "id" in out) and level is not None and owner is not None:
        out.setdefault("rootless", (level > 0 and owner != 0, "userns level and owner uid (kernel)"))
    return out


def parse_containerenv(text: str) -> dict[str, str]:
    """podman's /run/.containerenv: `key="value"` lines (empty unless privileged)."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip().isidentifier():
            out[key.strip()] = value.strip().strip('"')
    return out


def state_dir_candidates(host: HostPaths, owner_uid: int) -> dict[str, list[str]]:
    """Where runc/crun keep per-container state, rootful and rootless."""
    user_run = os.path.join(host.run, "user", str(owner_uid))
    return {rt: [os.path.join(host.run, rt), os.path.join(user_run, rt)] for rt in RUNTIMES}


def gather_state_dirs(host: HostPaths, container_id: Optional[str],
                      owner_uid: int) -> dict[str, str]:
    """runtime -> the state dir that holds this container id."""
    if not container_id or not re.fullmatch(r"[0-9a-zA-Z_.-]{1,128}", container_id):
        return {}
    found = {}
    for runtime, dirs in state_dir_candidates(host, owner_uid).items():
        for d in dirs:
            if os.path.isdir(os.path.join(d, container_id)):
                found[runtime] = d
                break
    return found


def podman_storage_has(host: HostPaths, container_id: str, owner_uid: int) -> Optional[str]:
    """podman's runroot for the id: /run/containers/storage or /run/user/UID/containers."""
    for base in (os.path.join(host.run, "containers/storage"),
                 os.path.join(host.run, "user", str(owner_uid), "containers")):
        if os.path.isdir(os.path.join(base, "overlay-containers", container_id)):
            return base
    return None


def read_containerenv(root_dir: str) -> Optional[dict[str, str]]:
    text = read_in_root(root_dir, "/run/.containerenv")
    return None if text is None else parse_containerenv(text)
