"""Would the kernel let these credentials open this device node?

A pure model of the Linux open path for character and block device nodes, in
the kernel's own order (fs/namei.c, security/device_cgroup.c):

1. ``may_open()`` -> ``may_open_dev()``: a node reached through a ``nodev``
   mount, or on a superblock owned by a non-initial user namespace
   (``SB_I_NODEV``), gives EACCES before any permission bit is read.
2. ``inode_permission()`` -> ``generic_permission()`` -> ``acl_permission_check()``:
   the owner triplet alone decides for the owner (ACLs do not matter); else the
   POSIX ACL decides, but only when the mode's group bits (the ACL mask) are not
   all zero; else the group triplet when the caller is in the owning group and
   that triplet differs from "other" in the requested bits; else "other".
3. Still EACCES: ``CAP_DAC_READ_SEARCH`` grants a pure read, then
   ``CAP_DAC_OVERRIDE`` grants read and write.  A capability counts only when it
   is in the effective set and the node's uid and gid are both mapped in the
   caller's user namespace (``capable_wrt_inode_uidgid``).
4. ``devcgroup_inode_permission()`` -> ``devcgroup_check_permission()``: the
   cgroup v2 device programs first, then the v1 list; either gives EPERM.  Both
   answer through the one `DevicePolicy` model (enrichment/device_rules.py).
5. LSMs (SELinux, AppArmor, Landlock) come last and are not modelled here; the
   catalog names one only when every modelled layer allows.

Every layer is evaluated, also after a refusal (`AccessDecision.ladder`): the
first refusal is what the process saw, the later ones are what it would meet
after fixing the first.

A fact that is not known is never a default: a layer whose answer depends on it
is unknown (`refuses` None), and an unknown layer never counts as allowing
(`AccessDecision.allowed` is None, `shown_to_allow` says per errno).  Within the
DAC layer each unknown (ownership, membership of one gid, a capability, the id
mapping) is tried both ways: the layer is decided only when every combination
gives the same answer.

All ids are kernel ids (as the initial user namespace sees them).  Nothing here
reads the host; enrichment builds these facts.
"""

from __future__ import annotations

import errno
import stat
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from tracer.enrichment.device_rules import DeviceDecision, DevicePolicy, access_from_mask
from tracer.enrichment.id_map import IdMap, IdMapRange  # noqa: F401 (the one id map model)
from tracer.enrichment.posix_acl import PosixAcl  # the one ACL model
from tracer.verdict.groups import SupplementaryGroups  # the one group-list model

from tracer.verdict.callers import (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, MAY_READ,  # noqa: F401
                                    MAY_WRITE, Caller, callers)



def access_mask_from_open_flags(flags: int) -> int:
    """MAY_READ/MAY_WRITE for open(2) flags, as the kernel's ACC_MODE() maps them."""
    return (MAY_READ, MAY_WRITE, MAY_READ | MAY_WRITE, MAY_READ | MAY_WRITE)[flags & 3]


def _rwx(perm: int) -> str:
    return "".join(ch if perm & bit else "-" for ch, bit in (("r", 4), ("w", 2), ("x", 1)))


def _star(number: Optional[int]) -> str:
    return "*" if number is None else str(number)


def _wanted(mask: int) -> str:
    return {MAY_READ: "read", MAY_WRITE: "write"}.get(mask, "read+write")


@dataclass(frozen=True)
class UserNamespaceLevel:
    uid_map: IdMap
    gid_map: IdMap


@dataclass(frozen=True)
class UserNamespace:
    """The caller's user namespace as a chain of maps, outermost first.

    An empty chain is the initial namespace.  A map read from the initial
    namespace (``/proc/PID/uid_map``) already has kernel ids as its outside
    column, so one level describes any depth when read that way.
    """

    levels: tuple[UserNamespaceLevel, ...] = ()
    known: bool = True  # False: the caller's namespace or its maps are not known

    @classmethod
    def single(cls, uid_map: str, gid_map: str) -> "UserNamespace":
        return cls((UserNamespaceLevel(IdMap.parse(uid_map), IdMap.parse(gid_map)),))

    @classmethod
    def unknown(cls) -> "UserNamespace":
        return cls((), known=False)

    @property
    def is_initial(self) -> bool:
        return self.known and not self.levels

    def _maps_down(self, kernel_id: int, which: str) -> bool:
        current: Optional[int] = kernel_id
        for level in self.levels:
            current = getattr(level, which).to_inside(current)
            if current is None:
                return False
        return True

    def has_uid(self, kuid: int) -> bool:
        return self._maps_down(kuid, "uid_map")

    def has_gid(self, kgid: int) -> bool:
        return self._maps_down(kgid, "gid_map")


