"""The device cgroup: one model answering "may (type, major, minor, access)?".

Both kinds of device cgroup answer through `DevicePolicy.may()`:

* cgroup v1: the `devices.list` rule set (`V1DeviceList`), parsed here once;
* cgroup v2: the effective BPF_CGROUP_DEVICE programs (`V2DevicePrograms`), run
  by the interpreter in `device_program`.

The kernel asks v2 programs first, then the v1 list (devcgroup_check_permission);
either refusal is EPERM.  Access is a subset of "rwm".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from tracer.device_programs import DeviceProgram
from tracer.enrichment import device_program as prog
from tracer.facts import SkipCounter
from tracer.enrichment.parse_files import TextMemo
from tracer.enrichment.parse_proc import decimal


def _star(number: Optional[int]) -> str:
    return "*" if number is None else str(number)


@dataclass(frozen=True)
class DeviceRule:
    kind: str                # "a", "c" or "b"
    major: Optional[int]     # None = "*"
    minor: Optional[int]
    access: str = "rwm"

    def matches(self, kind: str, major: int, minor: int) -> bool:
        return (self.kind in ("a", kind)
                and self.major in (None, major) and self.minor in (None, minor))

    def to_text(self) -> str:
        return f"{self.kind} {_star(self.major)}:{_star(self.minor)} {self.access}"

    def __str__(self) -> str:
        return self.to_text()


def parse_rule(text: str) -> Optional[DeviceRule]:
    """One `devices.list`/`devices.allow` line (`c 195:* rw`, `a`); None if malformed."""
    parts = text.split()
    if parts == ["a"]:
        return DeviceRule("a", None, None, "rwm")
    if len(parts) not in (2, 3) or parts[0] not in ("a", "b", "c") or ":" not in parts[1]:
        return None
    major_s, _, minor_s = parts[1].partition(":")
    access = parts[2] if len(parts) == 3 else "rwm"
    major = None if major_s == "*" else decimal(major_s)
    minor = None if minor_s == "*" else decimal(minor_s)
    if (major is None and major_s != "*") or (minor is None and minor_s != "*"):
        return None
    if not access or set(access) - set("rwm"):
        return None
    return DeviceRule(parts[0], major, minor, access)


def parse_devices_list(text: str, skips: SkipCounter) -> list[DeviceRule]:
    """cgroup v1 devices.list: `c 195:* rwm`, `a *:* rwm`; bad lines are counted."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        rule = parse_rule(line)
        if rule is None:
            skips.skip("devices_list:bad_line")
            continue
        out.append(rule)
    return out


def _rule_texts(text: str, skips: SkipCounter) -> tuple[str, ...]:
    return tuple(r.to_text() for r in parse_devices_list(text, skips))


# devices.list as its rules' texts, by the list's text: a runtime gives every
# container the same default list, read again at each start (parse_files.TextMemo)
devices_list_texts: TextMemo[tuple[str, ...]] = TextMemo(_rule_texts)


@dataclass(frozen=True)
class DeviceDecision:
    allowed: Optional[bool]          # None: the policy could not be evaluated
    layer: str                       # device_cgroup_v1 | device_cgroup_v2
    detail: str
    program: Optional[dict[str, Any]] = None   # v2: id, name, tag of the deciding program
    deciding: tuple[str, ...] = ()             # v2: the instructions that decided


class DevicePolicy(Protocol):
    @property
    def layer(self) -> str: ...

    @property
    def allows_every_device(self) -> bool:
        """Allows any device whatever its number (decides even without the number)."""
        ...

    def may(self, kind: str, major: int, minor: int, access: str) -> DeviceDecision: ...


