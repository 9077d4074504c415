"""Struct member offsets from the running kernel's BTF, through libbpf's BTF API.

The BPF program is compiled against whatever kernel headers are installed,
whose struct layouts may differ from the running kernel.  So the program never
dereferences kernel structs itself: every offset it uses arrives as a `-D`
flag computed here from /sys/kernel/btf/vmlinux.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass
from typing import Optional

from tracer.errors import EnvironmentProblem

# BTF kinds (include/uapi/linux/btf.h)
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 8, 9, 10, 11
KIND_FUNC, KIND_TYPE_TAG = 12, 18
_MODIFIERS = {KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG}


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32),
                ("size_or_type", ctypes.c_uint32)]


class _BtfMember(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("type", ctypes.c_uint32),
                ("offset", ctypes.c_uint32)]


class _BtfEnum(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("val", ctypes.c_int32)]


class _BtfArray(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("index_type", ctypes.c_uint32),
                ("nelems", ctypes.c_uint32)]


@dataclass(frozen=True)
class Member:
    offset: int  # bytes from the start of the outermost struct
    size: int    # bytes
    type_id: int


def _load_libbpf() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot load libbpf ({name}): {exc}; install libbpf1") from exc
    lib.btf__parse.restype = ctypes.c_void_p
    lib.btf__parse.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    lib.btf__free.argtypes = [ctypes.c_void_p]
    lib.btf__find_by_name_kind.restype = ctypes.c_int32
    lib.btf__find_by_name_kind.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]
    lib.btf__type_by_id.restype = ctypes.POINTER(_BtfType)
    lib.btf__type_by_id.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.btf__name_by_offset.restype = ctypes.c_char_p
    lib.btf__name_by_offset.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.btf__resolve_size.restype = ctypes.c_int64
    lib.btf__resolve_size.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    return lib


class KernelBtf:
    """Read-only view of one BTF file (normally the running kernel's vmlinux)."""

    def __init__(self, path: str = "/sys/kernel/btf/vmlinux") -> None:
        if not os.path.exists(path):
            raise EnvironmentProblem(
                f"no BTF at {path}: the kernel needs CONFIG_DEBUG_INFO_BTF=y "
                "(gputrace takes struct offsets from BTF); try --sensor audit")
        self.path = path
        self._lib = _load_libbpf()
        handle = self._lib.btf__parse(path.encode(), None)
        if not handle:
            err = ctypes.get_errno()
            raise EnvironmentProblem(f"cannot parse BTF at {path}: {os.strerror(err) if err else 'invalid'}")
        self._btf = handle

    def close(self) -> None:
        if self._btf:
            self._lib.btf__free(self._btf)
            self._btf = None

    def __enter__(self) -> "KernelBtf":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lookups -------------------------------------------------------------
    def find(self, name: str, kind: int = KIND_STRUCT) -> Optional[int]:
        type_id = self._lib.btf__find_by_name_kind(self._btf, name.encode(), kind)
        return type_id if type_id > 0 else None

    def size_of(self, name: str, kind: int = KIND_STRUCT) -> int:
        type_id = self._require(name, kind)
        return int(self._lib.btf__resolve_size(self._btf, type_id))

    def member(self, dotted: str) -> Member:
        """`"task_struct.real_parent"` or nested `"user_namespace.ns.inum"`."""
        struct, *fields = dotted.split(".")
        if not fields:
            raise ValueError(f"{dotted!r} names no member")
        type_id = self._require(struct, KIND_STRUCT)
        offset = 0
        for name in fields:
            found = self._find_member(self._strip(type_id), name)
            if found is None:
                raise KeyError(f"{dotted}: no member {name!r} in this kernel")
            bit_offset, type_id = found
            if bit_offset % 8:
                raise KeyError(f"{dotted}: {name} is a bitfield")
            offset += bit_offset // 8
        size = int(self._lib.btf__resolve_size(self._btf, type_id))
        return Member(offset=offset, size=max(size, 0), type_id=type_id)

    def has_member(self, dotted: str) -> bool:
        try:
            self.member(dotted)
        except KeyError:
            return False
        return True

    def enum_value(self, enum: str, name: str) -> Optional[int]:
        """The value of `name` in `enum cgroup_subsys_id` and the like; None if absent
        (an enum value can depend on the kernel's configuration)."""
        type_id = self.find(enum, KIND_ENUM)
        if type_id is None:
            return None
        t = self._type(type_id)
        base = ctypes.addressof(t) + ctypes.sizeof(_BtfType)
        for e in (_BtfEnum * (t.info & 0xFFFF)).from_address(base):
            if (self._lib.btf__name_by_offset(self._btf, e.name_off) or b"").decode() == name:
                return int(e.val)
        return None

    def has_func(self, name: str) -> bool:
        return self.find(name, KIND_FUNC) is not None

    # -- internals -----------------------------------------------------------
    def _require(self, name: str, kind: int) -> int:
        type_id = self.find(name, kind)
        if type_id is None:
            raise KeyError(f"no {name!r} in BTF {self.path}")
        return type_id

    def _type(self, type_id: int) -> _BtfType:
        return self._lib.btf__type_by_id(self._btf, type_id).contents

    def _strip(self, type_id: int) -> int:
        """Follow typedefs and qualifiers to the underlying type."""
        for _ in range(32):
            t = self._type(type_id)
            if ((t.info >> 24) & 0x1F) not in _MODIFIERS:
                return type_id
            type_id = t.size_or_type
        return type_id

    def _find_member(self, type_id: int, name: str) -> Optional[tuple[int, int]]:
        """(bit offset, member type id), searching anonymous members too."""
        t = self._type(type_id)
        kind, vlen, kflag = (t.info >> 24) & 0x1F, t.info & 0xFFFF, t.info >> 31
        if kind not in (KIND_STRUCT, KIND_UNION):
            return None
        base = ctypes.addressof(t) + ctypes.sizeof(_BtfType)
        members = (_BtfMember * vlen).from_address(base)
        for m in members:
            bit_off = m.offset & 0xFFFFFF if kflag else m.offset
            mname = self._lib.btf__name_by_offset(self._btf, m.name_off) or b""
            if mname.decode() == name:
                return bit_off, m.type
            if not mname:  # anonymous struct/union: look inside
                inner = self._find_member(self._strip(m.type), name)
                if inner is not None:
                    return bit_off + inner[0], inner[1]
        return None
