"""The audit rules gputrace installs, and removing exactly those again.

What audit can narrow, and what it cannot (the pipeline filters the rest):

* errno: one rule per errno, `exit=-EACCES` and `exit=-EPERM` (fields of one
  rule are ANDed, so two rules are needed for "either").
* GPU nodes, opens: `filetype=character` (AUDIT_FILETYPE) keeps only syscalls
  that touched a character device inode.  It matches inside containers too,
  because it looks at the inode, not at a path.
* Rejected: `dir=/dev` (AUDIT_DIR) matches only walks through the host's /dev
  mount, so it misses nodes bind-mounted into a container's /dev; `devmajor`
  (AUDIT_DEVMAJOR) is the major of the filesystem holding the inode (st_dev,
  0 for devtmpfs), not the node's rdev.  Audit has no path-prefix or rdev field.
* ioctl: no PATH record exists (the call takes an fd), so no file field can
  narrow it; the rule keeps every denied ioctl and the sensor resolves the fd.
* A syscall that fails before the final inode is looked up (no search
  permission on a parent directory) has no character-device name, so is missed.
* Only the native syscall table is watched (`arch=` of this machine); 32-bit
  compat callers are not.
"""

from __future__ import annotations

import errno
import stat
from dataclasses import dataclass
from typing import Iterable, Protocol

from pyroute2.netlink.exceptions import NetlinkError

from tracer.errors import EnvironmentProblem
from tracer.sensors.audit_marshal import AUDIT_BITMASK_SIZE, AUDIT_MAX_FIELDS, audit_rule
from tracer.sensors.syscall_table import ARCHES, Arch, arch_for

__all__ = ["ARCHES", "AuditArch", "current_arch"]

GPUTRACE_KEY = "gputrace"

# Filter lists and actions.
AUDIT_FILTER_EXIT = 0x04
AUDIT_ALWAYS = 2

# Rule fields.
AUDIT_ARCH = 11
AUDIT_EXIT = 103
AUDIT_FILETYPE = 108
AUDIT_FILTERKEY = 210
AUDIT_EQUAL = 0x40000000
AUDIT_KEY_SEPARATOR = b"\x01"
STRING_FIELDS = frozenset({13, 14, 15, 16, 17, 19, 20, 21, 22, 23, 105, 107, 112, AUDIT_FILTERKEY})


AuditArch = Arch  # one syscall table per arch: tracer/sensors/syscall_table.py
OPEN_SYSCALLS = ("open", "openat", "openat2", "creat")


def current_arch(machine: str | None = None) -> AuditArch:
    return arch_for(machine, "audit")


@dataclass(frozen=True)
class AuditRule:
    """One exit-filter rule: syscall numbers and (field, op, value) triples.

    A string value (the key) goes into the rule's buffer; the kernel compares
    the whole rule, strings included, when deleting."""

    syscalls: tuple[int, ...]
    fields: tuple[tuple[int, int, "int | bytes"], ...]
    filter_list: int = AUDIT_FILTER_EXIT
    action: int = AUDIT_ALWAYS

    def to_message(self) -> audit_rule:
        if len(self.fields) > AUDIT_MAX_FIELDS:
            raise ValueError("too many rule fields")
        mask = [0] * AUDIT_BITMASK_SIZE
        for nr in self.syscalls:
            mask[nr // 32] |= 1 << (nr % 32)
        names, values, ops, buf = [0] * 64, [0] * 64, [0] * 64, b""
        for i, (field, op, value) in enumerate(self.fields):
            names[i], ops[i] = field, op
            if isinstance(value, bytes):
                values[i], buf = len(value), buf + value
            else:
                values[i] = value & 0xFFFFFFFF
        msg = audit_rule()
        msg.update({"flags": self.filter_list, "action": self.action,
                    "field_count": len(self.fields), "mask": mask, "fields": names,
                    "values": values, "fieldflags": ops, "buflen": len(buf), "buf": buf})
        return msg


def rule_keys(msg: audit_rule) -> list[bytes]:
    """The filter keys of a listed rule (a rule may carry several, \\x01-separated)."""
    keys: list[bytes] = []
    at = 0
    buf = msg["buf"]
    for i in range(min(int(msg["field_count"]), AUDIT_MAX_FIELDS)):
        field = msg["fields"][i]
        if field in STRING_FIELDS:
            size = msg["values"][i]
            if field == AUDIT_FILTERKEY:
                keys.extend(buf[at:at + size].split(AUDIT_KEY_SEPARATOR))
            at += size
    return keys


def gputrace_rules(arch: AuditArch, key: str = GPUTRACE_KEY) -> list[AuditRule]:
    """Denied opens of character devices and denied ioctls, per errno."""
    opens = tuple(arch.syscalls[name] for name in OPEN_SYSCALLS if name in arch.syscalls)
    rules = []
    for err in (errno.EACCES, errno.EPERM):
        common = ((AUDIT_ARCH, AUDIT_EQUAL, arch.audit_arch), (AUDIT_EXIT, AUDIT_EQUAL, -err))
        tag = ((AUDIT_FILTERKEY, AUDIT_EQUAL, key.encode()),)
        char_device = ((AUDIT_FILETYPE, AUDIT_EQUAL, stat.S_IFCHR),)
        rules.append(AuditRule(opens, common + char_device + tag))
        rules.append(AuditRule((arch.syscalls["ioctl"],), common + tag))
    return rules


class RuleChannel(Protocol):
    def list_rules(self) -> list[audit_rule]: ...
    def add_rule(self, rule: audit_rule) -> None: ...
    def delete_rule(self, rule: audit_rule) -> None: ...


def remove_rules_with_key(channel: RuleChannel, key: str = GPUTRACE_KEY) -> int:
    """Delete every listed rule whose keys are exactly [key]; others stay."""
    removed = 0
    for listed in channel.list_rules():
        if rule_keys(listed) == [key.encode()]:
            channel.delete_rule(rule_again(listed))
            removed += 1
    return removed


def install_rules(channel: RuleChannel, rules: Iterable[AuditRule]) -> int:
    """Add `rules`; on failure remove the ones added so far and raise."""
    added: list[audit_rule] = []
    try:
        for rule in rules:
            msg = rule.to_message()
            channel.add_rule(msg)
            added.append(msg)
    except (NetlinkError, OSError) as exc:
        for msg in added:
            channel.delete_rule(rule_again(msg))
        code = getattr(exc, "code", getattr(exc, "errno", 0)) or 0
        raise EnvironmentProblem(f"cannot add audit rule: {errno.errorcode.get(code, exc)}") \
            from None
    return len(added)


def rule_again(msg: audit_rule) -> audit_rule:
    """A fresh, unencoded copy (pyroute2 messages are encoded in place once)."""
    fresh = audit_rule()
    fresh.update({name: msg[name] for name, _ in audit_rule.fields})
    return fresh
