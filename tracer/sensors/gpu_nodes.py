"""GPU node identity: which device numbers and paths are GPU nodes, and their class.

The one model of this concept: the sensors match by it, enrichment names the
node's class with it, the verdict reads that class.  /proc/devices is parsed
here and only here.

NVIDIA's main nodes use char major 195 and DRM uses 226; `nvidia-uvm`,
`nvidia-caps`, `nvidia-nvswitch` and the Tegra drivers get dynamic majors that
only /proc/devices names.  Tegra's /dev/nvmap is a misc device (major 10), so
it is matched by its exact device number, never by the shared misc major.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from typing import Optional, Protocol

NVIDIA_MAJOR = 195
DRM_MAJOR = 226
ANY_MINOR = 0xFFFFF

# /proc/devices names whose majors are GPU drivers.
GPU_DRIVER_NAMES = re.compile(r"^(nvidia.*|nvhost.*|nvgpu.*|nvmap|host1x.*|drm)$")

DEFAULT_PREFIXES = (
    "/dev/nvidia",      # nvidia0.., nvidiactl, nvidia-uvm*, nvidia-modeset, nvidia-caps/, nvidia-nvswitch*
    "/dev/nvhost-",     # Tegra host1x clients
    "/dev/nvmap",       # Tegra memory manager
    "/dev/nvgpu/",      # Tegra integrated GPU (JetPack 5+)
    "/dev/dri/",        # DRM card*/renderD*
)

# Exact nodes matched by device number, when present on this host.
EXACT_NODES = ("nvmap",)


def mkdev(major: int, minor: int) -> int:
    """The kernel's internal dev_t encoding (MINORBITS = 20)."""
    return (major << 20) | minor


class BadLines(Protocol):
    def skip(self, reason: str) -> None: ...


def parse_proc_devices(text: str, skips: Optional[BadLines] = None) -> dict[int, str]:
    """/proc/devices, "Character devices:" section: major -> driver name.  The one
    parser of this file; a malformed line is skipped (and counted when `skips`)."""
    out: dict[int, str] = {}
    section = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.endswith(":"):
            section = stripped[:-1].lower()
            continue
        parts = stripped.split(None, 1)
        if len(parts) != 2 or not (parts[0].isascii() and parts[0].isdigit()) or len(parts[0]) > 20:
            if skips is not None:
                skips.skip("devices:bad_line")
            continue
        if section == "character devices":
            out[int(parts[0])] = parts[1]
    return out


def is_gpu_driver(name: str) -> bool:
    """A /proc/devices driver name whose major is a GPU driver's."""
    return GPU_DRIVER_NAMES.match(name) is not None


# Node classes by path, for nodes whose major says nothing (or is unknown).
_PATH_CLASSES = [
    (re.compile(r"^/dev/nvidia\d+$"), "nvidia-gpu"),
    (re.compile(r"^/dev/nvidiactl$"), "nvidiactl"),
    (re.compile(r"^/dev/nvidia-modeset$"), "nvidia-modeset"),
    (re.compile(r"^/dev/nvidia-uvm$"), "nvidia-uvm"),
    (re.compile(r"^/dev/nvidia-uvm-tools$"), "nvidia-uvm-tools"),
    (re.compile(r"^/dev/nvidia-caps/"), "nvidia-caps"),
    (re.compile(r"^/dev/nvidia-nvswitch"), "nvidia-nvswitch"),
    (re.compile(r"^/dev/dri/renderD\d+$"), "drm-render"),
    (re.compile(r"^/dev/dri/card\d+$"), "drm-card"),
    (re.compile(r"^/dev/nvmap$"), "tegra-nvmap"),
    (re.compile(r"^/dev/nvhost-"), "tegra-nvhost"),
    (re.compile(r"^/dev/nvgpu/"), "tegra-nvgpu"),
]


def classify_node(path: Optional[str], major: Optional[int], minor: Optional[int],
                  char_majors: dict[int, str]) -> str:
    """The node class from major/minor (with /proc/devices names), else the path."""
    if major is not None and minor is not None:
        name = char_majors.get(major, "")
        if major == NVIDIA_MAJOR or name in ("nvidia", "nvidia-frontend"):
            return {255: "nvidiactl", 254: "nvidia-modeset"}.get(minor, "nvidia-gpu")
        if name == "nvidia-uvm":
            return "nvidia-uvm-tools" if minor == 1 else "nvidia-uvm"
        if name in ("nvidia-caps", "nvidia-caps-imex-channels"):
            return "nvidia-caps"
        if name == "nvidia-nvswitch":
            return "nvidia-nvswitch"
        if major == DRM_MAJOR or name == "drm":
            return "drm-render" if minor >= 128 else "drm-card"
        if name.startswith("nvhost"):
            return "tegra-nvhost"
        if name == "nvgpu" or name.startswith("nvgpu"):
            return "tegra-nvgpu"
    for pattern, cls in _PATH_CLASSES:
        if path and pattern.search(path):
            return cls
    return "unknown"


@dataclass
class GpuNodeSet:
    prefixes: list[str] = field(default_factory=list)
    majors: dict[int, str] = field(default_factory=dict)  # major -> driver name
    exact: dict[int, str] = field(default_factory=dict)   # kernel dev_t -> node name

    def is_gpu(self, major: int, minor: int) -> bool:
        """A character device of a GPU driver: its major, or its exact number."""
        return major in self.majors or mkdev(major, minor) in self.exact

    def kernel_dev_keys(self) -> list[int]:
        """Keys for the BPF `gpu_devs` map: exact devs and (major, any minor)."""
        return sorted(set(self.exact) | {mkdev(m, ANY_MINOR) for m in self.majors})


def discover(proc: str = "/proc", dev: str = "/dev", extra_prefixes: tuple[str, ...] = (),
             extra_devs: tuple[tuple[int, int | None], ...] = (),
             base_prefixes: tuple[str, ...] = DEFAULT_PREFIXES) -> GpuNodeSet:
    """GPU majors from /proc/devices plus the configured prefixes.

    `extra_devs` adds (major, minor) pairs; minor None means any minor.
    """
    nodes = GpuNodeSet(prefixes=list(base_prefixes))
    nodes.majors[NVIDIA_MAJOR] = "nvidia"
    nodes.majors[DRM_MAJOR] = "drm"
    try:
        with open(os.path.join(proc, "devices"), encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        text = ""
    for major, name in parse_proc_devices(text).items():
        if is_gpu_driver(name):
            nodes.majors.setdefault(major, name)
    for name in EXACT_NODES:
        try:
            st = os.stat(os.path.join(dev, name))
        except OSError:
            continue
        if stat.S_ISCHR(st.st_mode):
            nodes.exact[mkdev(os.major(st.st_rdev), os.minor(st.st_rdev))] = name
    for major, minor in extra_devs:
        if minor is None:
            nodes.majors.setdefault(major, "configured")
        else:
            nodes.exact[mkdev(major, minor)] = "configured"
    # /dev/char/MAJOR:MINOR symlinks lead to the same nodes.
    for major in sorted(nodes.majors):
        nodes.prefixes.append(f"/dev/char/{major}:")
    for dev_t in sorted(nodes.exact):
        nodes.prefixes.append(f"/dev/char/{dev_t >> 20}:{dev_t & ANY_MINOR}")
    nodes.prefixes.extend(p for p in extra_prefixes if p not in nodes.prefixes)
    return nodes