@dataclass(frozen=True)
class V1DeviceList:
    """A cgroup v1 device controller: default behaviour plus its exceptions.

    `devices.list` prints `a *:* rwm` for any default-allow cgroup and hides its
    deny exceptions, so `from_rules` is exact only for default-deny cgroups."""

    default_allow: bool
    exceptions: tuple[DeviceRule, ...] = ()
    layer: str = "device_cgroup_v1"

    @classmethod
    def from_rules(cls, rules: list[DeviceRule]) -> "V1DeviceList":
        if any(r.kind == "a" and r.major is None and r.minor is None and set("rwm") <= set(r.access)
               for r in rules):
            return cls(default_allow=True)
        return cls(default_allow=False, exceptions=tuple(rules))

    @classmethod
    def from_devices_list(cls, text: str, skips: Optional[SkipCounter] = None) -> "V1DeviceList":
        return cls.from_rules(parse_devices_list(text, skips or SkipCounter()))

    @property
    def allows_every_device(self) -> bool:
        return self.default_allow and not self.exceptions

    @property
    def hides_denials(self) -> bool:
        """devices.list of a default-allow cgroup does not show its deny rules."""
        return self.default_allow and not self.exceptions

    def may(self, kind: str, major: int, minor: int, access: str) -> DeviceDecision:
        wanted = set(access)
        where = f"{kind} {major}:{minor} {access}"
        for rule in self.exceptions:
            if not rule.matches(kind, major, minor):
                continue
            if self.default_allow and wanted & set(rule.access):
                return DeviceDecision(False, self.layer, f"devices.list deny rule '{rule}' covers {where}")
            if not self.default_allow and wanted <= set(rule.access):
                return DeviceDecision(True, self.layer, f"devices.list allows {where} by '{rule}'")
        if self.default_allow:
            return DeviceDecision(True, self.layer, f"devices.list allows all devices ({where})")
        return DeviceDecision(False, self.layer, f"no devices.list allow rule covers {where}")


ACCESS_BITS = {"m": prog.ACC_MKNOD, "r": prog.ACC_READ, "w": prog.ACC_WRITE}


