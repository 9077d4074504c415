"""What the container engines and OCI runtimes write about a container, read
from their state directories: runc's state.json, crun's status, the bundle's
OCI config.json, docker's config.v2.json, podman's conmon and events log,
and the Kubernetes CRI annotations and kubepods cgroup layouts.

Every reader takes host paths, reads bounded amounts and never raises on
hostile or half-written input: a file being written is simply not there yet.
Files are read through `StateFiles` (state_files.py): non-blocking, no final
symlink, regular files only, and under a user's state directory that user's own.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from tracer.enrichment import procfs
from tracer.enrichment.state_files import StateFiles
from tracer.host import HostPaths

STATE_BYTES = 4 << 20        # runc's state.json repeats the whole config
CONFIG_BYTES = 4 << 20
EVENTS_LOG_TAIL = 512 << 10  # podman's events.log: only its tail is read
MAX_MOUNTS = 64
MAX_DEVICE_RULES = 128
MAX_ANNOTATIONS = 64
MAX_TEXT = 512               # any single string kept from these files
ID = re.compile(r"[0-9A-Za-z_.-]{1,128}")


def host_file(host: HostPaths, path: str) -> str:
    """An absolute path written by a runtime, under the injected host root."""
    root = os.path.dirname(host.dev.rstrip("/")) or "/"
    return os.path.join(root, path.lstrip("/")) if root != "/" else path


ROOT_STATE = StateFiles()  # the runtime's own (root-owned) state: only the file checks


def _json(files: StateFiles, path: str, limit: int) -> Optional[dict[str, Any]]:
    raw = files.read(path, limit)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _text(value: Any) -> Optional[str]:
    return value[:MAX_TEXT] if isinstance(value, str) else None


def _list(value: Any) -> list[Any]:
    """A JSON array, or nothing: a hostile file may put any value where one belongs."""
    return value if isinstance(value, list) else []


def _int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass
class RuntimeState:
    """One container as its OCI runtime records it."""

    runtime: str
    id: str
    state_dir: str
    pid: Optional[int] = None
    bundle: Optional[str] = None
    rootfs: Optional[str] = None
    cgroup_paths: dict[str, str] = field(default_factory=dict)  # controller -> host dir
    cgroup_path: Optional[str] = None                           # as in config.json
    rootless: Optional[bool] = None
    created: Optional[float] = None  # when the runtime created it (epoch seconds)


def parse_created(value: Any) -> Optional[float]:
    """runc/crun's RFC 3339 creation time, nanoseconds and all."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)",
                         value.strip())
    if match is None:
        return None
    import datetime as dt
    try:
        base = dt.datetime.fromisoformat(match[1] + (match[3] if match[3] != "Z" else "+00:00"))
    except ValueError:
        return None
    return base.timestamp() + (float("0." + match[2]) if match[2] else 0.0)


def read_runtime_state(host: HostPaths, runtime: str, state_root: str, cid: str,
                       files: StateFiles = ROOT_STATE) -> Optional[RuntimeState]:
    """runc: <root>/<id>/state.json; crun: <root>/<id>/status."""
    if not ID.fullmatch(cid):
        return None
    directory = os.path.join(state_root, cid)
    if runtime == "crun":
        data = _json(files, os.path.join(directory, "status"), STATE_BYTES)
        if data is None:
            return None
        state = RuntimeState("crun", cid, directory, pid=_int(data.get("pid")),
                             bundle=_text(data.get("bundle")), rootfs=_text(data.get("rootfs")),
                             cgroup_path=_text(data.get("cgroup-path")),
                             created=parse_created(data.get("created")))
        return state
    data = _json(files, os.path.join(directory, "state.json"), STATE_BYTES)
    if data is None:
        return None
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    assert isinstance(config, dict)
    labels = [x for x in _list(config.get("labels")) if isinstance(x, str)]
    bundle = next((x[len("bundle="):] for x in labels if x.startswith("bundle=")), None)
    paths = data.get("cgroup_paths") if isinstance(data.get("cgroup_paths"), dict) else {}
    assert isinstance(paths, dict)
    return RuntimeState(
        "runc", cid, directory, pid=_int(data.get("init_process_pid")), bundle=_text(bundle),
        rootfs=_text(config.get("rootfs")),
        cgroup_paths={(k or "unified")[:64]: v[:MAX_TEXT] for k, v in list(paths.items())[:32]
                      if isinstance(k, str) and isinstance(v, str)},
        rootless=data.get("rootless") if isinstance(data.get("rootless"), bool) else None,
        created=parse_created(data.get("created")))


def _device_rule(raw: Any) -> Optional[dict[str, Any]]:
    if not isinstance(raw, dict):
        return None
    return {"allow": bool(raw.get("allow")), "type": _text(raw.get("type")) or "a",
            "major": _int(raw.get("major")), "minor": _int(raw.get("minor")),
            "access": _text(raw.get("access")) or "rwm"}


