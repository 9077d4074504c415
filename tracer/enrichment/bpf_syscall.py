"""The few bpf(2) and open_by_handle_at(2) calls that read cgroup v2 device programs.

Through ctypes, as the project already does for libbpf's BTF: no bpftool, no
shelling out.  Every call raises `BpfCallFailed` (an OSError with the errno) on
failure; callers decide what a failure means for a verdict.

    fd = open_cgroup_by_id("/sys/fs/cgroup/unified", cgroup_id)
    ids = prog_query(fd, BPF_CGROUP_DEVICE, effective=True)
    info = prog_info(prog_get_fd_by_id(ids[0]))   # name, tag, xlated instructions

`prog_load`/`prog_attach`/`prog_detach` exist for the differential tests, which
compile rule sets into real programs and attach them to real cgroups.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from dataclasses import dataclass

from tracer.sensors.syscall_table import ARCHES

BPF_PROG_LOAD, BPF_PROG_ATTACH, BPF_PROG_DETACH = 5, 8, 9
BPF_PROG_GET_NEXT_ID = 11
BPF_PROG_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD, BPF_PROG_QUERY = 13, 15, 16
BPF_PROG_TYPE_LSM = 29
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
BPF_F_QUERY_EFFECTIVE = 1
BPF_F_ALLOW_OVERRIDE, BPF_F_ALLOW_MULTI, BPF_F_REPLACE = 1, 2, 4
FILEID_KERNFS = 0xFE
ATTR_SIZE = 144          # sizeof(union bpf_attr) is larger; the tail must be zero
PROG_INFO_SIZE = 88      # up to and including bpf_prog_info.name
MAX_PROGS = 256          # the kernel allows 64 per cgroup; effective lists stack
MAX_XLATED_BYTES = 1 << 20

_OWN = ARCHES.get(platform.machine(), ARCHES["x86_64"]).own_calls  # unknown machine: as before
_SYS_BPF, _SYS_OPEN_BY_HANDLE_AT = _OWN["bpf"], _OWN["open_by_handle_at"]
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


# The capability each call needs, measured on Linux 6.18 under `setpriv --bounding-set`
# (tests/test_unit_capabilities.py re-measures it): what the unit would need to ask.
CAPABILITY_NEEDED = {
    "BPF_PROG_QUERY": "CAP_NET_ADMIN or CAP_SYS_ADMIN",
    "BPF_PROG_GET_FD_BY_ID": "CAP_SYS_ADMIN",
    "BPF_PROG_GET_NEXT_ID": "CAP_SYS_ADMIN",
    "BPF_OBJ_GET_INFO_BY_FD": "CAP_BPF (for the instructions)",
    "BPF_PROG_LOAD": "CAP_BPF and CAP_NET_ADMIN (a cgroup device program)",
    "BPF_PROG_ATTACH": "CAP_NET_ADMIN (with CAP_BPF to load the program)",
    "open_by_handle_at": "CAP_DAC_READ_SEARCH",
}


class BpfCallFailed(OSError):
    """A bpf() or open_by_handle_at() call failed; `errno` says why, `command` which."""

    command = ""

    def needs(self) -> str:
        """For EPERM, the capability the call needs (one line), else ''."""
        if self.errno != 1 or self.command not in CAPABILITY_NEEDED:
            return ""
        return f"{self.command} needs {CAPABILITY_NEEDED[self.command]}"


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str
    tag: str          # hex, as bpftool prints it
    xlated: bytes     # the instructions as the verifier left them; b"" when withheld


def _call(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    ret = _libc.syscall(_SYS_BPF, ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        failed = BpfCallFailed(err, f"bpf({what}): {os.strerror(err)}")
        failed.command = what
        raise failed
    return int(ret)


def _attr(*fields: tuple[int, str, int]) -> ctypes.Array[ctypes.c_char]:
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    for offset, fmt, value in fields:
        struct.pack_into(fmt, attr, offset, value)
    return attr


def _address(buffer: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buffer)


def prog_query(target_fd: int, attach_type: int, effective: bool = True) -> list[int]:
    """Program ids attached to the cgroup `target_fd` (own and inherited when `effective`)."""
    ids = ctypes.create_string_buffer(4 * MAX_PROGS)
    attr = _attr((0, "<I", target_fd), (4, "<I", attach_type),
                 (8, "<I", BPF_F_QUERY_EFFECTIVE if effective else 0),
                 (16, "<Q", _address(ids)), (24, "<I", MAX_PROGS))
    _call(BPF_PROG_QUERY, attr, "BPF_PROG_QUERY")
    count = min(struct.unpack_from("<I", attr, 24)[0], MAX_PROGS)
    return list(struct.unpack_from(f"<{count}I", ids, 0))


def prog_ids(limit: int = 4096) -> list[int]:
    """Every loaded program's id (BPF_PROG_GET_NEXT_ID)."""
    out: list[int] = []
    current = 0
    while len(out) < limit:
        attr = _attr((0, "<I", current))
        try:
            _call(BPF_PROG_GET_NEXT_ID, attr, "BPF_PROG_GET_NEXT_ID")
        except BpfCallFailed as exc:
            if exc.errno == 2:  # ENOENT: no more
                break
            raise
        current = struct.unpack_from("<I", attr, 4)[0]
        out.append(current)
    return out