@dataclass(frozen=True)
class V2DevicePrograms:
    """The effective programs of a v2 cgroup (own and inherited): all must allow."""

    programs: tuple[DeviceProgram, ...]
    cgroup: str = ""
    layer: str = "device_cgroup_v2"
    _decoded: dict[int, list[prog.Insn]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def allows_every_device(self) -> bool:
        return not self.programs

    def _insns(self, program: DeviceProgram) -> list[prog.Insn]:
        if program.id not in self._decoded:
            self._decoded[program.id] = prog.decode(program.insns)
        return self._decoded[program.id]

    def may(self, kind: str, major: int, minor: int, access: str) -> DeviceDecision:
        where = f"{kind} {major}:{minor} {access}"
        if not self.programs:
            return DeviceDecision(True, self.layer, f"no device program is attached ({where})")
        bits = sum(ACCESS_BITS[a] for a in set(access) if a in ACCESS_BITS)
        ctx = prog.dev_ctx(kind, major, minor, bits)
        undecided: Optional[DeviceDecision] = None
        for program in self.programs:
            if not program.insns:
                result = prog.ProgramRun(None, why_undecided="its instructions could not be read")
            else:
                result = prog.run(self._insns(program), ctx)
            ident = {"id": program.id, "name": program.name, "tag": program.tag}
            if result.allowed is False:
                return DeviceDecision(False, self.layer,
                                      f"{program.label()} returns {result.returned} for {where}",
                                      ident, tuple(result.deciding))
            if result.allowed is None and undecided is None:
                undecided = DeviceDecision(None, self.layer,
                                           f"{program.label()} is undecided for {where}: "
                                           f"{result.why_undecided}", ident, tuple(result.deciding))
        if undecided is not None:
            return undecided
        names = ", ".join(p.label() for p in self.programs)
        return DeviceDecision(True, self.layer, f"{names} allow {where}")


def access_from_mask(may_mask: int) -> str:
    """MAY_READ (4) / MAY_WRITE (2) of an open -> device cgroup access letters."""
    return ("r" if may_mask & 4 else "") + ("w" if may_mask & 2 else "")


@dataclass(frozen=True)
class OciDeviceRules:
    """An OCI config's `linux.resources.devices`: what a runtime (or systemd, for the
    systemd cgroup driver) applies, and re-applies, to the container.  Rules apply
    in order on a deny-all start; for one device and access the last rule that
    matches decides (an allow must cover the access, a deny only touch it)."""

    rules: tuple[tuple[bool, DeviceRule], ...]
    layer: str = "oci_config"

    @classmethod
    def from_oci(cls, raw: Any) -> Optional["OciDeviceRules"]:
        """From the config reader's rule dicts; None when they are not a list of rules."""
        if not isinstance(raw, list):
            return None
        out = []
        for r in raw:
            if not isinstance(r, dict):
                return None
            major, minor = r.get("major"), r.get("minor")
            rule = parse_rule(f"{r.get('type') or 'a'} {'*' if major is None else major}:"
                              f"{'*' if minor is None else minor} {r.get('access') or 'rwm'}")
            if rule is None:
                return None
            out.append((bool(r.get("allow")), rule))
        return cls(tuple(out))

    def may(self, kind: str, major: int, minor: int, access: str) -> DeviceDecision:
        where = f"{kind} {major}:{minor} {access}"
        decided: Optional[tuple[bool, DeviceRule]] = None
        for allow, rule in self.rules:
            if not rule.matches(kind, major, minor):
                continue
            if allow and set(access) <= set(rule.access):
                decided = (True, rule)
            elif not allow and set(access) & set(rule.access):
                decided = (False, rule)
        if decided is None:
            return DeviceDecision(False, self.layer, f"no rule of the OCI config allows {where}")
        verb = "allows" if decided[0] else "denies"
        return DeviceDecision(decided[0], self.layer,
                              f"the OCI config {verb} {where} by '{decided[1]}'")


@dataclass(frozen=True)
class UnreadPolicy:
    """A device cgroup layer that exists but could not be read: never a guess."""

    layer: str
    why: str
    allows_every_device = False

    def may(self, kind: str, major: int, minor: int, access: str) -> DeviceDecision:
        return DeviceDecision(None, self.layer, f"not known: {self.why}")


def policies_from_facts(v1_rules: Any, v2_programs: Any, v2_unreadable: Any,
                        skips: Optional[SkipCounter] = None,
                        v1_unreadable: Any = None) -> Optional[tuple[DevicePolicy, ...]]:
    """The device cgroup layers a process's facts describe, v2 first (the kernel's
    order); None when neither is known.  Facts may come from a journal written by
    anyone, so they are validated here."""
    found: list[DevicePolicy] = []
    if isinstance(v2_programs, list):
        found.append(V2DevicePrograms(tuple(DeviceProgram.from_json(p) for p in v2_programs)))
    elif v2_unreadable:
        found.append(UnreadPolicy("device_cgroup_v2", str(v2_unreadable)))
    if isinstance(v1_rules, list):
        text = "\n".join(str(r) for r in v1_rules)
        found.append(V1DeviceList.from_devices_list(text, skips))
    elif v1_unreadable:
        found.append(UnreadPolicy("device_cgroup_v1", str(v1_unreadable)))
    return tuple(found) or None


MAX_NAMED_NUMBERS = 256


def numbers_named(policy: DevicePolicy) -> set[int]:
    """Device numbers a policy names: a v1 list's majors and minors, a v2 program's
    compare constants.  Candidates for asking `may` about numbers other than a
    refused node's (a rule for a stale major); no number is invented."""
    found: set[int] = set()
    if isinstance(policy, V1DeviceList):
        for rule in policy.exceptions:
            found.update(n for n in (rule.major, rule.minor) if n is not None)
    elif isinstance(policy, V2DevicePrograms):
        for program in policy.programs:
            for insn in policy._insns(program) if program.insns else []:
                compare = insn.cls in (prog.JMP, prog.JMP32) and not insn.code & 0x08 \
                    and insn.code & 0xF0 not in (prog.JA, prog.CALL, prog.EXIT)
                if compare and 0 <= insn.imm < 1 << 20:
                    found.add(insn.imm)
    return set(sorted(found)[:MAX_NAMED_NUMBERS])


def allows_other(policy: DevicePolicy, kind: str, major: int, minor: int,
                 access: str) -> list[tuple[int, int, str]]:
    """(major, minor, what allows it) for the numbers, other than (major, minor), that
    the policy names and allows with `access`: each named number tried as the major
    (with the node's minor) and as the minor (with the node's major).  What allows
    it is the v1 rule's text, or the v2 programs' labels."""
    named = numbers_named(policy)
    tried = {(m, minor) for m in named if m != major} | {(major, n) for n in named if n != minor}
    out = []
    for other_major, other_minor in sorted(tried):
        if policy.may(kind, other_major, other_minor, access).allowed is not True:
            continue
        if isinstance(policy, V1DeviceList):
            rule = next((r for r in policy.exceptions if r.matches(kind, other_major, other_minor)
                         and set(access) <= set(r.access)), None)
            out.append((other_major, other_minor, str(rule) if rule else "devices.list"))
        elif isinstance(policy, V2DevicePrograms):
            out.append((other_major, other_minor,
                        ", ".join(p.label() for p in policy.programs)))
    return out
