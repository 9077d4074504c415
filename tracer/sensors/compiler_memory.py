"""Give back the memory BCC's compiler used once the probe is loaded.

BCC compiles the probe with the LLVM and clang libraries it links; afterwards
they are never needed again (until a reload recompiles).  Their code pages stay
resident in this process (~70 MiB), as does heap the compiler freed (~25 MiB).
Dropping the code pages is safe: they are read-only file mappings, re-read from
the file if anything ever runs them again; writable mappings are never touched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MADV_DONTNEED = 4
COMPILER_LIBRARIES = ("libbcc", "libLLVM", "libclang")


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def compiler_code_ranges(maps_text: str) -> list[tuple[int, int]]:
    """Read-only executable mappings of the compiler libraries, from /proc/PID/maps."""
    ranges = []
    for line in maps_text.splitlines():
        parts = line.split()
        if len(parts) < 6 or "x" not in parts[1] or "w" in parts[1]:
            continue
        if not any(name in os.path.basename(parts[5]) for name in COMPILER_LIBRARIES):
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        ranges.append((start, end))
    return ranges


def release_compiler_memory(proc: str = "/proc") -> int:
    """Drop the compiler's resident code pages and trim the heap; returns the
    number of mappings advised.  Failures are harmless and ignored."""
    libc = _libc()
    try:
        with open(os.path.join(proc, "self/maps"), encoding="ascii", errors="replace") as f:
            ranges = compiler_code_ranges(f.read())
    except OSError:
        ranges = []
    advised = sum(1 for start, end in ranges if libc.madvise(start, end - start, MADV_DONTNEED) == 0)
    try:
        libc.malloc_trim(0)  # glibc: return freed compiler heap to the kernel
    except AttributeError:  # not glibc
        pass
    return advised
