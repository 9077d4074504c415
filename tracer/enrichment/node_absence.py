"""Why a GPU node was not there (ENOENT): facts that tell the causes apart.

* Is the node on the host?  (Then the process's own /dev lacked it: a private
  /dev tmpfs, a runtime that did not pass it, a unit's PrivateDevices=.)
* Is its driver loaded?  (/proc/modules, /proc/devices)
* For the nodes `nvidia-modprobe` makes (CUDA runs it, setuid root, to load
  nvidia_uvm and create /dev/nvidia-uvm, -modeset, -caps): is it installed and
  setuid root, and would this process's no_new_privs, a nosuid mount or a user
  namespace have stopped it?

Only the process's own facts are used: no_new_privs as the kernel captured it,
its user namespace from the event, its mount table (a property of its mount
namespace).  The host's files are read through `HostPaths`.
"""

from __future__ import annotations

import os
import stat
from typing import Optional

from tracer.enrichment import procfs
from tracer.oci_paths import oci_path_origin
from tracer.enrichment.node import NodeStatter
from tracer.enrichment.parse_proc import Mount, mount_holding
from tracer.facts import CACHED, LIVE, Facts
from tracer.host import HostPaths

MODPROBE_DIRS = ("/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin", "/usr/local/sbin")
# nodes nvidia-modprobe creates (its -c, -u, -m, -f options), by node class
MODPROBE_CLASSES = ("nvidia-gpu", "nvidiactl", "nvidia-modeset", "nvidia-uvm",
                    "nvidia-uvm-tools", "nvidia-caps", "nvidia-nvswitch")
# the module each class needs (/proc/modules spells them with underscores)
CLASS_MODULE = {"nvidia-uvm": "nvidia_uvm", "nvidia-uvm-tools": "nvidia_uvm",
                "nvidia-modeset": "nvidia_modeset", "drm-render": "drm", "drm-card": "drm"}
MAX_MODULES = 64


def loaded_modules(host: HostPaths) -> Optional[tuple[list[str], str]]:
    """Loaded modules that matter for GPU nodes, and where that was read: /proc/modules,
    else /sys/module (a kernel without loadable modules has no /proc/modules)."""
    path = os.path.join(host.proc, "modules")
    text = procfs.read_text(path)
    if text is not None:
        names = [line.split(" ", 1)[0] for line in text.splitlines() if line.strip()]
    elif os.path.isdir(os.path.join(host.sys, "module")):
        path = os.path.join(host.sys, "module")
        names = procfs.list_dir(path)
    else:
        return None
    return sorted({n for n in names if n.startswith(("nvidia", "nvgpu", "nvmap", "tegra"))
                   or n == "drm"})[:MAX_MODULES], path


def host_root(host: HostPaths) -> str:
    return os.path.dirname(host.dev.rstrip("/")) or "/"


def modprobe_binary(host: HostPaths) -> Optional[dict[str, object]]:
    """nvidia-modprobe on the host: where, its mode, owner and whether it is setuid root."""
    root = host_root(host)
    for directory in MODPROBE_DIRS:
        path = os.path.join(directory, "nvidia-modprobe")
        try:
            st = os.stat(os.path.join(root, path.lstrip("/")))
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        return {"path": path, "mode": f"{stat.S_IMODE(st.st_mode):04o}", "uid": st.st_uid,
                "setuid_root": bool(st.st_mode & stat.S_ISUID) and st.st_uid == 0}
    return None


def _modprobe_blockers(facts: Facts, binary: Optional[dict[str, object]],
                       mounts: Optional[list[Mount]]) -> list[str]:
    """What would stop the setuid helper from creating the node for this process
    (when it is not installed: what would stop it once installed)."""
    out = []
    if binary is not None and not binary.get("setuid_root"):
        out.append("not_setuid_root")
    if facts.get("process.no_new_privs") is True:
        out.append("no_new_privs")
    level = facts.get("userns.level")
    if isinstance(level, int) and level > 0:
        out.append("user_namespace")
    if mounts is not None and binary is not None:
        mount = mount_holding(str(binary["path"]), mounts)
        if mount is not None and "nosuid" in mount.options:
            out.append("nosuid")
    return out


def absence_facts(host: HostPaths, statter: NodeStatter, path: str, node_class: str,
                  mounts: Optional[list[Mount]], mounts_origin: str, facts: Facts) -> None:
    """Facts for an ENOENT on a GPU node path (see the module docstring)."""
    root = host_root(host)
    found = statter(root, path)
    host_path = os.path.join(root, path.lstrip("/"))
    facts.put("node.on_host", found is not None and found.is_char_device, LIVE, host_path)
    if found is not None and found.major is not None:
        facts.put("node.host_device", f"{found.major}:{found.minor}", LIVE, host_path)
    found_modules = loaded_modules(host)
    module = CLASS_MODULE.get(node_class, "nvidia" if node_class in MODPROBE_CLASSES else None)
    if found_modules is not None:
        modules, where = found_modules
        facts.put("host.gpu_modules", modules, LIVE, where)
        if module is not None:
            facts.put("node.module_loaded", module in modules, LIVE, f"{where} ({module})")
    if mounts is not None:
        dev = mount_holding(path, mounts)
        if dev is not None:
            private = dev.fstype == "tmpfs" and dev.mount_point.rstrip("/") == "/dev"
            facts.put("process.dev_private", private, LIVE,
                      f"{mounts_origin}: {dev.mount_point} is {dev.fstype} ({dev.source})")
    oci = facts.get("container.oci")
    if isinstance(oci, dict):
        holder, source, device = oci_path_origin(oci, path)
        facts.put("container.passes_node", source is not None or device is not None, CACHED,
                  "container snapshot: OCI config.json linux.devices and bind mounts")
    if node_class not in MODPROBE_CLASSES:
        return
    binary = modprobe_binary(host)
    facts.put("nvidia_modprobe.installed", binary is not None, LIVE,
              " ".join(os.path.join(root, d.lstrip("/"), "nvidia-modprobe") for d in MODPROBE_DIRS))
    if binary is not None:
        facts.put("nvidia_modprobe.binary", binary, LIVE,
                  os.path.join(root, str(binary["path"]).lstrip("/")))
    facts.put("nvidia_modprobe.blockers", _modprobe_blockers(facts, binary, mounts), LIVE,
              "the binary's mode, process.no_new_privs, userns.level, the mount holding it")