@dataclass(frozen=True)
class NodeFacts:
    mode: int                       # st_mode; permission bits are mode & 0o777
    uid: int                        # kernel ids
    gid: int
    major: Optional[int]            # None: the device number is not known
    minor: Optional[int]
    acl: Optional[PosixAcl] = None  # None: no extended ACL on the inode
    nodev_mount: Optional[bool] = False  # MNT_NODEV on the mount the path went through; None: unknown
    superblock_userns_initial: bool = True  # False sets SB_I_NODEV
    # v2 programs and/or the v1 list, in the kernel's order; None: not known
    device_cgroup: Union[None, DevicePolicy, Sequence[DevicePolicy]] = None

    @property
    def kind(self) -> str:
        return "b" if stat.S_ISBLK(self.mode) else "c"

    @property
    def device_policies(self) -> Optional[tuple[DevicePolicy, ...]]:
        if self.device_cgroup is None:
            return None
        if hasattr(self.device_cgroup, "may"):
            return (self.device_cgroup,)  # type: ignore[return-value]
        return tuple(self.device_cgroup)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Credentials:
    fsuid: Optional[int]            # kernel ids; None: not known (never root by default)
    fsgid: Optional[int]
    groups: SupplementaryGroups = SupplementaryGroups(())
    cap_effective: Optional[int] = 0  # None: not known
    userns: UserNamespace = field(default_factory=UserNamespace)
    # the groups were set inside the user namespace (inferred from the runtime): a gid
    # not mapped there cannot be held, even when the groups themselves are not known
    mapped_groups_only: bool = False

    def in_group(self, kgid: int) -> Optional[bool]:
        """Whether the caller holds `kgid`; None when the captured facts cannot tell."""
        if self.fsgid is not None and kgid == self.fsgid:
            return True
        held = self.groups.holds(kgid)
        if held is None and self.mapped_groups_only and self.userns.known \
                and not self.userns.is_initial and not self.userns.has_gid(kgid):
            return False
        if held is False and self.fsgid is None:
            return None
        return held

    def why_not_known(self, kgid: int) -> str:
        if self.groups.holds(kgid) is None:
            return self.groups.why_unknown(kgid)
        return "the process's fsgid is not known"

    def has_cap(self, cap: int) -> bool:
        return self.cap_effective is not None and bool(self.cap_effective >> cap & 1)


@dataclass(frozen=True)
class LayerResult:
    """One layer of the kernel's checks for this open."""

    layer: str                 # nodev | dac | device_cgroup_v2 | device_cgroup_v1 | lsm | seccomp
    refuses: Optional[bool]    # None: not known (not modelled, or facts missing)
    errno: Optional[int]
    check: str
    detail: str
    program: Optional[dict[str, object]] = None  # v2: id, name, tag of the deciding program
    deciding: tuple[str, ...] = ()


@dataclass(frozen=True)
class AccessDecision:
    allowed: Optional[bool]  # None: no layer is shown to refuse, but one is not known
    errno: Optional[int]
    check: str        # the check that decided; stable names, see CHECKS
    detail: str
    unknown: tuple[str, ...] = ()  # checks that could still deny but are not modelled
    ladder: tuple[LayerResult, ...] = ()  # every modelled layer, in the kernel's order

    def refusals(self) -> list[LayerResult]:
        """Every layer shown to refuse, first (the one the process met) first."""
        return [step for step in self.ladder if step.refuses]

    def layer(self, name: str) -> Optional[LayerResult]:
        return next((step for step in self.ladder if step.layer == name), None)

    def not_known(self, err: Optional[int] = None) -> list[LayerResult]:
        """Layers whose answer is not known (that can refuse with `err`, when given)."""
        return [step for step in self.ladder if step.refuses is None
                and (err is None or LAYER_ERRNO.get(step.layer.split("_v")[0]) == err)]

    def shown_to_allow(self, err: int) -> bool:
        """Every modelled layer that refuses with `err` is known, and allows: only then
        may a cause outside the model (seccomp, an LSM) be chosen by elimination."""
        return not self.not_known(err) and not any(
            step.refuses and step.errno == err for step in self.ladder)


