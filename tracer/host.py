"""Where the host's files are.  Every stage reads the host through a `HostPaths`,
so the same logic runs on the live system and on fixture trees under tests/."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class HostPaths:
    proc: str = "/proc"
    sys: str = "/sys"
    dev: str = "/dev"
    etc: str = "/etc"
    run: str = "/run"
    var_run: str = "/var/run"
    # CDI spec directories, lowest priority first (the CDI library's defaults)
    cdi_dirs: tuple[str, ...] = ("/etc/cdi", "/var/run/cdi")
    # modprobe.d directories, in kmod's precedence: a file name in an earlier one wins
    modprobe_dirs: tuple[str, ...] = ("/etc/modprobe.d", "/run/modprobe.d",
                                      "/usr/local/lib/modprobe.d", "/usr/lib/modprobe.d",
                                      "/lib/modprobe.d")

    @classmethod
    def under(cls, root: str) -> "HostPaths":
        """All roots below one directory (a recorded host tree)."""
        j = os.path.join
        return cls(proc=j(root, "proc"), sys=j(root, "sys"), dev=j(root, "dev"),
                   etc=j(root, "etc"), run=j(root, "run"), var_run=j(root, "var/run"),
                   cdi_dirs=tuple(j(root, d.lstrip("/")) for d in cls.cdi_dirs),
                   modprobe_dirs=tuple(j(root, d.lstrip("/")) for d in cls.modprobe_dirs))

    def proc_pid(self, pid: int, *parts: str) -> str:
        return os.path.join(self.proc, str(pid), *parts)

    @property
    def btf_vmlinux(self) -> str:
        return os.path.join(self.sys, "kernel/btf/vmlinux")


LIVE = HostPaths()
