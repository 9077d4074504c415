"""What the refused task's own cgroup, named by the kernel at the denial, says
about its container.

Engines name a container's cgroup after it: docker-<id>.scope, libpod-<id>,
cri-containerd-<id>.scope, crio-<id>.scope (systemd driver), /docker/<id> and
/kubepods/.../pod<uid>/<id> (cgroupfs driver); runc alone uses /<id> when the
bundle gives no cgroupsPath.  The BPF sensor captures the cgroup's directory
name and its parent's with the event, so the container's id is known even when
the container was gone before any runtime state could be read.
"""

from __future__ import annotations

import re
from typing import Optional

from tracer.enrichment.container import ContainerClues, detect_container
from tracer.enrichment.container_state import ID, kubernetes_from_cgroup
from tracer.event import Process
from tracer.facts import KERNEL, Facts

_HEX_ID = re.compile(r"[0-9a-f]{64}")
_POD_CGROUPFS = re.compile(r"pod([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


def cgroup_tail(proc: Process) -> Optional[str]:
    """`/parent/leaf` (or `/leaf` under the root) as the kernel named them."""
    if proc.cgroup_leaf is None:
        return None
    leaf = proc.cgroup_leaf.decode("utf-8", "replace")
    parent = (proc.cgroup_parent or b"").decode("utf-8", "replace")
    return f"/{parent}/{leaf}" if parent else f"/{leaf}"


def identity_from_cgroup(proc: Process) -> dict[str, str]:
    """engine, id (a 64-hex container id an engine put in the name), kubernetes pod
    uid: only what the names show; {} when they show no container."""
    tail = cgroup_tail(proc)
    if tail is None:
        return {}
    out: dict[str, str] = {}
    if (proc.cgroup_leaf or b"").startswith(b"libpod-conmon-"):
        return out  # podman's monitor, not the container
    found = detect_container(ContainerClues(cgroup_paths=[tail]))
    engine, cid = found.get("engine", (None, ""))[0], found.get("id", (None, ""))[0]
    if isinstance(cid, str) and _HEX_ID.fullmatch(cid) and isinstance(engine, str):
        out.update(engine=engine, id=cid)
    kube = kubernetes_from_cgroup(tail)
    pod = kube.get("pod_uid")
    if pod is None:  # cgroupfs driver: the parent is pod<uid>, the leaf the container id
        match = _POD_CGROUPFS.fullmatch((proc.cgroup_parent or b"").decode("ascii", "replace"))
        leaf = (proc.cgroup_leaf or b"").decode("ascii", "replace")
        if match and _HEX_ID.fullmatch(leaf):
            pod = match.group(1)
            out.setdefault("id", leaf)
    if pod is not None:
        out["pod_uid"] = pod
        out.setdefault("engine", "kubernetes")
    return out


def snapshot_ids(proc: Process) -> list[tuple[str, bool]]:
    """Container ids the names may carry, with whether an engine's pattern gave it
    (else the leaf itself: runc's default /<id>, which must then match the
    snapshot's own recorded cgroup)."""
    if proc.cgroup_leaf is None:
        return []
    out: list[tuple[str, bool]] = []
    cid = identity_from_cgroup(proc).get("id")
    if cid:
        out.append((cid, True))
    leaf = proc.cgroup_leaf.decode("utf-8", "replace")
    if leaf != cid and ID.fullmatch(leaf):
        out.append((leaf, False))
    return out


def cgroup_matches(tail: str, recorded: object) -> bool:
    """The snapshot's own cgroup paths (controller -> path) end in `tail`."""
    if not isinstance(recorded, dict):
        return False
    return any(isinstance(p, str) and (p.rstrip("/") == tail or p.rstrip("/").endswith(tail))
               for p in recorded.values())


def add_cgroup_identity(proc: Process, facts: Facts) -> None:
    """container.id/engine (and the pod's uid) from the kernel-captured cgroup name,
    where the snapshot and /proc gave none: a --rm container gone before it was seen."""
    found = identity_from_cgroup(proc)
    if not found:
        return
    where = f"the task's own cgroup {cgroup_tail(proc)} ({proc.cgroup_hierarchy}), " \
            "named by the kernel at the denial"
    kept: dict[str, object] = {"container.id": found.get("id"),
                               "container.engine": found.get("engine")}
    if "pod_uid" in found:
        kept.update({"container.kubernetes": True, "container.pod": {"pod_uid": found["pod_uid"]}})
    for name, value in kept.items():
        if name not in facts:  # a snapshot's or /proc's answer stays
            facts.put(name, value, KERNEL, where)
