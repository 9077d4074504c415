"""Run a cgroup v2 device program in Python, as the kernel would run it.

The kernel runs every effective BPF_CGROUP_DEVICE program on a
`struct bpf_cgroup_dev_ctx {u32 access_type; u32 major; u32 minor;}` where
access_type = access << 16 | type (type: block 1, char 2; access: mknod 1,
read 2, write 4); a program that returns 0 denies (EPERM).  BPF_PROG_TEST_RUN
does not support this program type, so we interpret the verifier's (xlated)
instructions ourselves.

Modelled: ALU/ALU64 (incl. sign-extending moves and signed div/mod), JMP/JMP32
forward jumps, 64-bit immediates, loads from the context.  Anything else
(helper calls, maps, stack, backward jumps = loops) gives an *undecided* run,
never a guess.  A run also names the instructions that decided it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Optional, Union

DEV_BLOCK, DEV_CHAR = 1, 2
ACC_MKNOD, ACC_READ, ACC_WRITE = 1, 2, 4
CTX_SIZE = 12
MAX_STEPS = 1 << 16
MAX_REG = 10  # r0..r10: a 4-bit register field above that is no register (MAX_BPF_REG)
U64, U32 = (1 << 64) - 1, (1 << 32) - 1

# instruction classes and fields (include/uapi/linux/bpf.h)
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = range(8)
SIZES = {0x00: 4, 0x08: 2, 0x10: 1, 0x18: 8}
ALU_NAMES = {0x00: "+=", 0x10: "-=", 0x20: "*=", 0x30: "/=", 0x40: "|=", 0x50: "&=",
             0x60: "<<=", 0x70: ">>=", 0x80: "neg", 0x90: "%=", 0xA0: "^=", 0xB0: "=",
             0xC0: "s>>=", 0xD0: "end"}
JMP_NAMES = {0x10: "==", 0x20: ">", 0x30: ">=", 0x40: "&", 0x50: "!=", 0x60: "s>",
             0x70: "s>=", 0xA0: "<", 0xB0: "<=", 0xC0: "s<", 0xD0: "s<="}
JA, CALL, EXIT = 0x00, 0x80, 0x90


@dataclass(frozen=True)
class Insn:
    code: int
    dst: int
    src: int
    off: int
    imm: int

    @property
    def cls(self) -> int:
        return self.code & 7


def decode(raw: bytes) -> list[Insn]:
    """8-byte `struct bpf_insn`s, little-endian (the only byte order we run on)."""
    out = []
    for pos in range(0, len(raw) - len(raw) % 8, 8):
        code, regs, off, imm = struct.unpack_from("<BBhi", raw, pos)
        out.append(Insn(code, regs & 0xF, regs >> 4, off, imm))
    return out


def encode(insns: list[Insn]) -> bytes:
    return b"".join(struct.pack("<BBhi", i.code, i.dst | i.src << 4, i.off, i.imm) for i in insns)


def disassemble(insns: list[Insn], pc: int) -> str:
    """One instruction in the style of bpftool's xlated dump."""
    i = insns[pc]
    op, src_x = i.code & 0xF0, bool(i.code & 0x08)
    if i.cls in (ALU, ALU64):
        reg = "r" if i.cls == ALU64 else "w"
        rhs = f"{reg}{i.src}" if src_x else str(i.imm)
        if op == 0x80:
            return f"{reg}{i.dst} = -{reg}{i.dst}"
        return f"{reg}{i.dst} {ALU_NAMES.get(op, hex(op))} {rhs}"
    if i.cls == LDX:
        return f"r{i.dst} = *(u{SIZES[i.code & 0x18] * 8} *)(r{i.src} {i.off:+d})"
    if i.cls in (JMP, JMP32):
        if op == EXIT:
            return "exit"
        if op == CALL:
            return f"call {i.imm}"
        if op == JA:
            return f"goto pc{i.off if i.cls == JMP else i.imm:+d}"
        reg = "r" if i.cls == JMP else "w"
        rhs = f"{reg}{i.src}" if src_x else str(i.imm)
        return f"if {reg}{i.dst} {JMP_NAMES.get(op, hex(op))} {rhs} goto pc{i.off:+d}"
    if i.code == 0x18:
        return f"r{i.dst} = imm64 (src {i.src})"
    return f"code {i.code:#04x}"


class Undecided(Exception):
    """The program does something the interpreter does not model."""


@dataclass(frozen=True)
class Ctx:
    """The context pointer (r1 at entry), plus an offset."""
    off: int = 0


Reg = Union[int, Ctx, None]  # None: never written


@dataclass
class ProgramRun:
    allowed: Optional[bool]        # None: undecided
    returned: Optional[int] = None
    deciding: list[str] = field(default_factory=list)  # "pcN: insn" that led to the exit
    why_undecided: str = ""


def dev_ctx(kind: str, major: int, minor: int, access: int) -> bytes:
    """The bpf_cgroup_dev_ctx the kernel builds for (type, major, minor, access)."""
    dev_type = DEV_BLOCK if kind == "b" else DEV_CHAR
    return struct.pack("<III", (access << 16 | dev_type) & U32, major & U32, minor & U32)


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _alu(op: int, dst: int, src: int, bits: int, insn: Insn) -> int:
    mask = (1 << bits) - 1
    dst, src = dst & mask, src & mask
    signed = insn.off == 1
    if op == 0x00:
        return dst + src
    if op == 0x10:
        return dst - src
    if op == 0x20:
        return dst * src
    if op in (0x30, 0x90):
        if src == 0:
            return 0 if op == 0x30 else dst
        if signed:
            a, b = _signed(dst, bits), _signed(src, bits)
            q = abs(a) // abs(b) * (1 if (a < 0) == (b < 0) else -1)
            return q if op == 0x30 else a - b * q
        return dst // src if op == 0x30 else dst % src
    if op == 0x40:
        return dst | src
    if op == 0x50:
        return dst & src
    if op == 0x60:
        return dst << (src & (bits - 1))
    if op == 0x70:
        return dst >> (src & (bits - 1))
    if op == 0x80:
        return -dst
    if op == 0xA0:
        return dst ^ src
    if op == 0xB0:
        return _signed(src, insn.off) if insn.off in (8, 16, 32) else src
    if op == 0xC0:
        return _signed(dst, bits) >> (src & (bits - 1))
    raise Undecided(f"ALU op {op:#x}")


