"""The node an exited container process opened, from the container's snapshot.

A path inside a container that is gone cannot be stat'ed through its root.
The OCI config the tracker kept says what that path was: a bind mount of a
host path (`-v /dev/nvidia0:/dev/nvidia0`: stat the host source), or a device
the runtime created (`--device`: its type, major:minor, mode, uid and gid as
the runtime made it).  The mount that held it is the OCI mount with the
longest destination prefix; a bind mount also keeps its source's flags.
"""

from __future__ import annotations

import os
import stat
from typing import Any, Optional

from tracer.enrichment import procfs
from tracer.facts import CACHED, INFERRED, LIVE, Facts
from tracer.enrichment.node import NodeStatter
from tracer.enrichment.parse_proc import mount_holding, parse_mountinfo
from tracer.host import HostPaths
from tracer.oci_paths import oci_path_origin


def _host_mount_options(host: HostPaths, source: str, facts: Facts) -> Optional[list[str]]:
    """Per-mount options of the host mount holding `source` (the tracer's mount ns)."""
    text = procfs.read_text(os.path.join(host.proc, "self/mountinfo"))
    if text is None:
        return None
    mount = mount_holding(source, parse_mountinfo(text, facts.skips))
    return None if mount is None else list(mount.options)


def container_node_facts(host: HostPaths, statter: NodeStatter, path: str,
                         facts: Facts) -> bool:
    """Node and mount facts for `path` inside the snapshotted container; False
    when the snapshot does not say what the path was."""
    oci = facts.get("container.oci")
    if not isinstance(oci, dict):
        return False
    holder, source, device = oci_path_origin(oci, path)
    origin = "container snapshot: OCI config.json"
    done = False
    if holder is not None and source is not None:
        root = os.path.dirname(host.dev.rstrip("/")) or "/"
        found = statter(root, source)
        facts.put("node.seen_from", "host-bind-source", INFERRED,
                  f"process gone; {path} was a bind mount of {source}")
        facts.put("node.exists", found is not None, LIVE, source)
        if found is not None:
            facts.put("node.type", "char" if stat.S_ISCHR(found.mode) else
                      "block" if stat.S_ISBLK(found.mode) else "other", LIVE, source)
            facts.put("node.mode", f"{stat.S_IMODE(found.mode):04o}", LIVE, source)
            facts.put("node.uid", found.uid, LIVE, source)
            facts.put("node.gid", found.gid, LIVE, source)
            if found.major is not None:
                facts.put("node.major", found.major, LIVE, source)
                facts.put("node.minor", found.minor, LIVE, source)
        host_options = _host_mount_options(host, source, facts)
        options = list(holder.get("options") or []) + (host_options or [])
        done = True
    elif device is not None:
        facts.put("node.seen_from", "container-device", INFERRED,
                  f"process gone; {path} was created by the runtime (linux.devices)")
        facts.put("node.exists", True, CACHED, origin + " linux.devices")
        kind = {"c": "char", "u": "char", "b": "block"}.get(str(device.get("type")), "other")
        facts.put("node.type", kind, CACHED, origin + " linux.devices")
        if isinstance(device.get("mode"), int):
            facts.put("node.mode", f"{stat.S_IMODE(device['mode']):04o}", CACHED,
                      origin + " linux.devices fileMode")
        for key in ("uid", "gid", "major", "minor"):
            facts.put(f"node.{key}", device.get(key), CACHED, origin + " linux.devices")
        options = list((holder or {}).get("options") or [])
        done = True
    if done and holder is not None:
        facts.put("node.mount", {"mount_point": holder.get("destination"),
                                 "fstype": holder.get("type"), "source": holder.get("source"),
                                 "options": options}, CACHED, origin + " mounts")
        facts.put("node.mount_nodev", "nodev" in options, CACHED, origin + " mounts")
        facts.put("node.mount_ro", "ro" in options, CACHED, origin + " mounts")
    return done
