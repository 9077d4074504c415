"""The POSIX ACL model and its one codec (the `system.posix_acl_access` xattr).

`parse_posix_acl`/`build_posix_acl` convert bytes <-> entries exactly; `PosixAcl`
is the typed model the access model decides with (named users and groups, the
owning group's entry and the mask; owner and other come from the mode), built
from those entries.  Enrichment, the verdict, reports and the tests all use it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Optional

from tracer.facts import SkipCounter

# Linux <linux/posix_acl_xattr.h>: a 4-byte version, then 8-byte entries.
ACL_XATTR_VERSION = 2
ACL_UNDEFINED_ID = 0xFFFFFFFF
ACL_TAGS = {0x01: "user_obj", 0x02: "user", 0x04: "group_obj", 0x08: "group",
            0x10: "mask", 0x20: "other"}


@dataclass(frozen=True)
class AclEntry:
    tag: str            # user_obj, user, group_obj, group, mask, other
    perm: int           # 0..7: r=4 w=2 x=1
    id: Optional[int]   # for user/group entries only

    def to_json(self) -> dict[str, object]:
        return {"tag": self.tag, "perm": perm_text(self.perm), "id": self.id}


def perm_text(perm: int) -> str:
    return ("r" if perm & 4 else "-") + ("w" if perm & 2 else "-") + ("x" if perm & 1 else "-")


def parse_posix_acl(raw: bytes, skips: SkipCounter) -> Optional[list[AclEntry]]:
    """The `system.posix_acl_access` xattr value; None when it is malformed."""
    if len(raw) < 4 or (len(raw) - 4) % 8:
        skips.skip("acl:bad_length")
        return None
    (version,) = struct.unpack_from("<I", raw, 0)
    if version != ACL_XATTR_VERSION:
        skips.skip("acl:bad_version")
        return None
    entries = []
    for offset in range(4, len(raw), 8):
        tag_num, perm, ident = struct.unpack_from("<HHI", raw, offset)
        tag = ACL_TAGS.get(tag_num)
        if tag is None or perm > 7:
            skips.skip("acl:bad_entry")
            return None
        has_id = tag in ("user", "group")
        if has_id == (ident == ACL_UNDEFINED_ID):
            skips.skip("acl:bad_id")
            return None
        entries.append(AclEntry(tag, perm, ident if has_id else None))
    if not any(e.tag == "user_obj" for e in entries):
        skips.skip("acl:no_user_obj")
        return None
    return entries


def build_posix_acl(entries: list[AclEntry]) -> bytes:
    """The xattr bytes for entries (used by tests and by fixture recording)."""
    tag_nums = {name: num for num, name in ACL_TAGS.items()}
    out = [struct.pack("<I", ACL_XATTR_VERSION)]
    for e in entries:
        out.append(struct.pack("<HHI", tag_nums[e.tag], e.perm,
                               ACL_UNDEFINED_ID if e.id is None else e.id))
    return b"".join(out)


TAG_NUMBERS = {name: num for num, name in ACL_TAGS.items()}
PERM_BITS = {"r": 4, "w": 2, "x": 1}


def perm_from_text(text: str) -> int:
    """`rw-` -> 6; anything else than r, w, x and - is refused."""
    if len(text) != 3 or any(ch not in "rwx-" for ch in text):
        raise ValueError(f"bad ACL permission {text!r}")
    return sum(PERM_BITS.get(ch, 0) for ch in text)


@dataclass(frozen=True)
class PosixAcl:
    """An access ACL; owner and other permissions come from the mode."""

    users: tuple[tuple[int, int], ...] = ()   # (kuid, rwx) named user entries
    groups: tuple[tuple[int, int], ...] = ()  # (kgid, rwx) named group entries
    group_obj: int = 0
    mask: Optional[int] = None
    user_obj: int = field(default=0, compare=False)
    other: int = field(default=0, compare=False)

    @classmethod
    def from_entries(cls, entries: list[AclEntry]) -> "PosixAcl":
        def first(tag: str, default: Optional[int]) -> Optional[int]:
            return next((e.perm for e in entries if e.tag == tag), default)
        return cls(tuple((e.id or 0, e.perm) for e in entries if e.tag == "user"),
                   tuple((e.id or 0, e.perm) for e in entries if e.tag == "group"),
                   first("group_obj", 0) or 0, first("mask", None),
                   first("user_obj", 0) or 0, first("other", 0) or 0)

    @classmethod
    def from_xattr(cls, raw: bytes, skips: Optional[SkipCounter] = None) -> "PosixAcl":
        """Parse the xattr as the initial namespace reads it; ValueError if malformed."""
        entries = parse_posix_acl(raw, skips if skips is not None else SkipCounter())
        if entries is None:
            raise ValueError("not a valid version 2 POSIX ACL xattr")
        return cls.from_entries(entries)

    def entries(self, mode: Optional[int] = None) -> list[AclEntry]:
        """In the kernel's order; owner/other perms from `mode` when given.  The mask
        defaults to the union of the group-class entries when named entries exist."""
        mask = self.mask
        if mask is None and (self.users or self.groups):
            mask = self.group_obj
            for _, perm in self.users + self.groups:
                mask |= perm
        user_obj = self.user_obj if mode is None else (mode >> 6) & 7
        other = self.other if mode is None else mode & 7
        out = [AclEntry("user_obj", user_obj, None)]
        out += [AclEntry("user", perm, uid) for uid, perm in sorted(self.users)]
        out.append(AclEntry("group_obj", self.group_obj, None))
        out += [AclEntry("group", perm, gid) for gid, perm in sorted(self.groups)]
        if mask is not None:
            out.append(AclEntry("mask", mask, None))
        out.append(AclEntry("other", other, None))
        return out

    def to_xattr(self, mode: int) -> bytes:
        return build_posix_acl(self.entries(mode))

    def to_json(self) -> list[dict[str, object]]:
        """The fact's JSON shape: [{"tag", "perm": "rw-", "id"}, ...]."""
        return [e.to_json() for e in self.entries()]

    @classmethod
    def from_json(cls, entries: Any) -> Optional["PosixAcl"]:
        """From the fact's JSON (journals travel: validated; ValueError if bad)."""
        if not entries:
            return None
        if not isinstance(entries, list):
            raise ValueError("node.acl must be a list")
        parsed = []
        for e in entries:
            if not isinstance(e, dict) or e.get("tag") not in TAG_NUMBERS:
                raise ValueError("bad ACL entry")
            ident = e.get("id")
            parsed.append(AclEntry(str(e["tag"]), perm_from_text(str(e.get("perm", ""))),
                                   None if ident is None else int(ident)))
        return cls.from_entries(parsed)
