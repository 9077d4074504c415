"""NETLINK_AUDIT in the style of pyroute2: message classes, a `Marshal`, a socket.

Three payload shapes travel on this family:

* `struct audit_status` (AUDIT_GET replies, AUDIT_SET requests),
* `struct audit_rule_data` (AUDIT_ADD_RULE, AUDIT_DEL_RULE, AUDIT_LIST_RULES),
* records: text such as `audit(1700000000.123:42): arch=c000003e syscall=257 ...`
  for every type from AUDIT_FIRST_USER_MSG (1100) up.

The kernel sends unicast records with `nlmsg_len` counting only the payload
(a legacy quirk, see kauditd_send_multicast_skb() in kernel/audit.c); the
multicast copy has it fixed.  `MarshalAudit.parse` accepts both.
"""

from __future__ import annotations

import asyncio
import errno
import struct
from typing import Any, Callable, Generator, Optional

from pyroute2.netlink import (NETLINK_AUDIT, NLM_F_ACK, NLM_F_REQUEST, NLMSG_DONE,
                              NLMSG_ERROR, nlmsg)
from pyroute2.netlink.exceptions import NetlinkDecodeError
from pyroute2.netlink.nlsocket import Marshal, NetlinkSocket

# Message types (include/uapi/linux/audit.h).
AUDIT_GET = 1000
AUDIT_SET = 1001
AUDIT_LIST_RULES = 1013
AUDIT_ADD_RULE = 1011
AUDIT_DEL_RULE = 1012
AUDIT_FIRST_USER_MSG = 1100
AUDIT_SYSCALL = 1300
AUDIT_PATH = 1302
AUDIT_CONFIG_CHANGE = 1305
AUDIT_CWD = 1307
AUDIT_EOE = 1320
AUDIT_PROCTITLE = 1327
AUDIT_REPLACE = 1329
AUDIT_LANDLOCK_ACCESS = 1423  # Linux 6.15+: a Landlock denial, in the syscall's serial
AUDIT_LANDLOCK_DOMAIN = 1424  # ...and its domain (allocated with the first denial, freed later)

# struct audit_status.mask bits.
AUDIT_STATUS_ENABLED = 0x0001
AUDIT_STATUS_FAILURE = 0x0002
AUDIT_STATUS_PID = 0x0004
AUDIT_STATUS_BACKLOG_LIMIT = 0x0010

AUDIT_NLGRP_READLOG = 1  # multicast group of every record; needs CAP_AUDIT_READ

AUDIT_BITMASK_SIZE = 64
AUDIT_MAX_FIELDS = 64
RULE_HEAD = struct.Struct(f"=3I{AUDIT_BITMASK_SIZE}I{AUDIT_MAX_FIELDS * 3}II")


