"""The NVIDIA Container Toolkit's configuration: the one reader of
`/etc/nvidia-container-runtime/config.toml` (host_snapshot reports it, the
enrichment's `nvidia.toolkit_config` fact carries what a verdict uses).

What matters for a denial:
* `[nvidia-container-cli] no-cgroups`: true makes the legacy prestart hook skip
  the device cgroup.  With a rootful runtime the GPU rules are then never
  written and every GPU open is EPERM; false under a rootless runtime makes the
  hook fail (it cannot write the rules), so the container does not start.
* `[nvidia-container-cli] user` (`root:video`): the user the hook runs as.
* `[nvidia-container-runtime] mode`: `legacy` (the hook), `cdi`, `csv`, `auto`.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

from tracer.enrichment import procfs
from tracer.facts import LIVE, Facts
from tracer.host import HostPaths

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG = "nvidia-container-runtime/config.toml"


def config_path(host: HostPaths) -> str:
    return os.path.join(host.etc, CONFIG)


def read_toolkit_config(host: HostPaths) -> Optional[dict[str, Any]]:
    """{"path", "content"} or {"path", "error"}; None when there is no config file."""
    path = config_path(host)
    text = procfs.read_regular_text(path, 1 << 18)
    if text is None:
        return None
    try:
        return {"path": path, "content": tomllib.loads(text)}
    except (tomllib.TOMLDecodeError, RecursionError, ValueError) as exc:
        return {"path": path, "error": (str(exc).splitlines() or ["unreadable"])[0][:200]}


def _table(content: dict[str, Any], name: str) -> dict[str, Any]:
    value = content.get(name)
    return value if isinstance(value, dict) else {}


def toolkit_settings(config: dict[str, Any]) -> dict[str, Any]:
    """What a verdict uses; a key the file does not set is the toolkit's default
    (no-cgroups false, mode auto), marked in `defaults`."""
    content = config.get("content")
    if not isinstance(content, dict):
        return {"path": config["path"], "error": config.get("error")}
    cli, runtime = _table(content, "nvidia-container-cli"), _table(content, "nvidia-container-runtime")
    no_cgroups = cli.get("no-cgroups")
    mode = runtime.get("mode")
    user = cli.get("user")
    # a key the file does not set is the toolkit's default; one of the wrong type (the
    # string "true") is not a value the toolkit would run with: unknown, null
    return {"path": config["path"],
            "no_cgroups": False if no_cgroups is None else
            no_cgroups if isinstance(no_cgroups, bool) else None,
            "mode": "auto" if mode is None else mode if isinstance(mode, str) else None,
            "user": user if isinstance(user, str) else None,
            "defaults": [k for k, v in (("no_cgroups", no_cgroups), ("mode", mode))
                         if v is None]}


def toolkit_config_facts(host: HostPaths, facts: Facts) -> None:
    config = read_toolkit_config(host)
    if config is not None:
        facts.put("nvidia.toolkit_config", toolkit_settings(config), LIVE, config["path"])
