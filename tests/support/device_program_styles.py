"""Compile device rule sets into BPF_CGROUP_DEVICE programs the way runc, crun and
systemd shape theirs (written from reading their generators, not copied):

* runc  (libcontainer/cgroups/devices/devicefilter.go): prologue loads type, access,
  major, minor into r2..r5 with 32-bit ALU; one block per rule that differs from the
  default: `if w2 != type goto next`, optional access check through w1, `if r4 != major`,
  `if r5 != minor`, then `w0 = allow; exit`; the default last.
* crun  (src/libcrun/ebpf.c): the same prologue; rules in order, any type ('a' skips the
  type check), relative jumps, `r0 = accept` with a 64-bit move; an all-wildcard rule
  ends the program; default deny.
* systemd (src/core/bpf-devices.c): allowlist; the access check comes first, the type,
  major, minor checks follow, a match jumps forward to a shared PASS block; the fall
  through is `r0 = 0; goto +1`; PASS is `r0 = 1; exit`.  Named `sd_devices`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

from tracer.enrichment.device_program import ACC_MKNOD, ACC_READ, ACC_WRITE, DEV_BLOCK, DEV_CHAR, Insn

STYLES = ("runc", "crun", "systemd")
ALL_ACCESS = ACC_MKNOD | ACC_READ | ACC_WRITE
BPF_W = 0x00
LDX_W = 0x61            # BPF_LDX | BPF_MEM | BPF_W
ALU32_AND_K, ALU32_RSH_K, ALU32_MOV_X, ALU32_MOV_K = 0x54, 0x74, 0xBC, 0xB4
ALU64_MOV_K = 0xB7
JNE_K, JNE_X, JA, EXIT = 0x55, 0x5D, 0x05, 0x95


@dataclass(frozen=True)
class Rule:
    allow: bool
    kind: str                  # a, b, c
    major: Optional[int]       # None = *
    minor: Optional[int]
    access: str                # subset of rwm, not empty

    def bits(self) -> int:
        return sum({"m": ACC_MKNOD, "r": ACC_READ, "w": ACC_WRITE}[a] for a in set(self.access))

    def type_bits(self) -> int:
        return DEV_BLOCK if self.kind == "b" else DEV_CHAR


@dataclass(frozen=True)
class RuleSet:
    style: str
    default_allow: bool
    rules: tuple[Rule, ...]


def _prologue() -> list[Insn]:
    return [Insn(LDX_W, 2, 1, 0, 0), Insn(ALU32_AND_K, 2, 0, 0, 0xFFFF),
            Insn(LDX_W, 3, 1, 0, 0), Insn(ALU32_RSH_K, 3, 0, 0, 16),
            Insn(LDX_W, 4, 1, 4, 0), Insn(LDX_W, 5, 1, 8, 0)]


def _checks(rule: Rule, skip_type: bool) -> list[tuple[str, int]]:
    """(what, value) checks of a rule, in runc/crun order; jumps are patched later."""
    checks: list[tuple[str, int]] = []
    if not skip_type:
        checks.append(("type", rule.type_bits()))
    if rule.bits() != ALL_ACCESS:
        checks.append(("access", rule.bits()))
    if rule.major is not None:
        checks.append(("major", rule.major))
    if rule.minor is not None:
        checks.append(("minor", rule.minor))
    return checks


def _block(checks: list[tuple[str, int]], ret_insns: list[Insn]) -> list[Insn]:
    """Checks jumping past the block when they fail, then the return."""
    body: list[Insn] = []
    sizes = [3 if what == "access" else 1 for what, _ in checks]
    for n, (what, value) in enumerate(checks):
        left = sum(sizes[n + 1:]) + len(ret_insns)  # insns after this check's last one
        if what == "access":
            body += [Insn(ALU32_MOV_X, 1, 3, 0, 0), Insn(ALU32_AND_K, 1, 0, 0, value),
                     Insn(JNE_X, 1, 3, left, 0)]
        else:
            reg = {"type": 2, "major": 4, "minor": 5}[what]
            body.append(Insn(JNE_K, reg, 0, left, value))
    return body + ret_insns


def compile_runc(rules: RuleSet) -> list[Insn]:
    insns = _prologue()
    for rule in rules.rules:
        ret = [Insn(ALU32_MOV_K, 0, 0, 0, int(rule.allow)), Insn(EXIT, 0, 0, 0, 0)]
        insns += _block(_checks(rule, skip_type=False), ret)
    return insns + [Insn(ALU32_MOV_K, 0, 0, 0, int(rules.default_allow)), Insn(EXIT, 0, 0, 0, 0)]


def compile_crun(rules: RuleSet) -> list[Insn]:
    insns = _prologue()
    for rule in rules.rules:
        ret = [Insn(ALU64_MOV_K, 0, 0, 0, int(rule.allow)), Insn(EXIT, 0, 0, 0, 0)]
        checks = _checks(rule, skip_type=rule.kind == "a")
        insns += _block(checks, ret)
        if not checks:
            return insns  # a wildcard rule decides everything after it
    return insns + [Insn(ALU64_MOV_K, 0, 0, 0, 0), Insn(EXIT, 0, 0, 0, 0)]


def compile_systemd(rules: RuleSet) -> list[Insn]:
    allowed = [r for r in rules.rules if r.allow and r.kind in "bc"]
    if not allowed:  # strict policy, nothing listed: deny everything
        return _prologue() + [Insn(ALU64_MOV_K, 0, 0, 0, 0), Insn(EXIT, 0, 0, 0, 0)]
    insns = _prologue()
    pass_jumps = []
    for rule in allowed:
        checks = [("type", rule.type_bits())]
        if rule.major is not None:
            checks.append(("major", rule.major))
            if rule.minor is not None:
                checks.append(("minor", rule.minor))
        if rule.bits() != ALL_ACCESS:  # systemd checks access first
            left = len(checks) + 1
            insns += [Insn(ALU32_MOV_X, 1, 3, 0, 0), Insn(ALU32_AND_K, 1, 0, 0, rule.bits()),
                      Insn(JNE_X, 1, 3, left, 0)]
        for n, (what, value) in enumerate(checks):
            reg = {"type": 2, "major": 4, "minor": 5}[what]
            insns.append(Insn(JNE_K, reg, 0, len(checks) - n, value))
        pass_jumps.append(len(insns))
        insns.append(Insn(JA, 0, 0, 0, 0))
    insns += [Insn(ALU64_MOV_K, 0, 0, 0, 0), Insn(JA, 0, 0, 1, 0)]
    pass_at = len(insns)
    for at in pass_jumps:
        insns[at] = Insn(JA, 0, 0, pass_at - at - 1, 0)
    return insns + [Insn(ALU64_MOV_K, 0, 0, 0, 1), Insn(EXIT, 0, 0, 0, 0)]


COMPILERS = {"runc": compile_runc, "crun": compile_crun, "systemd": compile_systemd}
PROGRAM_NAMES = {"runc": "", "crun": "crun_devices", "systemd": "sd_devices"}


def random_rule(rng: random.Random, majors: tuple[int, ...], minors: tuple[int, ...],
                kinds: str, allow: bool) -> Rule:
    access = "".join(a for a in "rwm" if rng.random() < 0.6) or rng.choice("rwm")
    if rng.random() < 0.4:
        access = "rwm"
    major = None if rng.random() < 0.15 else rng.choice(majors)
    minor = None if major is None or rng.random() < 0.35 else rng.choice(minors)
    return Rule(allow, rng.choice(kinds), major, minor, access)


def random_rule_set(rng: random.Random, style: str, majors: tuple[int, ...],
                    minors: tuple[int, ...]) -> RuleSet:
    count = rng.randint(0, 7)
    if style == "runc":  # the emulator leaves only rules opposite to the default
        default = rng.random() < 0.4
        rules = tuple(random_rule(rng, majors, minors, "bc", not default) for _ in range(count))
        return RuleSet(style, default, rules)
    if style == "crun":
        rules = tuple(random_rule(rng, majors, minors, "bcca", rng.random() < 0.6)
                      for _ in range(count))
        return RuleSet(style, False, rules)
    rules = tuple(random_rule(rng, majors, minors, "bc", True) for _ in range(count))
    return RuleSet(style, False, rules)
