"""`cdi.devices`: the CDI devices whose specs name a refused node, each with its
spec file and whether the spec is stale for this host (enrichment of one event;
the model is cdi_specs.py).

Stale means, per node entry:
* `gone`: its host node does not exist now (the runtime then refuses the device);
* `renumbered`: the spec writes a major:minor that the host node no longer has
  (a runtime takes a fully specified number as written, so the container gets
  a node for the old number);
* `no_driver`: the number it writes belongs to no driver in /proc/devices now, and
  the host node has another number or is gone (a spec whose number is the host
  node's is not stale when the driver is not loaded: the host node answers
  nothing either);
* `no_gid`: the host node has a group (`gid`) the spec does not carry, so the
  container's node gets group 0 or the container user's (NVIDIA/
  nvidia-container-toolkit#1631);
* `other_driver_version`: the libraries it mounts are of another driver version
  than the loaded one.
The spec file's mode and owner are kept too: a rootless runtime reads specs as
its user, and a spec that user cannot read gives "unresolvable CDI devices".
"""

from __future__ import annotations

import os
import stat
from typing import Any, Optional

from tracer.enrichment.cdi_specs import CdiMatch, devices_naming, read_specs, spec_dirs
from tracer.enrichment.driver_params import loaded_driver_version
from tracer.enrichment.node import NodeStatter
from tracer.facts import LIVE, Facts
from tracer.host import HostPaths

MAX_MATCHES = 8


def _host_root(host: HostPaths) -> str:
    return os.path.dirname(host.dev.rstrip("/")) or "/"


def _container_entry(facts: Facts, path: str) -> Optional[dict[str, Any]]:
    """The container's OCI linux.devices entry for a path, when its config is known."""
    oci = facts.get("container.oci")
    if not isinstance(oci, dict) or not isinstance(oci.get("devices"), list):
        return None
    return next((d for d in oci["devices"] if isinstance(d, dict) and d.get("path") == path),
                None)


def _match_facts(match: CdiMatch, host: HostPaths, statter: NodeStatter, facts: Facts,
                 char_majors: dict[int, str], driver: Optional[str]) -> dict[str, Any]:
    node = match.node
    found = statter(_host_root(host), node.host_path)
    host_node = None if found is None or not found.is_char_device else {
        "major": found.major, "minor": found.minor, "uid": found.uid, "gid": found.gid,
        "mode": f"{stat.S_IMODE(found.mode):04o}"}
    stale = []
    if host_node is None:
        stale.append("gone")
    written = node.number_as_written
    if written is not None and host_node is not None \
            and written != (host_node["major"], host_node["minor"]):
        stale.append("renumbered")
    if written is not None and node.type in ("c", "u") and char_majors \
            and written[0] not in char_majors and ("renumbered" in stale or host_node is None):
        stale.append("no_driver")
    if node.gid is None and host_node is not None and host_node["gid"] != 0:
        stale.append("no_gid")
    versions = match.spec.driver_versions()
    if driver is not None and versions and driver not in versions:
        stale.append("other_driver_version")
    owner = match.spec.file
    entry: dict[str, Any] = {
        "device": match.device, "spec": match.spec.path, "node": node.summary(),
        "from_common_edits": match.common, "host_node": host_node, "stale": stale,
        "spec_file": None if owner is None else {"mode": f"{owner.mode:04o}", "uid": owner.uid,
                                                 "gid": owner.gid},
        "driver_versions": versions, "driver_loaded": driver}
    if match.shadowed_by:
        entry["shadowed_by"] = match.shadowed_by
    given = _container_entry(facts, node.path)
    if given is not None:
        entry["container_node"] = {k: given.get(k) for k in ("major", "minor", "gid", "uid")}
    return entry


def cdi_device_facts(host: HostPaths, statter: NodeStatter, path: Optional[str],
                     number: Optional[tuple[int, int]], facts: Facts,
                     char_majors: dict[int, str]) -> None:
    """cdi.devices for the node at `path` (as the process named it) with `number`."""
    specs = read_specs(host)
    if not specs:
        return
    matches = devices_naming(specs, path, [number] if number else [])
    if not matches:
        return
    driver = loaded_driver_version(host)
    facts.put("cdi.devices", [_match_facts(m, host, statter, facts, char_majors, driver)
                              for m in matches[:MAX_MATCHES]],
              LIVE, " ".join(spec_dirs(host)))