class audit_status(nlmsg):
    """struct audit_status; older kernels send fewer trailing members."""

    fields = (("mask", "I"), ("enabled", "I"), ("failure", "I"), ("pid", "I"),
              ("rate_limit", "I"), ("backlog_limit", "I"), ("lost", "I"),
              ("backlog", "I"), ("feature_bitmap", "I"), ("backlog_wait_time", "I"),
              ("backlog_wait_time_actual", "I"))

    def ft_decode(self, offset: int) -> None:
        available = max(0, (self.offset + self.length - offset) // 4)
        names = [name for name, _ in self.fields][:available]
        values = struct.unpack_from(f"={len(names)}I", self.data, offset)
        for name, _ in self.fields:
            self[name] = 0
        self.update(zip(names, values))
        del self["attrs"]
        if "value" in self:
            del self["value"]


class audit_rule(nlmsg):
    """struct audit_rule_data: fixed arrays, then `buflen` bytes of strings."""

    fields = (("flags", "I"), ("action", "I"), ("field_count", "I"),
              ("mask", f"{AUDIT_BITMASK_SIZE}I"), ("fields", f"{AUDIT_MAX_FIELDS}I"),
              ("values", f"{AUDIT_MAX_FIELDS}I"), ("fieldflags", f"{AUDIT_MAX_FIELDS}I"),
              ("buflen", "I"), ("buf", "s"))

    def ft_decode(self, offset: int) -> None:
        end = self.offset + self.length
        if end - offset < RULE_HEAD.size:
            raise NetlinkDecodeError(ValueError("audit_rule_data shorter than its fixed part"))
        raw = RULE_HEAD.unpack_from(self.data, offset)
        self["flags"], self["action"], self["field_count"] = raw[0:3]
        at = 3
        for name, count in (("mask", AUDIT_BITMASK_SIZE), ("fields", AUDIT_MAX_FIELDS),
                            ("values", AUDIT_MAX_FIELDS), ("fieldflags", AUDIT_MAX_FIELDS)):
            self[name] = tuple(raw[at:at + count])
            at += count
        self["buflen"] = raw[at]
        start = offset + RULE_HEAD.size
        self["buf"] = bytes(self.data[start:min(end, start + self["buflen"])])
        del self["attrs"]
        if "value" in self:
            del self["value"]


class audit_record(nlmsg):
    """A text record; `text` holds the payload bytes without trailing NULs."""

    def ft_decode(self, offset: int) -> None:
        self["text"] = bytes(self.data[offset:self.offset + self.length]).rstrip(b"\0")
        del self["attrs"]
        if "value" in self:
            del self["value"]


class MarshalAudit(Marshal):
    msg_map = {AUDIT_GET: audit_status, AUDIT_SET: audit_status,
               AUDIT_LIST_RULES: audit_rule, AUDIT_ADD_RULE: audit_rule,
               AUDIT_DEL_RULE: audit_rule}
    default_message_class = audit_record
    raw_tap: Optional[Callable[[bytes], None]] = None  # sees each datagram before parsing
    # ENOBUFS reports: the kernel could not queue records to this socket (each is
    # at least one lost record); pyroute2 turns the recv error into an NLMSG_ERROR
    overflows = 0

    def parse(self, data: bytes, seq: Optional[int] = None,
              callback: Optional[Callable[..., Any]] = None,
              skip_alien_seq: bool = False) -> Generator[nlmsg, None, None]:
        if self.raw_tap is not None:
            self.raw_tap(bytes(data))
        offset = 0
        while offset <= len(data) - 16:
            length, key, flags, sequence = struct.unpack_from("=IHHI", data, offset)
            if key >= AUDIT_FIRST_USER_MSG and offset + 16 + length == len(data):
                # unicast record: nlmsg_len excludes the header (see module doc)
                length += 16
                fixed = bytearray(data)
                struct.pack_into("=I", fixed, offset, length)
                data = bytes(fixed)
            if not 16 <= length <= len(data) - offset:
                break
            if key == NLMSG_ERROR and length >= 20 and \
                    abs(struct.unpack_from("=i", data, offset + 16)[0]) == errno.ENOBUFS:
                self.overflows += 1
            yield self.parse_one_message(key, flags, sequence, data, offset, length)
            offset += (length + 3) & ~3

    def is_enough(self, msg: nlmsg) -> bool:
        return bool(msg["header"]["type"] == NLMSG_DONE)


class AuditSocket(NetlinkSocket):
    """NETLINK_AUDIT socket.  pyroute2 keeps one kernel socket per thread, so an
    instance must be used by the thread that created it."""

    def __init__(self, rcvbuf: int = 4 << 20) -> None:
        super().__init__(NETLINK_AUDIT, rcvbuf=rcvbuf)
        self.set_marshal(MarshalAudit())

    def get_status(self) -> dict[str, int]:
        """AUDIT_GET.  The reply comes from a kernel thread, so no ACK is asked for:
        it would arrive first and end the conversation."""
        for msg in self.nlm_request(audit_status(), AUDIT_GET, NLM_F_REQUEST):
            if msg["header"]["type"] == AUDIT_GET:
                return {name: int(msg[name]) for name, _ in audit_status.fields}
        raise OSError("no AUDIT_GET reply from the kernel")

    def set_status(self, mask: int, **values: int) -> None:
        msg = audit_status()
        for name, _ in audit_status.fields:
            msg[name] = values.get(name, 0)
        msg["mask"] = mask
        tuple(self.nlm_request(msg, AUDIT_SET, NLM_F_REQUEST | NLM_F_ACK))

    def list_rules(self) -> list[audit_rule]:
        return [msg for msg in self.nlm_request(nlmsg(), AUDIT_LIST_RULES, NLM_F_REQUEST)
                if msg["header"]["type"] == AUDIT_LIST_RULES]

    def add_rule(self, rule: audit_rule) -> None:
        tuple(self.nlm_request(rule, AUDIT_ADD_RULE, NLM_F_REQUEST | NLM_F_ACK))

    def delete_rule(self, rule: audit_rule) -> None:
        tuple(self.nlm_request(rule, AUDIT_DEL_RULE, NLM_F_REQUEST | NLM_F_ACK))

    def join_readlog(self) -> None:
        """Bind with the read-log group.  Joining without a bound port id would
        leave port 0, which the kernel skips as the sender of its own multicast."""
        self.bind(groups=1 << (AUDIT_NLGRP_READLOG - 1))

    def receive(self, timeout: float) -> list[nlmsg]:
        """Records that arrived within `timeout` seconds (sequence 0: unsolicited).

        Control replies and ACKs that arrive late land here too; callers keep
        only record types."""

        async def one_datagram() -> list[nlmsg]:
            try:
                return await asyncio.wait_for(self._collect(), timeout)
            except asyncio.TimeoutError:
                return []

        return list(self._run_with_cleanup(one_datagram))

    async def _collect(self) -> list[nlmsg]:
        return [msg async for msg in self.asyncore.get(0, noraise=True)]


def is_record(msg: nlmsg) -> bool:
    kind = msg["header"]["type"]
    return bool(kind >= AUDIT_FIRST_USER_MSG and kind != NLMSG_ERROR and "text" in msg)
