"""CDI specs (Container Device Interface): the one model of them.

A spec is a YAML or JSON file in a spec directory (`/etc/cdi`, `/var/run/cdi`;
`HostPaths.cdi_dirs`) naming a `kind` (`vendor.com/class`) and its `devices`,
each with `containerEdits`: the device nodes (`path` in the container,
`hostPath` on the host, optional `type`/`major`/`minor`, `fileMode`,
`permissions` for the device cgroup, `uid`/`gid`) and `additionalGids`.  The
spec-wide `containerEdits` apply to every device of the spec that is requested.
A runtime asked for `--device vendor.com/class=name` takes the device from the
highest-priority directory that has it (the later directory wins).

A node that gives `type` and a non-zero `major` is taken as written: the runtime
does not look at the host node, so a number from before a driver reload is
used as it is (cncf-tags/container-device-interface, `fillMissingInfo`).

Specs are read through `read_specs` (parsed once per file version) and matched
to a refused node with `devices_naming`; host_snapshot's summary and the
enrichment's `cdi.*` facts both come from this model.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import yaml

from tracer.enrichment import procfs
from tracer.host import HostPaths

MAX_SPEC_BYTES = 4 << 20
MAX_SPECS = 64
MAX_DEVICES = 512
MAX_NODES = 64
MAX_TEXT = 4096
SPEC_SUFFIXES = (".yaml", ".json")
# a driver's version in the file names a spec mounts: libcuda.so.550.54.14
LIBRARY_VERSION = re.compile(r"\.so\.(\d{2,4}\.\d{1,4}(?:\.\d{1,4})?)$")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class CdiNode:
    path: str                       # in the container
    host_path: str                  # on the host (`path` when the spec gives none)
    type: Optional[str] = None      # "c", "b", "u", "p"
    major: Optional[int] = None
    minor: Optional[int] = None
    file_mode: Optional[int] = None
    permissions: Optional[str] = None
    uid: Optional[int] = None
    gid: Optional[int] = None

    @property
    def number_as_written(self) -> Optional[tuple[int, int]]:
        """The number a runtime uses without looking at the host node: a node with
        a type and a non-zero major is fully specified."""
        if self.type in ("c", "u", "b") and self.major and self.minor is not None:
            return self.major, self.minor
        return None

    def summary(self) -> dict[str, Any]:
        return {"path": self.path, "host_path": self.host_path, "type": self.type,
                "major": self.major, "minor": self.minor, "file_mode": self.file_mode,
                "permissions": self.permissions, "uid": self.uid, "gid": self.gid}


@dataclass(frozen=True)
class CdiEdits:
    nodes: tuple[CdiNode, ...] = ()
    additional_gids: tuple[int, ...] = ()
    mounts: tuple[str, ...] = ()     # host paths of the mounts (libraries, binaries)


@dataclass(frozen=True)
class CdiDevice:
    name: str
    edits: CdiEdits


@dataclass(frozen=True)
class FileOwner:
    mode: int
    uid: int
    gid: int
    mtime: float


@dataclass(frozen=True)
class CdiSpec:
    path: str
    priority: int                    # index of its directory; the higher wins
    kind: Optional[str] = None
    version: Optional[str] = None
    common: CdiEdits = CdiEdits()
    devices: tuple[CdiDevice, ...] = ()
    file: Optional[FileOwner] = None
    error: Optional[str] = None

    def qualified(self, device: CdiDevice) -> str:
        return f"{self.kind}={device.name}"

    def driver_versions(self) -> list[str]:
        """Driver versions the spec's mounts name (libcuda.so.550.54.14): what it was
        generated for."""
        found = {m.group(1) for edits in [self.common] + [d.edits for d in self.devices]
                 for path in edits.mounts for m in [LIBRARY_VERSION.search(path)] if m}
        return sorted(found)


def _int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: Any) -> Optional[str]:
    return value[:MAX_TEXT] if isinstance(value, str) else None


def _version(value: Any) -> Optional[str]:
    """cdiVersion as written; a scalar only (str() of an alias to a nested list, a
    billion laughs, would build the whole expansion)."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)[:32]
    return None


def _list(raw: dict[str, Any], key: str) -> list[Any]:
    value = raw.get(key)
    return value if isinstance(value, list) else []


def _node(raw: Any) -> Optional[CdiNode]:
    if not isinstance(raw, dict) or not isinstance(raw.get("path"), str):
        return None
    path = raw["path"][:MAX_TEXT]
    return CdiNode(path=path, host_path=_text(raw.get("hostPath")) or path,
                   type=_text(raw.get("type")), major=_int(raw.get("major")),
                   minor=_int(raw.get("minor")), file_mode=_int(raw.get("fileMode")),
                   permissions=_text(raw.get("permissions")), uid=_int(raw.get("uid")),
                   gid=_int(raw.get("gid")))


def _edits(raw: Any) -> CdiEdits:
    if not isinstance(raw, dict):
        return CdiEdits()
    nodes, gids, mounts = (_list(raw, k) for k in ("deviceNodes", "additionalGids", "mounts"))
    return CdiEdits(
        nodes=tuple(n for n in (_node(x) for x in nodes[:MAX_NODES]) if n is not None),
        additional_gids=tuple(g for g in (_int(x) for x in gids[:64]) if g is not None),
        mounts=tuple(m["hostPath"][:MAX_TEXT] for m in mounts[:MAX_DEVICES]
                     if isinstance(m, dict) and isinstance(m.get("hostPath"), str)))