LAYER_ERRNO = {"nodev": errno.EACCES, "dac": errno.EACCES, "device_cgroup": errno.EPERM}
CHECKS = ("nodev_mount", "nodev_superblock", "dac_owner", "dac_acl_user", "dac_acl_group",
          "dac_acl_mask", "dac_acl_other", "dac_group", "dac_other", "cap_dac_read_search",
          "cap_dac_override", "device_cgroup", "nodev_unknown", "dac_unknown")


def _dac(node: NodeFacts, caller: Caller, mask: int) -> tuple[bool, str, str]:
    """acl_permission_check(): (granted, check name, detail)."""
    mode = node.mode & 0o777
    want = _wanted(mask)
    if node.uid == caller.fsuid:
        perm = mode >> 6 & 7
        return (mask & ~perm) == 0, "dac_owner", f"caller is the owner {node.uid}, owner bits {_rwx(perm)}, wants {want}"
    if node.acl is not None and mode & 0o070:
        decided = _acl(node, caller, mask)
        if decided is not None:
            return decided
    group_perm, other_perm = mode >> 3 & 7, mode & 7
    if mask & (group_perm ^ other_perm) and node.gid in caller.holds:
        return ((mask & ~group_perm) == 0, "dac_group",
                f"caller is in group {node.gid}, group bits {_rwx(group_perm)}, wants {want}")
    return (mask & ~other_perm) == 0, "dac_other", f"other bits {_rwx(other_perm)}, wants {want}"


def _acl(node: NodeFacts, caller: Caller, mask: int) -> Optional[tuple[bool, str, str]]:
    """posix_acl_permission() for a non-owner; None when the ACL has no say."""
    acl = node.acl
    assert acl is not None
    want = _wanted(mask)
    acl_mask = acl.mask

    def through_mask(perm: int, what: str, check: str) -> tuple[bool, str, str]:
        if (perm & mask) == mask and acl_mask is not None and (acl_mask & mask) != mask:
            return False, "dac_acl_mask", f"{what} {_rwx(perm)} is limited by mask {_rwx(acl_mask)}, wants {want}"
        return (perm & mask) == mask, check, f"{what} {_rwx(perm)}, wants {want}"

    for uid, perm in acl.users:
        if uid == caller.fsuid:
            return through_mask(perm, f"ACL entry user:{uid}", "dac_acl_user")
    found: list[str] = []
    for gid, perm, label in [(node.gid, acl.group_obj, "ACL owning group")] + [
            (g, p, "ACL entry group") for g, p in acl.groups]:
        if gid in caller.holds:
            found.append(f"{label}:{gid} {_rwx(perm)}")
            if (perm & mask) == mask:
                return through_mask(perm, f"{label}:{gid}", "dac_acl_group")
    if found:
        return False, "dac_acl_group", f"matching entries {', '.join(found)} lack {want}"
    if acl.mask is None and not acl.users and not acl.groups:
        return None  # a minimal ACL is the mode itself
    other = node.mode & 7
    return (other & mask) == mask, "dac_acl_other", f"no ACL entry matches; other {_rwx(other)}, wants {want}"


def _with_capabilities(node: NodeFacts, caller: Caller, mask: int) -> tuple[bool, str, str]:
    """generic_permission(): DAC, then the capability overrides after an EACCES."""
    granted, check, detail = _dac(node, caller, mask)
    if granted:
        return granted, check, detail
    where = "" if caller.initial else " in its user namespace"
    for cap, name, applies in ((CAP_DAC_READ_SEARCH, "cap_dac_read_search", mask == MAY_READ),
                               (CAP_DAC_OVERRIDE, "cap_dac_override", True)):
        if applies and caller.has_cap(cap) and caller.mapped:
            return True, name, f"{detail}; {name.upper()} held{where} overrides the permission bits"
    note = ""
    if (caller.has_cap(CAP_DAC_OVERRIDE) or caller.has_cap(CAP_DAC_READ_SEARCH)) and not caller.mapped:
        note = (f"; DAC capabilities do not apply: node {node.uid}:{node.gid} is not "
                f"mapped in the caller's user namespace")
    return False, check, detail + note