def _id_mappings(raw: Any) -> Optional[list[list[int]]]:
    if not isinstance(raw, list):
        return None
    out = []
    for r in raw[:340]:
        if isinstance(r, dict):
            inside, outside, size = (_int(r.get(k)) for k in ("containerID", "hostID", "size"))
            if inside is not None and outside is not None and size is not None:
                out.append([inside, outside, size])
    return out


def read_oci_config(host: HostPaths, bundle: str,
                    files: StateFiles = ROOT_STATE) -> Optional[dict[str, Any]]:
    """The parts of the bundle's config.json a verdict can use."""
    data = _json(files, os.path.join(host_file(host, bundle), "config.json"), CONFIG_BYTES)
    if data is None:
        return None
    process = data.get("process") if isinstance(data.get("process"), dict) else {}
    user = process.get("user") if isinstance(process, dict) and isinstance(process.get("user"), dict) else {}
    linux = data.get("linux") if isinstance(data.get("linux"), dict) else {}
    assert isinstance(user, dict) and isinstance(linux, dict)
    resources = linux.get("resources") if isinstance(linux.get("resources"), dict) else {}
    annotations = data.get("annotations") if isinstance(data.get("annotations"), dict) else {}
    assert isinstance(resources, dict) and isinstance(annotations, dict)
    mounts = []
    for m in (data.get("mounts") or [])[:MAX_MOUNTS] if isinstance(data.get("mounts"), list) else []:
        if isinstance(m, dict) and isinstance(m.get("destination"), str):
            options = [o[:64] for o in _list(m.get("options")) if isinstance(o, str)][:32]
            mounts.append({"destination": m["destination"][:MAX_TEXT],
                           "source": _text(m.get("source")), "type": _text(m.get("type")),
                           "options": options})
    devices = []
    for d in (linux.get("devices") or [])[:MAX_DEVICE_RULES] if isinstance(linux.get("devices"), list) else []:
        if isinstance(d, dict) and isinstance(d.get("path"), str):
            devices.append({"path": d["path"][:MAX_TEXT], "type": _text(d.get("type")),
                            "major": _int(d.get("major")), "minor": _int(d.get("minor")),
                            "uid": _int(d.get("uid")), "gid": _int(d.get("gid")),
                            "mode": _int(d.get("fileMode"))})
    rules = [r for r in (_device_rule(x) for x in (resources.get("devices") or [])[:MAX_DEVICE_RULES]
                         if isinstance(resources.get("devices"), list)) if r]
    root = data.get("root") if isinstance(data.get("root"), dict) else {}
    assert isinstance(root, dict)
    return {
        "user": {"uid": _int(user.get("uid")), "gid": _int(user.get("gid")),
                 "additional_gids": [g for g in _list(user.get("additionalGids"))
                                     if _int(g) is not None][:64]},
        "annotations": {k[:128]: v[:MAX_TEXT] for k, v in list(annotations.items())[:MAX_ANNOTATIONS]
                        if isinstance(k, str) and isinstance(v, str)},
        "mounts": mounts, "devices": devices, "device_rules": rules,
        "uid_mappings": _id_mappings(linux.get("uidMappings")),
        "gid_mappings": _id_mappings(linux.get("gidMappings")),
        "cgroups_path": _text(linux.get("cgroupsPath")), "root": _text(root.get("path")),
        "hostname": _text(data.get("hostname")),
    }


def _mount_source(config: dict[str, Any], destination: str) -> Optional[str]:
    return next((m["source"] for m in config.get("mounts", [])
                 if m["destination"] == destination and m.get("source")), None)


def docker_identity(host: HostPaths, config: dict[str, Any],
                    files: StateFiles = ROOT_STATE) -> Optional[dict[str, Any]]:
    """docker's name and image from <data-root>/containers/<id>/config.v2.json,
    found through the /etc/hostname bind mount docker gives every container."""
    source = _mount_source(config, "/etc/hostname")
    if not source or "/containers/" not in source:
        return None
    data = _json(files, os.path.join(host_file(host, os.path.dirname(source)),
                                     "config.v2.json"), CONFIG_BYTES)
    if data is None:
        return None
    inner = data.get("Config") if isinstance(data.get("Config"), dict) else {}
    assert isinstance(inner, dict)
    name = _text(data.get("Name"))
    return {"engine": "docker", "name": name.lstrip("/") if name else None,
            "image": _text(inner.get("Image")) or _text(data.get("Image")),
            "origin": os.path.join(os.path.dirname(source), "config.v2.json")}