def prog_type_count(prog_type: int) -> int:
    """How many loaded programs have this type (e.g. BPF_PROG_TYPE_LSM)."""
    count = 0
    for prog_id in prog_ids():
        try:
            fd = prog_get_fd_by_id(prog_id)
        except BpfCallFailed as exc:
            if exc.errno == 2:  # ENOENT: unloaded since it was listed
                continue
            raise  # EPERM is not "no such program": the count is not known
        try:
            info = ctypes.create_string_buffer(PROG_INFO_SIZE)
            _info(fd, info)
            count += struct.unpack_from("<I", info, 0)[0] == prog_type
        finally:
            os.close(fd)
    return count


def prog_get_fd_by_id(prog_id: int) -> int:
    return _call(BPF_PROG_GET_FD_BY_ID, _attr((0, "<I", prog_id)), "BPF_PROG_GET_FD_BY_ID")


def _info(fd: int, info: ctypes.Array[ctypes.c_char]) -> None:
    attr = _attr((0, "<I", fd), (4, "<I", len(info)), (8, "<Q", _address(info)))
    _call(BPF_OBJ_GET_INFO_BY_FD, attr, "BPF_OBJ_GET_INFO_BY_FD")


def prog_info(fd: int) -> ProgInfo:
    """Id, type, name, tag and xlated instructions of the program behind `fd`."""
    info = ctypes.create_string_buffer(PROG_INFO_SIZE)
    _info(fd, info)
    xlated_len = min(struct.unpack_from("<I", info, 20)[0], MAX_XLATED_BYTES)
    xlated = b""
    if xlated_len:
        insns = ctypes.create_string_buffer(xlated_len)
        info = ctypes.create_string_buffer(PROG_INFO_SIZE)
        struct.pack_into("<I", info, 20, xlated_len)
        struct.pack_into("<Q", info, 32, _address(insns))
        _info(fd, info)
        got = struct.unpack_from("<I", info, 20)[0]
        xlated = insns.raw[:min(got, xlated_len)] if struct.unpack_from("<Q", info, 32)[0] else b""
    prog_type, prog_id = struct.unpack_from("<II", info, 0)
    name = info.raw[64:80].split(b"\0", 1)[0].decode("ascii", "replace")
    return ProgInfo(prog_id, prog_type, name, info.raw[8:16].hex(), xlated)


def prog_load(insns: bytes, prog_type: int = BPF_PROG_TYPE_CGROUP_DEVICE, name: str = "",
              license: str = "GPL") -> int:
    """Load raw instructions; returns the program fd (the verifier's log on failure)."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode("ascii"))
    log = ctypes.create_string_buffer(1 << 16)
    attr = _attr((0, "<I", prog_type), (4, "<I", len(insns) // 8), (8, "<Q", _address(code)),
                 (16, "<Q", _address(lic)), (24, "<I", 1), (28, "<I", len(log)),
                 (32, "<Q", _address(log)))
    ctypes.memmove(ctypes.addressof(attr) + 48, name.encode("ascii")[:15], len(name.encode("ascii")[:15]))
    try:
        return _call(BPF_PROG_LOAD, attr, "BPF_PROG_LOAD")
    except BpfCallFailed as exc:
        text = log.value.decode("utf-8", "replace")[-400:]
        raise BpfCallFailed(exc.errno, f"{exc.strerror}: {text}") from None


def prog_attach(cgroup_fd: int, prog_fd: int, attach_type: int = BPF_CGROUP_DEVICE,
                flags: int = BPF_F_ALLOW_MULTI, replace_fd: int = 0) -> None:
    """Attach; with `replace_fd` the program behind it is replaced (BPF_F_REPLACE)."""
    if replace_fd:
        flags |= BPF_F_REPLACE
    _call(BPF_PROG_ATTACH, _attr((0, "<I", cgroup_fd), (4, "<I", prog_fd),
                                 (8, "<I", attach_type), (12, "<I", flags),
                                 (16, "<I", replace_fd)), "BPF_PROG_ATTACH")


def prog_detach(cgroup_fd: int, prog_fd: int, attach_type: int = BPF_CGROUP_DEVICE) -> None:
    _call(BPF_PROG_DETACH, _attr((0, "<I", cgroup_fd), (4, "<I", prog_fd),
                                 (8, "<I", attach_type)), "BPF_PROG_DETACH")


def open_cgroup_by_id(cgroup2_mount: str, cgroup_id: int) -> int:
    """An O_RDONLY directory fd of the v2 cgroup whose id (kernfs node id) is
    `cgroup_id`, the id bpf_get_current_cgroup_id() gives; needs CAP_DAC_READ_SEARCH."""
    mount_fd = os.open(cgroup2_mount, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        handle = ctypes.create_string_buffer(struct.pack("<IiQ", 8, FILEID_KERNFS, cgroup_id), 16)
        fd = _libc.syscall(_SYS_OPEN_BY_HANDLE_AT, ctypes.c_int(mount_fd), handle,
                           ctypes.c_int(os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        if fd < 0:
            err = ctypes.get_errno()
            failed = BpfCallFailed(err, f"open_by_handle_at(cgroup id {cgroup_id}): {os.strerror(err)}")
            failed.command = "open_by_handle_at"
            raise failed
        return int(fd)
    finally:
        os.close(mount_fd)
