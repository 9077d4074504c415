"""Find kernel headers that let BCC compile the probe.

Headers are only a compile-time necessity: struct offsets come from BTF, so
headers of another kernel version work.  Order of preference:
  1. $BCC_KERNEL_SOURCE, when the user set it;
  2. /lib/modules/$(uname -r)/build (BCC's own default; nothing to do);
  3. the newest installed /usr/src/linux-headers-* for this architecture.
Debian and Ubuntu split a header package into an arch part (generated files)
and a common part; BCC accepts one tree in $BCC_KERNEL_SOURCE, so the two are
joined in a directory of symlinks under the cache directory.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from typing import Optional

from tracer.errors import EnvironmentProblem

_ARCH_DIRS = {"x86_64": "x86", "aarch64": "arm64"}
_ARCH_SUFFIX = {"x86_64": ("amd64", "x86_64", "generic"), "aarch64": ("arm64", "aarch64", "generic")}


@dataclass(frozen=True)
class HeaderChoice:
    source: Optional[str]  # value for BCC_KERNEL_SOURCE; None = BCC's default works
    description: str       # what to tell the user on stderr (empty: nothing to say)


def _version_key(name: str) -> tuple:
    return tuple(int(x) if x.isdigit() else x for x in re.split(r"[.-]", name))


def _complete(tree: str, arch_dir: str) -> bool:
    return (os.path.exists(os.path.join(tree, "include/linux/kconfig.h"))
            and os.path.isdir(os.path.join(tree, "arch", arch_dir)))


def _common_of(arch_tree: str, src_root: str) -> Optional[str]:
    """The `-common` half of a Debian split header package, if any."""
    makefile = os.path.join(arch_tree, "Makefile")
    try:
        text = open(makefile, encoding="utf-8", errors="replace").read()
    except OSError:
        text = ""
    m = re.search(r"include\s+(/usr/src/[^\s]+)/Makefile", text)
    if m and os.path.isdir(m.group(1)):
        return m.group(1)
    base = os.path.basename(arch_tree)
    guess = re.sub(r"-[a-z0-9_]+$", "-common", base)
    path = os.path.join(src_root, guess)
    return path if os.path.isdir(path) else None


def _link_merge(dest: str, layers: list[str]) -> None:
    """Populate `dest` with symlinks so that it reads as the union of `layers`
    (earlier layers win).  Directories present in several layers are merged."""
    os.makedirs(dest, exist_ok=True)
    names: dict[str, list[str]] = {}
    for layer in layers:
        for name in os.listdir(layer):
            names.setdefault(name, []).append(os.path.join(layer, name))
    for name, sources in names.items():
        target = os.path.join(dest, name)
        dirs = [s for s in sources if os.path.isdir(s)]
        if len(dirs) > 1:
            _link_merge(target, dirs)
        elif not os.path.lexists(target):
            os.symlink(sources[0], target)


def find_headers(release: str | None = None, modules_root: str = "/lib/modules",
                 src_root: str = "/usr/src", cache_dir: str = "/var/cache/gputrace",
                 machine: str | None = None, environ: Optional[dict[str, str]] = None
                 ) -> HeaderChoice:
    env = os.environ if environ is None else environ
    release = release or platform.release()
    machine = machine or platform.machine()
    arch_dir = _ARCH_DIRS.get(machine, machine)

    explicit = env.get("BCC_KERNEL_SOURCE")
    if explicit:
        if not _complete(explicit, arch_dir):
            raise EnvironmentProblem(f"BCC_KERNEL_SOURCE={explicit} is not a usable kernel header tree "
                                     "(no include/linux/kconfig.h or arch/ directory)")
        return HeaderChoice(explicit, f"using kernel headers from BCC_KERNEL_SOURCE={explicit}")

    build = os.path.join(modules_root, release, "build")
    if os.path.isdir(os.path.join(build, "include")):
        return HeaderChoice(None, "")

    candidates = []
    if os.path.isdir(src_root):
        for name in os.listdir(src_root):
            if not name.startswith("linux-headers-") or name.endswith("-common"):
                continue
            if not name.endswith(_ARCH_SUFFIX.get(machine, (machine,))) and not _complete(
                    os.path.join(src_root, name), arch_dir):
                continue
            candidates.append(name)
    for name in sorted(candidates, key=_version_key, reverse=True):
        tree = os.path.join(src_root, name)
        if _complete(tree, arch_dir):
            return HeaderChoice(tree, f"no headers for kernel {release}; compiling with {tree} "
                                      "(offsets come from BTF)")
        common = _common_of(tree, src_root)
        if common is None:
            continue
        merged = os.path.join(cache_dir, "kernel-headers", name)
        try:
            _link_merge(merged, [tree, common])
        except OSError as exc:
            raise EnvironmentProblem(f"cannot prepare kernel headers in {merged}: {exc.strerror}") from exc
        if _complete(merged, arch_dir):
            return HeaderChoice(merged, f"no headers for kernel {release}; compiling with {tree} "
                                        f"+ {os.path.basename(common)} (offsets come from BTF)")
    raise EnvironmentProblem(
        f"no usable kernel headers: {build} is missing and no linux-headers-* for {machine} "
        f"is in {src_root}; install one (e.g. apt-get install linux-headers-{release} or "
        "linux-headers-amd64), or use --sensor audit")