def _jump_taken(op: int, dst: int, src: int, bits: int) -> bool:
    mask = (1 << bits) - 1
    a, b = dst & mask, src & mask
    sa, sb = _signed(a, bits), _signed(b, bits)
    table = {0x10: a == b, 0x20: a > b, 0x30: a >= b, 0x40: bool(a & b), 0x50: a != b,
             0x60: sa > sb, 0x70: sa >= sb, 0xA0: a < b, 0xB0: a <= b, 0xC0: sa < sb,
             0xD0: sa <= sb}
    if op not in table:
        raise Undecided(f"jump op {op:#x}")
    return table[op]


def _value(reg: Reg, what: str) -> int:
    if reg is None:
        raise Undecided(f"{what} is read before it is written")
    if isinstance(reg, Ctx):
        raise Undecided(f"arithmetic on the context pointer ({what})")
    return reg


def run(insns: list[Insn], ctx: bytes) -> ProgramRun:
    """Run the program on one context; never raises: what it cannot run (an
    instruction the kernel's verifier would have refused, say register 11, or one
    not modelled) makes the run undecided, with where and why."""
    regs: list[Reg] = [None] * (MAX_REG + 1)
    regs[1], regs[10] = Ctx(0), None
    executed: list[tuple[int, bool]] = []  # (pc, a jump taken there)
    pc, steps = 0, 0
    try:
        while True:
            steps += 1
            if steps > MAX_STEPS or not 0 <= pc < len(insns):
                raise Undecided("runs off the end of the program")
            i = insns[pc]
            if i.dst > MAX_REG or i.src > MAX_REG:
                raise Undecided(f"pc{pc}: register r{max(i.dst, i.src)} does not exist "
                                "(no verifier accepts it)")
            op, src_x = i.code & 0xF0, bool(i.code & 0x08)
            executed.append((pc, False))
            if i.cls in (ALU, ALU64):
                bits = 64 if i.cls == ALU64 else 32
                if op == 0xD0:
                    raise Undecided("byte swap")
                if op == 0xB0 and src_x and isinstance(regs[i.src], Ctx) and bits == 64:
                    regs[i.dst] = regs[i.src]
                else:
                    src = _value(regs[i.src], f"r{i.src}") if src_x else (i.imm & U64 if bits == 64 else i.imm & U32)
                    dst = 0 if op == 0xB0 else _value(regs[i.dst], f"r{i.dst}")
                    regs[i.dst] = _alu(op, dst, src, bits, i) & (U64 if bits == 64 else U32)
                pc += 1
            elif i.cls == LDX:
                base = regs[i.src]
                size = SIZES[i.code & 0x18]
                if (i.code & 0xE0) != 0x60 or not isinstance(base, Ctx):
                    raise Undecided(f"pc{pc}: memory other than the device context")
                start = base.off + i.off
                if start < 0 or start + size > CTX_SIZE:
                    raise Undecided(f"pc{pc}: context read out of bounds")
                regs[i.dst] = int.from_bytes(ctx[start:start + size], "little")
                pc += 1
            elif i.code == 0x18:  # LD_IMM64 takes two slots
                if i.src != 0 or pc + 1 >= len(insns):
                    raise Undecided(f"pc{pc}: uses a map or a kernel object")
                regs[i.dst] = (i.imm & U32) | (insns[pc + 1].imm & U32) << 32
                pc += 2
            elif i.cls in (JMP, JMP32):
                if op == EXIT:
                    ret = _value(regs[0], "r0") & U32
                    return ProgramRun(bool(ret & 1), ret, _deciding(insns, executed))
                if op == CALL:
                    raise Undecided(f"pc{pc}: calls a helper or function ({i.imm})")
                if op == JA:
                    offset = i.off if i.cls == JMP else i.imm
                    taken = True
                else:
                    bits = 64 if i.cls == JMP else 32
                    src = _value(regs[i.src], f"r{i.src}") if src_x else i.imm & U64
                    taken = _jump_taken(op, _value(regs[i.dst], f"r{i.dst}"), src, bits)
                    offset = i.off
                if taken:
                    executed[-1] = (pc, True)
                    if offset < 0:
                        raise Undecided(f"pc{pc}: jumps backwards (a loop)")
                    pc += offset
                pc += 1
            else:
                raise Undecided(f"pc{pc}: {disassemble(insns, pc)} (stack or store)")
    except Undecided as exc:
        return ProgramRun(None, None, _deciding(insns, executed), str(exc))


def _deciding(insns: list[Insn], executed: list[tuple[int, bool]], limit: int = 8) -> list[str]:
    """The path into the exit, context loads left out, the last `limit` steps: the
    checks of the rule that matched (or of the last one that did not) and r0."""
    out = []
    for pc, taken in executed:
        insn = insns[pc]
        if insn.cls == LDX:
            continue
        note = ""
        if insn.cls in (JMP, JMP32) and insn.code & 0xF0 not in (JA, CALL, EXIT):
            note = " (taken)" if taken else " (not taken)"
        out.append(f"pc{pc}: {disassemble(insns, pc)}{note}")
    return out[-limit:]