def _dac_layer(node: NodeFacts, creds: Credentials, mask: int) -> LayerResult:
    """The DAC layer; decided only when every caller the facts allow gets one answer."""
    possible, unknown = callers(node, creds, mask)
    if possible is None:
        return LayerResult("dac", None, None, "dac_unknown",
                           f"not known: too many unknowns ({'; '.join(unknown)})")
    outcomes = [_with_capabilities(node, caller, mask) for caller in possible]
    if len({granted for granted, _, _ in outcomes}) == 2:
        refused = next(o for o in outcomes if not o[0])
        granted = next(o for o in outcomes if o[0])
        return LayerResult("dac", None, None, "dac_unknown",
                           f"not known: {'; '.join(unknown)}; the answer depends on it "
                           f"({refused[2]}, or {granted[2]})")
    ok, check, detail = outcomes[0]
    if unknown:
        detail += f" (the same whatever {'; '.join(unknown)})"
    return LayerResult("dac", not ok, None if ok else errno.EACCES, check, detail)


def _device_layers(node: NodeFacts, mask: int) -> list[LayerResult]:
    return device_layers(node.device_policies, node.kind, node.major, node.minor, mask)


def device_layers(policies: Optional[tuple[DevicePolicy, ...]], kind: str, major: Optional[int],
                  minor: Optional[int], mask: int) -> list[LayerResult]:
    """devcgroup_check_permission(): v2 programs first, then the v1 list; EPERM.  Needs
    only the device number (not the inode): usable for a node removed since."""
    if policies is None:
        return [LayerResult("device_cgroup", None, None, "device_cgroup", "the device cgroup is not known")]
    out = []
    access = access_from_mask(mask)
    for policy in policies:
        if major is None or minor is None:
            if policy.allows_every_device:
                out.append(LayerResult(policy.layer, False, None, "device_cgroup",
                                       "allows every device"))
            else:
                out.append(LayerResult(policy.layer, None, None, "device_cgroup",
                                       "not known: the node's device number is not known"))
            continue
        found: DeviceDecision = policy.may(kind, major, minor, access)
        refuses = None if found.allowed is None else not found.allowed
        out.append(LayerResult(found.layer, refuses, errno.EPERM if refuses else None,
                               "device_cgroup", found.detail, found.program, found.deciding))
    return out


def _nodev_layer(node: NodeFacts) -> LayerResult:
    """may_open_dev(): MNT_NODEV on the mount, or SB_I_NODEV on the superblock."""
    if node.nodev_mount:
        return LayerResult("nodev", True, errno.EACCES, "nodev_mount", "the node's mount has nodev")
    if not node.superblock_userns_initial:
        return LayerResult("nodev", True, errno.EACCES, "nodev_superblock",
                           "the node's filesystem is owned by a non-initial user namespace")
    if node.nodev_mount is None:
        return LayerResult("nodev", None, None, "nodev_unknown",
                           "not known: the mount the path went through is not known")
    return LayerResult("nodev", False, None, "nodev_mount", "the mount allows device nodes")


def decide_open(node: NodeFacts, creds: Credentials, mask: int,
                lsm_active: tuple[str, ...] = ()) -> AccessDecision:
    """Decide an open of ``node`` for ``mask`` (MAY_READ | MAY_WRITE), evaluating every
    modelled layer; the decision is the first refusal, `ladder` holds them all.  With
    no refusal shown and a layer not known, `allowed` is None: never an allow."""
    mask &= MAY_READ | MAY_WRITE
    unknown = tuple(f"lsm:{name}" for name in lsm_active)
    devices = _device_layers(node, mask)
    ladder = [_nodev_layer(node), _dac_layer(node, creds, mask)] + devices
    if any(step.refuses is None for step in devices):
        unknown = ("device_cgroup",) + unknown
    first = next((step for step in ladder if step.refuses), None)
    if first is not None:
        return AccessDecision(False, first.errno, first.check, first.detail, unknown, tuple(ladder))
    dac = ladder[1]  # no refusal: the check that granted (or could not tell) is DAC's
    allowed = None if any(step.refuses is None for step in ladder) else True
    return AccessDecision(allowed, None, dac.check, dac.detail, unknown, tuple(ladder))