def _conmon_name(host: HostPaths, pid_file: str, files: StateFiles) -> Optional[str]:
    raw_pid = files.read(pid_file, 64)
    text = raw_pid.decode("ascii", "replace").strip() if raw_pid else ""
    if not text.isdigit() or len(text) > 10:
        return None
    pid, _ = files.init_pid(host.proc, int(text))  # a user's conmon runs in that user's userns
    if pid is None:
        return None
    raw = procfs.read_bytes(host.proc_pid(pid, "cmdline"), 64 << 10) or b""
    argv = [a.decode("utf-8", "replace") for a in raw.split(b"\0")]
    if not argv or not argv[0].endswith("conmon"):
        return None
    for i, arg in enumerate(argv[:-1]):
        if arg in ("-n", "--name"):
            return argv[i + 1][:MAX_TEXT]
    return None


def podman_events_name(log_path: str, cid: str,
                       files: StateFiles = ROOT_STATE) -> Optional[dict[str, Any]]:
    """The container's name and image from the tail of podman's events.log."""
    tail = files.read(log_path, EVENTS_LOG_TAIL, tail=True)
    if tail is None:
        return None
    found: Optional[dict[str, Any]] = None
    needle = cid.encode()
    for line in tail.splitlines():
        if needle not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("ID") == cid and _text(record.get("Name")):
            found = {"name": _text(record.get("Name")), "image": _text(record.get("Image"))}
    return found


def podman_identity(host: HostPaths, config: dict[str, Any], cid: str,
                    owner_uid: int, files: StateFiles = ROOT_STATE) -> Optional[dict[str, Any]]:
    """podman's name: conmon's `-n` while it lives, else its events log."""
    if config.get("annotations", {}).get("io.container.manager") != "libpod":
        return None
    out: dict[str, Any] = {"engine": "podman", "name": None, "image": None}
    env_source = _mount_source(config, "/run/.containerenv") or _mount_source(config, "/etc/hostname")
    if env_source:
        userdata = host_file(host, os.path.dirname(env_source))
        name = _conmon_name(host, os.path.join(userdata, "conmon.pid"), files)
        if name:
            out.update(name=name, origin=os.path.join(os.path.dirname(env_source), "conmon.pid"))
    if out["name"] is None:
        for log in (os.path.join(host.run, "libpod/events/events.log"),
                    os.path.join(host.run, "user", str(owner_uid), "libpod/tmp/events/events.log")):
            found = podman_events_name(log, cid, files)
            if found:
                out.update(found, origin=log)
                break
    return out


# --- Kubernetes ---------------------------------------------------------------------

CRI_ANNOTATIONS = {  # containerd's CRI plugin, then CRI-O / dockershim spellings
    "pod": ("io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"),
    "namespace": ("io.kubernetes.cri.sandbox-namespace", "io.kubernetes.pod.namespace"),
    "container": ("io.kubernetes.cri.container-name", "io.kubernetes.container.name"),
    "pod_uid": ("io.kubernetes.cri.sandbox-uid", "io.kubernetes.pod.uid"),
}


def kubernetes_from_annotations(annotations: dict[str, str]) -> dict[str, str]:
    out = {}
    for key, names in CRI_ANNOTATIONS.items():
        value = next((annotations[n] for n in names if annotations.get(n)), None)
        if value:
            out[key] = value
    return out


_KUBE_SYSTEMD = re.compile(
    r"kubepods(?:-(?P<qos>besteffort|burstable))?-pod(?P<uid>[0-9a-f_]{36})\.slice"
    r"(?:/(?P<rt>cri-containerd|crio|docker)-(?P<id>[0-9a-f]{64})\.scope)?")
_KUBE_CGROUPFS = re.compile(
    r"/kubepods(?:/(?P<qos>besteffort|burstable))?/pod(?P<uid>[0-9a-f-]{36})"
    r"(?:/(?P<id>[0-9a-f]{64}))?")
_RUNTIME_OF_PREFIX = {"cri-containerd": "containerd", "crio": "cri-o", "docker": "docker"}


def kubernetes_from_cgroup(path: str) -> dict[str, str]:
    """Pod uid, QoS class, container id and runtime from a kubepods cgroup path
    (systemd driver: kubepods.slice/...-pod<uid>.slice/<rt>-<id>.scope;
    cgroupfs driver: /kubepods/<qos>/pod<uid>/<id>)."""
    if "kubepods" not in path:  # both layouts name it: most cgroups are no pod's
        return {}
    match = _KUBE_SYSTEMD.search(path)
    if match:
        out = {"pod_uid": match["uid"].replace("_", "-"), "qos": match["qos"] or "guaranteed"}
        if match["id"]:
            out.update(container_id=match["id"], cri_runtime=_RUNTIME_OF_PREFIX[match["rt"]])
        return out
    match = _KUBE_CGROUPFS.search(path)
    if match:
        out = {"pod_uid": match["uid"], "qos": match["qos"] or "guaranteed"}
        if match["id"]:
            out["container_id"] = match["id"]
        return out
    return {}
