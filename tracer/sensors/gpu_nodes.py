"""Which device numbers and paths count as GPU nodes.

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


def char_majors(proc_devices_text: str) -> dict[str, int]:
    """name -> major for the "Character devices:" section; malformed lines are skipped."""
    out: dict[str, int] = {}
    in_char = False
    for line in proc_devices_text.splitlines():
        line = line.strip()
        if line.endswith("devices:"):
            in_char = line.startswith("Character")
            continue
        if not in_char or not line:
            continue
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0].isdigit():
            out[parts[1]] = int(parts[0])
    return out


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
    for name, major in char_majors(text).items():
        if GPU_DRIVER_NAMES.match(name):
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
