"""Unit tests for the access model: one test per branch of the kernel's open path."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from tracer.enrichment.device_rules import V1DeviceList, parse_rule
from tracer.verdict.groups import SupplementaryGroups
from tracer.verdict.access_model import (
    CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CHECKS, MAY_READ, MAY_WRITE, Credentials,
    IdMap, NodeFacts, PosixAcl, UserNamespace,
    access_mask_from_open_flags, decide_open,
)

RW = MAY_READ | MAY_WRITE
CHR = stat.S_IFCHR
ALL_CAPS = (1 << 41) - 1


ALLOW_ALL = V1DeviceList(True)  # a known device cgroup that allows: DAC decides alone


def node(mode: int = 0o660, uid: int = 0, gid: int = 44, **kw: object) -> NodeFacts:
    kw.setdefault("device_cgroup", ALLOW_ALL)
    return NodeFacts(mode=CHR | mode, uid=uid, gid=gid, major=195, minor=0, **kw)  # type: ignore[arg-type]


def user(uid: int = 1000, gid: int = 1000, groups: tuple[int, ...] = (), caps: int = 0,
         userns: UserNamespace = UserNamespace()) -> Credentials:
    return Credentials(fsuid=uid, fsgid=gid, groups=SupplementaryGroups.from_facts(list(groups)),
                       cap_effective=caps, userns=userns)


def test_open_flags_map_like_acc_mode() -> None:
    assert access_mask_from_open_flags(os.O_RDONLY) == MAY_READ
    assert access_mask_from_open_flags(os.O_WRONLY | os.O_NONBLOCK) == MAY_WRITE
    assert access_mask_from_open_flags(os.O_RDWR | os.O_CLOEXEC) == RW
    assert access_mask_from_open_flags(3) == RW


def test_nodev_mount_refuses_before_anything_else() -> None:
    d = decide_open(node(0o666, nodev_mount=True), user(0, 0, caps=ALL_CAPS), MAY_READ)
    assert (d.allowed, d.errno, d.check) == (False, errno.EACCES, "nodev_mount")


def test_superblock_of_non_initial_userns_is_nodev() -> None:
    d = decide_open(node(0o666, superblock_userns_initial=False), user(), MAY_READ)
    assert (d.allowed, d.errno, d.check) == (False, errno.EACCES, "nodev_superblock")


def test_owner_triplet_is_exclusive() -> None:
    # 0066: the owner is locked out although group and other may
    d = decide_open(node(0o066, uid=1000, gid=1000), user(1000, 1000), MAY_READ)
    assert (d.allowed, d.errno, d.check) == (False, errno.EACCES, "dac_owner")
    assert decide_open(node(0o600, uid=1000), user(1000), RW).check == "dac_owner"
    assert decide_open(node(0o600, uid=1000), user(1000), RW).allowed


def test_owner_ignores_acl_entries() -> None:
    acl = PosixAcl(users=((1000, 7),), group_obj=6, mask=7)
    d = decide_open(node(0o070, uid=1000, acl=acl), user(1000), MAY_READ)
    assert (d.allowed, d.check) == (False, "dac_owner")


def test_group_member_uses_group_bits() -> None:
    d = decide_open(node(0o660, gid=44), user(groups=(44,)), RW)
    assert (d.allowed, d.check) == (True, "dac_group")
    d = decide_open(node(0o640, gid=44), user(gid=44), RW)
    assert (d.allowed, d.errno, d.check) == (False, errno.EACCES, "dac_group")


def test_group_bits_only_matter_where_they_differ_from_other() -> None:
    # group r--, other rw-: a member wanting read is decided by "other" (same bits)
    d = decide_open(node(0o646, gid=44), user(groups=(44,)), MAY_READ)
    assert (d.allowed, d.check) == (True, "dac_other")
    # ... but wanting write, group bits apply and refuse although other would allow
    d = decide_open(node(0o646, gid=44), user(groups=(44,)), MAY_WRITE)
    assert (d.allowed, d.check) == (False, "dac_group")


def test_other_bits_for_strangers() -> None:
    assert decide_open(node(0o666), user(), RW).check == "dac_other"
    d = decide_open(node(0o660), user(), MAY_READ)
    assert (d.allowed, d.errno, d.check) == (False, errno.EACCES, "dac_other")


def test_acl_named_user_entry_grants_and_mask_limits() -> None:
    acl = PosixAcl(users=((1000, 6),), group_obj=0, mask=6)
    d = decide_open(node(0o660, acl=acl), user(1000), RW)
    assert (d.allowed, d.check) == (True, "dac_acl_user")
    acl = PosixAcl(users=((1000, 6),), group_obj=4, mask=4)
    d = decide_open(node(0o640, acl=acl), user(1000), RW)
    assert (d.allowed, d.errno, d.check) == (False, errno.EACCES, "dac_acl_mask")
    d = decide_open(node(0o640, acl=acl), user(1000), MAY_READ)
    assert (d.allowed, d.check) == (True, "dac_acl_user")


def test_acl_named_user_entry_without_the_access_refuses_despite_other() -> None:
    acl = PosixAcl(users=((1000, 4),), group_obj=4, mask=6)
    d = decide_open(node(0o666, acl=acl), user(1000), MAY_WRITE)
    assert (d.allowed, d.check) == (False, "dac_acl_user")
    acl = PosixAcl(users=((1000, 4),), group_obj=6, mask=6)
    d = decide_open(node(0o666, acl=acl), user(1000), MAY_WRITE)
    assert (d.allowed, d.check) == (False, "dac_acl_user")


def test_acl_group_entries_any_granting_entry_wins() -> None:
    acl = PosixAcl(groups=((50, 4), (51, 6)), group_obj=0, mask=6)
    d = decide_open(node(0o660, gid=44, acl=acl), user(groups=(50, 51)), RW)
    assert (d.allowed, d.check) == (True, "dac_acl_group")


def test_acl_matching_group_without_access_refuses_even_if_other_allows() -> None:
    acl = PosixAcl(groups=((50, 4),), group_obj=4, mask=4)
    d = decide_open(node(0o646, gid=44, acl=acl), user(groups=(50,)), MAY_WRITE)
    assert (d.allowed, d.errno, d.check) == (False, errno.EACCES, "dac_acl_group")


def test_acl_owning_group_entry_is_masked() -> None:
    acl = PosixAcl(users=((7, 4),), group_obj=6, mask=4)
    d = decide_open(node(0o640, gid=44, acl=acl), user(groups=(44,)), MAY_WRITE)
    assert (d.allowed, d.check) == (False, "dac_acl_mask")


def test_acl_no_entry_matches_uses_other() -> None:
    acl = PosixAcl(users=((7, 6),), group_obj=6, mask=6)
    assert decide_open(node(0o666, acl=acl), user(), RW).check == "dac_acl_other"
    d = decide_open(node(0o660, acl=acl), user(), MAY_READ)
    assert (d.allowed, d.check) == (False, "dac_acl_other")


def test_acl_is_skipped_when_the_mask_is_empty() -> None:
    # kernel quirk: no group bits -> acl_permission_check never consults the ACL
    acl = PosixAcl(users=((1000, 6),), group_obj=0, mask=0)
    d = decide_open(node(0o606, acl=acl), user(1000), RW)
    assert (d.allowed, d.check) == (True, "dac_other")


def test_cap_dac_read_search_grants_read_only() -> None:
    creds = user(caps=1 << CAP_DAC_READ_SEARCH)
    d = decide_open(node(0o600), creds, MAY_READ)
    assert (d.allowed, d.check) == (True, "cap_dac_read_search")
    d = decide_open(node(0o600), creds, RW)
    assert (d.allowed, d.errno, d.check) == (False, errno.EACCES, "dac_other")


def test_cap_dac_override_grants_read_and_write_and_read_search_is_tried_first() -> None:
    d = decide_open(node(0o000), user(caps=1 << CAP_DAC_OVERRIDE), RW)
    assert (d.allowed, d.check) == (True, "cap_dac_override")
    d = decide_open(node(0o000), user(caps=ALL_CAPS), MAY_READ)
    assert d.check == "cap_dac_read_search"


def test_capabilities_need_the_node_ids_mapped_in_the_callers_userns() -> None:
    ns = UserNamespace.single("0 100000 65536", "0 100000 65536")
    d = decide_open(node(0o600, uid=0, gid=0), user(100000, 100000, caps=ALL_CAPS, userns=ns), RW)
    assert (d.allowed, d.errno, d.check) == (False, errno.EACCES, "dac_other")
    assert "not mapped" in d.detail
    ns = UserNamespace.single("0 100000 65536\n65536 0 1", "0 100000 65536")
    d = decide_open(node(0o600, uid=0, gid=0), user(100000, 100000, caps=ALL_CAPS, userns=ns), RW)
    assert not d.allowed  # uid mapped, gid not
    ns = UserNamespace.single("0 100000 65536\n65536 0 1", "0 100000 65536\n65536 0 1")
    d = decide_open(node(0o600, uid=0, gid=0), user(100000, 100000, caps=ALL_CAPS, userns=ns), RW)
    assert (d.allowed, d.check) == (True, "cap_dac_override")


def test_nested_user_namespaces_map_through_every_level() -> None:
    outer = UserNamespace.single("0 100000 1000", "0 100000 1000")
    inner_level = UserNamespace.single("0 10 5", "0 10 5").levels[0]
    nested = UserNamespace(outer.levels + (inner_level,))
    assert nested.has_uid(100012) and not nested.has_uid(100002) and not nested.has_uid(12)
    assert IdMap.parse("0 1000 1\n1 100000 10").to_outside(5) == 100004


def test_device_cgroup_deny_exception_gives_eperm_after_dac() -> None:
    policy = V1DeviceList(default_allow=True, exceptions=(parse_rule("c 195:* rwm"),))
    d = decide_open(node(0o666, device_cgroup=policy), user(), MAY_READ)
    assert (d.allowed, d.errno, d.check) == (False, errno.EPERM, "device_cgroup")
    d = decide_open(node(0o600, device_cgroup=policy), user(), MAY_READ)
    assert (d.errno, d.check) == (errno.EACCES, "dac_other")  # DAC is checked first


def test_device_cgroup_partial_deny_and_allowlist() -> None:
    deny_write = V1DeviceList(True, (parse_rule("c 195:0 w"),))
    assert decide_open(node(0o666, device_cgroup=deny_write), user(), MAY_READ).allowed
    assert not decide_open(node(0o666, device_cgroup=deny_write), user(), RW).allowed
    allow = V1DeviceList.from_devices_list("c 195:0 r\nc 195:* rw\n")
    assert not allow.default_allow
    assert decide_open(node(0o666, device_cgroup=allow), user(), RW).allowed
    only_read = V1DeviceList.from_devices_list("c 195:0 r\n")
    d = decide_open(node(0o666, device_cgroup=only_read), user(), RW)
    assert (d.allowed, d.errno) == (False, errno.EPERM)
    assert V1DeviceList.from_devices_list("a *:* rwm\n").default_allow


def test_unknown_checks_are_reported() -> None:
    d = decide_open(node(0o666, device_cgroup=None), user(), MAY_READ, lsm_active=("apparmor",))
    assert d.unknown == ("device_cgroup", "lsm:apparmor")
    # an unknown layer never counts as allowing
    assert d.allowed is None and not d.shown_to_allow(errno.EPERM)
    assert d.shown_to_allow(errno.EACCES)  # the device cgroup cannot give EACCES
    known = node(0o666, device_cgroup=V1DeviceList(True))
    assert decide_open(known, user(), MAY_READ).unknown == ()
    assert decide_open(known, user(), MAY_READ).allowed is True


def test_an_unknown_fact_is_never_a_default() -> None:
    """A missing fsuid is not root, missing groups are not "none", a missing device
    number is not 0:0, missing mount flags are not "dev": each leaves its layer unknown
    where it could change the answer, and decided where it could not."""
    root_only = node(0o600, uid=0, gid=0)
    assert decide_open(root_only, Credentials(None, 1000), RW).allowed is None
    assert decide_open(node(0o666), Credentials(None, None, SupplementaryGroups(None), None),
                       RW).allowed is True  # every caller may: nothing unknown matters
    group = node(0o660, gid=44)
    unknown_groups = Credentials(1000, 1000, SupplementaryGroups(None), 0)
    d = decide_open(group, unknown_groups, RW)
    assert d.allowed is None and d.check == "dac_unknown" and "gid 44" in d.detail
    # group r--, other r--: whether it holds gid 44 does not change a read
    assert decide_open(node(0o644, gid=44), unknown_groups, MAY_READ).allowed is True
    unknown_caps = Credentials(1000, 1000, SupplementaryGroups(()), None)
    assert decide_open(node(0o600), unknown_caps, RW).allowed is None  # CAP_DAC_OVERRIDE?
    deny_195 = V1DeviceList(False, (parse_rule("c 1:3 rwm"),))
    no_number = NodeFacts(CHR | 0o666, 0, 0, None, None, device_cgroup=deny_195)
    assert decide_open(no_number, user(), RW).allowed is None  # never evaluated as 0:0
    allow_all = NodeFacts(CHR | 0o666, 0, 0, None, None, device_cgroup=ALLOW_ALL)
    assert decide_open(allow_all, user(), RW).allowed is True
    assert decide_open(node(0o666, nodev_mount=None), user(), RW).allowed is None


def test_sorted_group_prefix_decides_up_to_its_last_gid() -> None:
    """group_info is sorted: the lowest 1024 of 1100 groups prove membership either
    way up to the last captured gid, and nothing above it."""
    prefix = SupplementaryGroups.from_facts(list(range(5000, 6024)), 1100)
    creds = Credentials(1000, 1000, prefix, 0)
    assert decide_open(node(0o660, gid=5500), creds, RW).allowed is True
    assert decide_open(node(0o660, gid=4000), creds, RW).allowed is False  # below: not held
    above = decide_open(node(0o660, gid=7000), creds, RW)
    assert above.allowed is None and "above them" in above.detail
    whole = SupplementaryGroups.from_facts(list(range(5000, 5040)), 40)
    assert decide_open(node(0o660, gid=7000), Credentials(1000, 1000, whole, 0), RW).allowed is False


def test_acl_xattr_round_trip() -> None:
    acl = PosixAcl(users=((1001, 6), (1000, 4)), groups=((44, 6),), group_obj=4, mask=6)
    parsed = PosixAcl.from_xattr(acl.to_xattr(0o640))
    assert parsed == PosixAcl(users=((1000, 4), (1001, 6)), groups=((44, 6),), group_obj=4, mask=6)
    with pytest.raises(ValueError):
        PosixAcl.from_xattr(b"\x01\x00\x00\x00")


def test_every_check_name_is_declared() -> None:
    assert len(set(CHECKS)) == len(CHECKS)
    assert {"nodev_mount", "dac_owner", "dac_acl_user", "dac_acl_group", "dac_acl_mask",
            "dac_group", "dac_other", "cap_dac_override", "cap_dac_read_search",
            "device_cgroup"} <= set(CHECKS)
