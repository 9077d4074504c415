"""What a path inside a container was, by the container's OCI config.json.

A container that is gone cannot be looked into; the config its runtime was
given still says what a path in it was: a bind mount of a host path, or a
device node the runtime made (`linux.devices`).  The sensor (matching a
refused open by device number) and the enrichment (node facts of a gone
container) read it the same way, here, below both stages.
"""

from __future__ import annotations

from typing import Any, Optional


def _holding(path: str, mounts: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    best: Optional[dict[str, Any]] = None
    for m in mounts:
        dest = str(m.get("destination", "")).rstrip("/") or "/"
        if dest == "/" or path == dest or path.startswith(dest + "/"):
            if best is None or len(dest) >= len(str(best["destination"]).rstrip("/") or "/"):
                best = m
    return best


def oci_path_origin(oci: Any, path: str
                    ) -> tuple[Optional[dict[str, Any]], Optional[str], Optional[dict[str, Any]]]:
    """What the OCI config says `path` inside the container was: (the OCI mount
    holding it, the host source when that mount is a bind mount, else the
    `linux.devices` entry with that path).  One reading for the enrichment and
    for the sensor's match by device."""
    if not isinstance(oci, dict):
        return None, None, None
    mounts = [m for m in oci.get("mounts") or [] if isinstance(m, dict)]
    holder = _holding(path, mounts)
    if holder is not None and holder.get("type") == "bind" and holder.get("source"):
        dest = str(holder["destination"]).rstrip("/")
        return holder, str(holder["source"]) + path[len(dest):], None
    device = next((d for d in oci.get("devices") or []
                   if isinstance(d, dict) and d.get("path") == path), None)
    return holder, None, device