def parse_spec(text: str, path: str, priority: int = 0,
               file: Optional[FileOwner] = None) -> CdiSpec:
    """One spec file's text (YAML, or JSON which is YAML too); a file that is not a
    spec gives a spec with `error` (one line) and nothing else."""
    try:
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506 - a safe loader
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return CdiSpec(path, priority, file=file, error=first[:200])
    if not isinstance(raw, dict):
        return CdiSpec(path, priority, file=file, error="not a CDI spec (no mapping)")
    devices = _list(raw, "devices")
    parsed = tuple(CdiDevice(d["name"][:253], _edits(d.get("containerEdits")))
                   for d in devices[:MAX_DEVICES]
                   if isinstance(d, dict) and isinstance(d.get("name"), str))
    kind = _text(raw.get("kind"))
    return CdiSpec(path, priority, kind=kind,
                   version=_version(raw.get("cdiVersion")),
                   common=_edits(raw.get("containerEdits")), devices=parsed, file=file,
                   error=None if kind else "no kind")


def _read_spec_file(path: str) -> Optional[tuple[str, FileOwner]]:
    """A spec's text and owner; nothing that could block (a FIFO) or flood."""
    found = procfs.read_regular(path, MAX_SPEC_BYTES)
    if found is None:
        return None
    data, st = found
    return data.decode("utf-8", "replace"), FileOwner(stat.S_IMODE(st.st_mode), st.st_uid,
                                                      st.st_gid, st.st_mtime)


_cache_lock = threading.Lock()
_cache: dict[str, tuple[tuple[int, int, int], CdiSpec]] = {}


def spec_dirs(host: HostPaths) -> list[str]:
    """The spec directories, each once (on most hosts /var/run is /run)."""
    out: list[str] = []
    seen: set[str] = set()
    for directory in host.cdi_dirs:
        real = os.path.realpath(directory)
        if real not in seen:
            seen.add(real)
            out.append(directory)
    return out


def spec_paths(host: HostPaths) -> list[tuple[int, str]]:
    """(priority, path) of every spec file, in the order a runtime reads them."""
    found = []
    for priority, directory in enumerate(spec_dirs(host)):
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        found += [(priority, os.path.join(directory, n)) for n in names
                  if n.endswith(SPEC_SUFFIXES)]
    return found[:MAX_SPECS]


def read_specs(host: HostPaths) -> list[CdiSpec]:
    """Every spec, parsed once per version of its file (size, mtime, inode)."""
    specs = []
    for priority, path in spec_paths(host):
        try:
            st = os.stat(path)
        except OSError:
            continue
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        with _cache_lock:
            cached = _cache.get(path)
        if cached is not None and cached[0] == key and cached[1].priority == priority:
            specs.append(cached[1])
            continue
        found = _read_spec_file(path)
        if found is None:
            continue
        spec = parse_spec(found[0], path, priority, found[1])
        with _cache_lock:
            if len(_cache) >= 4 * MAX_SPECS:
                _cache.clear()
            _cache[path] = (key, spec)
        specs.append(spec)
    return specs


@dataclass(frozen=True)
class CdiMatch:
    """A CDI device whose edits name a node: the device, its spec, the node entry."""

    device: str                      # vendor.com/class=name
    spec: CdiSpec
    node: CdiNode
    common: bool = False             # the node comes from the spec-wide edits
    shadowed_by: Optional[str] = field(default=None)  # a higher-priority spec's path


def devices_naming(specs: Iterable[CdiSpec], path: Optional[str],
                   numbers: Iterable[tuple[int, int]] = (),
                   host_paths: Iterable[str] = ()) -> list[CdiMatch]:
    """CDI devices with a node that is this one: the same path in the container,
    the same host path, or the same number as written in the spec."""
    wanted_numbers, wanted_hosts = set(numbers), set(host_paths)
    by_name: dict[str, CdiSpec] = {}
    ordered = sorted((s for s in specs if s.error is None), key=lambda s: s.priority)
    for spec in ordered:
        for device in spec.devices:
            by_name[spec.qualified(device)] = spec   # a later directory wins
    out = []
    for spec in ordered:
        for device in spec.devices:
            name = spec.qualified(device)
            winner = by_name[name]
            for node, common in [(n, False) for n in device.edits.nodes] + \
                    [(n, True) for n in spec.common.nodes]:
                if node.path == path or node.host_path in wanted_hosts \
                        or node.number_as_written in wanted_numbers:
                    out.append(CdiMatch(name, spec, node, common,
                                        None if winner is spec else winner.path))
                    break
    return out


def summary(spec: CdiSpec) -> dict[str, Any]:
    """The report's view of one spec (host_snapshot)."""
    def edits(block: CdiEdits) -> dict[str, Any]:
        return {"device_nodes": [n.summary() for n in block.nodes],
                "additional_gids": list(block.additional_gids) or None}
    out: dict[str, Any] = {"path": spec.path}
    if spec.error is not None:
        out["error"] = spec.error
    if spec.kind is None and spec.error is not None:
        return out
    out.update({"kind": spec.kind, "cdi_version": spec.version, "common": edits(spec.common),
                "devices": [{"name": d.name, **edits(d.edits)} for d in spec.devices],
                "driver_versions": spec.driver_versions()})
    return out
