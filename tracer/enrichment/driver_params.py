"""The NVIDIA driver's device-file policy: the mode, group and owner it (and
nvidia-modprobe) give the nodes it creates, and where each value came from.

Three places say it:
* `/proc/driver/nvidia/params` (the loaded driver's values, printed in decimal:
  `DeviceFileMode: 438` is 0666), parsed by parse_files.parse_nvidia_params;
* `options nvidia NVreg_DeviceFileMode=...` lines in the modprobe.d directories
  (`HostPaths.modprobe_dirs`, kmod's precedence: a file name in an earlier
  directory hides the same name in a later one; files read in name order);
* `nvidia.NVreg_...=` on the kernel command line (/proc/cmdline).

The kernel reads a module parameter with kstrtouint(value, 0): a leading `0x`
is hex, a leading `0` octal, anything else decimal.  `NVreg_DeviceFileMode=666`
is therefore 666 = 0o1232, a mode no one can read (the decimal-mode trap).
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from tracer.enrichment import procfs
from tracer.enrichment.parse_files import parse_nvidia_params
from tracer.facts import LIVE, Facts, SkipCounter
from tracer.host import HostPaths

# the core module's names (modprobe treats '-' and '_' alike); Debian calls it nvidia-current
CORE_MODULES = ("nvidia", "nvidia_current", "nvidia_open")
PARAMS = {"NVreg_DeviceFileMode": "mode", "NVreg_DeviceFileGID": "gid",
          "NVreg_DeviceFileUID": "uid", "NVreg_ModifyDeviceFiles": "modify"}
MAX_CONF_FILES = 256
_LOOKS_OCTAL = re.compile(r"[1-7][0-7]{2,3}")


def kernel_uint(text: str) -> Optional[int]:
    """A module parameter as the kernel's kstrtouint(text, 0) reads it; None when
    the kernel would refuse it (the module then fails to load)."""
    text = text.strip()
    if text.startswith("+"):
        text = text[1:]
    base = 10
    if text[:2].lower() == "0x":
        text, base = text[2:], 16
    elif text.startswith("0") and len(text) > 1:
        text, base = text[1:], 8
    try:
        value = int(text, base) if text and text.isascii() and text.isalnum() else None
    except ValueError:
        return None
    return value if value is not None and value < 1 << 32 else None


@dataclass(frozen=True)
class ModprobeOption:
    source: str          # file:line, or /proc/cmdline
    param: str           # NVreg_DeviceFileMode
    raw: str             # as written


def _module(name: str) -> str:
    return name.replace("-", "_")


def parse_modprobe_conf(text: str, path: str, skips: SkipCounter) -> list[ModprobeOption]:
    """The NVreg_ device-file options of the NVIDIA core module in one modprobe.d
    file (`options MODULE NAME=VALUE ...`; '#' comments; '\\' joins lines)."""
    out: list[ModprobeOption] = []
    lines = text.splitlines()
    number = 0
    while number < len(lines):
        start, parts = number + 1, [lines[number]]
        number += 1
        while parts[-1].endswith("\\") and number < len(lines):  # joined once, not per line
            parts[-1] = parts[-1][:-1]
            parts.append(lines[number])
            number += 1
        words = " ".join(parts).split("#", 1)[0].split()
        if len(words) < 3 or words[0] != "options" or _module(words[1]) not in CORE_MODULES:
            continue
        for word in words[2:]:
            name, sep, value = word.partition("=")
            if not sep:
                skips.skip("modprobe_conf:bad_option")
                continue
            if name in PARAMS:
                out.append(ModprobeOption(f"{path}:{start}", name, value.strip('"')[:64]))
    return out


def modprobe_files(host: HostPaths) -> list[str]:
    """modprobe.d files in the order kmod reads them (a name in an earlier directory
    hides the same name in later ones)."""
    chosen: dict[str, str] = {}
    for directory in host.modprobe_dirs:
        for name in procfs.list_dir(directory)[:MAX_CONF_FILES]:
            if name.endswith(".conf") and name not in chosen:
                chosen[name] = os.path.join(directory, name)
    return [chosen[name] for name in sorted(chosen)]


def configured_options(host: HostPaths, skips: SkipCounter) -> list[ModprobeOption]:
    """Every NVreg_ device-file option configured, in the order applied (the last wins)."""
    out: list[ModprobeOption] = []
    for path in modprobe_files(host):
        text = procfs.read_regular_text(path, 1 << 18)
        if text is not None and "NVreg_" in text:
            out += parse_modprobe_conf(text, path, skips)
    cmdline_path = os.path.join(host.proc, "cmdline")
    for word in (procfs.read_text(cmdline_path, 1 << 14) or "").split():
        module, dot, rest = word.partition(".")
        name, sep, value = rest.partition("=")
        if dot and sep and _module(module) in CORE_MODULES and name in PARAMS:
            out.append(ModprobeOption(cmdline_path, name, value[:64]))
    return out


def decimal_trap(raw: str, value: Optional[int]) -> bool:
    """A mode written like octal without its leading 0 (666), which the kernel read
    as decimal."""
    return value is not None and bool(_LOOKS_OCTAL.fullmatch(raw.strip())) \
        and value == int(raw.strip())


def _setting(name: str, loaded: Optional[int], params_path: str,
             options: list[ModprobeOption]) -> Optional[dict[str, Any]]:
    """One parameter: the loaded value (params) over the configured one (modprobe.d),
    with the line that configured it."""
    configured = [o for o in options if o.param == name]
    last = configured[-1] if configured else None
    value = loaded if loaded is not None else (kernel_uint(last.raw) if last else None)
    if value is None:
        return None
    out: dict[str, Any] = {"value": value, "loaded": loaded is not None,
                           "source": params_path if loaded is not None else last.source if last else None}
    if last is not None:
        out["configured"] = {"raw": last.raw, "source": last.source,
                             "value": kernel_uint(last.raw)}
    if name == "NVreg_DeviceFileMode":
        out["octal"] = f"{value & 0o7777:04o}"
        raw = last.raw if last is not None else str(value)
        # params alone: a printed value that reads as an octal mode and holds more than
        # the permission bits (666 is 0o1232) was written without its leading 0
        trapped = decimal_trap(raw, kernel_uint(raw)) if last is not None else \
            decimal_trap(raw, value) and value > 0o777
        if trapped:
            out["decimal_trap"] = True
            out["intended"] = "0" + raw.strip()
    return out


TTL_S = 5.0  # host-wide and slow to change; a storm of denials reads it once
_cache_lock = threading.Lock()
_cache: dict[HostPaths, tuple[float, Optional[dict[str, Any]], str]] = {}


def device_file_policy(host: HostPaths, skips: Optional[SkipCounter] = None
                       ) -> tuple[Optional[dict[str, Any]], str]:
    """({"mode"|"gid"|"uid"|"modify": setting}, where it was read); None when neither
    the loaded driver nor any configuration says anything."""
    now = time.monotonic()
    with _cache_lock:
        cached = _cache.get(host)
    if cached is not None and now - cached[0] < TTL_S:
        return cached[1], cached[2]
    skips = skips or SkipCounter()
    params_path = os.path.join(host.proc, "driver/nvidia/params")
    text = procfs.read_text(params_path)
    loaded = parse_nvidia_params(text, skips) if text is not None else {}
    options = configured_options(host, skips)
    policy = {}
    for name, key in PARAMS.items():
        value = loaded.get(name[len("NVreg_"):])
        setting = _setting(name, value if isinstance(value, int) else None, params_path, options)
        if setting is not None:
            policy[key] = setting
    origin = params_path if text is not None else "modprobe.d and /proc/cmdline"
    found = policy or None
    with _cache_lock:
        if len(_cache) > 16:
            _cache.clear()
        _cache[host] = (now, found, origin)
    return found, origin


def device_file_policy_facts(host: HostPaths, facts: Facts) -> None:
    """nvidia.device_file_policy: the mode/gid/uid the driver gives its nodes, each
    with the loaded value and the line that configured it."""
    policy, origin = device_file_policy(host, facts.skips)
    if policy is not None:
        facts.put("nvidia.device_file_policy", policy, LIVE, origin)


_VERSION = re.compile(r"Kernel Module(?: for [\w-]+)?\s+(\d{2,4}\.\d{1,4}(?:\.\d{1,4})?)")


def loaded_driver_version(host: HostPaths) -> Optional[str]:
    """The loaded NVIDIA kernel module's version (/proc/driver/nvidia/version:
    `NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.78  ...`)."""
    text = procfs.read_text(os.path.join(host.proc, "driver/nvidia/version"), 4096) or ""
    found = _VERSION.search(text)
    return found.group(1) if found else None
