"""The cgroup v2 device-program interpreter reads instructions from journals that
anyone may write: it never raises.  Register 11 and above (a 4-bit field the
verifier never lets through), unknown opcodes, truncated 64-bit loads, jumps out
of the program: each is an undecided run that says where and why."""

from __future__ import annotations

import base64
import errno
import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.example_counts import fuzz, print_example_counts, ran  # noqa: F401
from tests.test_enrichment_fixtures import denial
from tests.test_ladder import _facts
from tracer.enrichment import device_program as prog
from tracer.enrichment.device_program import Insn
from tracer.device_programs import DeviceProgram

CTXS = [prog.dev_ctx("c", 195, 0, prog.ACC_READ | prog.ACC_WRITE),
        prog.dev_ctx("b", 8, 1, prog.ACC_MKNOD), prog.dev_ctx("c", 2**32 - 1, 2**32 - 1, 7)]
# opcodes the interpreter models, so most fuzzed programs get past the first instruction
CODES = [0x07, 0x0F, 0x17, 0x1F, 0x27, 0x2F, 0x37, 0x3F, 0x47, 0x4F, 0x57, 0x5F, 0x67, 0x6F,
         0x77, 0x7F, 0x87, 0x97, 0x9F, 0xA7, 0xAF, 0xB7, 0xBF, 0xC7, 0xCF, 0xD7, 0x04, 0x0C,
         0xB4, 0xBC, 0x34, 0x94, 0x61, 0x69, 0x71, 0x79, 0x18, 0x05, 0x06, 0x15, 0x1D, 0x25,
         0x2D, 0x35, 0x45, 0x55, 0x5D, 0x65, 0x75, 0xA5, 0xB5, 0xC5, 0xD5, 0x16, 0x1E, 0x26,
         0xA6, 0x85, 0x95, 0x62, 0x63, 0x7B]
INSN = st.builds(Insn, code=st.sampled_from(CODES) | st.integers(0, 255),
                 dst=st.integers(0, 15) | st.sampled_from([0, 1, 2, 3]),
                 src=st.integers(0, 15) | st.sampled_from([0, 1, 2]),
                 off=st.integers(-32768, 32767) | st.integers(0, 12) | st.sampled_from([1, 8, 16, 32]),
                 imm=st.integers(-2**31, 2**31 - 1) | st.integers(0, 300))


def check_run(insns: list[Insn]) -> None:
    for ctx in CTXS:
        result = prog.run(insns, ctx)
        assert result.allowed in (True, False, None)
        if result.allowed is None:
            assert result.why_undecided, insns
        else:
            assert isinstance(result.returned, int)
        assert all(isinstance(line, str) for line in result.deciding)
    for pc in range(len(insns)):
        assert isinstance(prog.disassemble(insns, pc), str)


@fuzz(2000)
@given(st.lists(INSN, min_size=1, max_size=24))
def test_decoded_programs_never_raise(insns: list[Insn]) -> None:
    ran("device_program.run (instructions)")
    check_run(prog.decode(prog.encode(insns)))


@fuzz(1000)
@given(st.binary(max_size=200))
def test_raw_bytes_never_raise(raw: bytes) -> None:
    ran("device_program.decode+run (raw bytes)")
    check_run(prog.decode(raw))


R0_IS_1 = Insn(0xB7, 0, 0, 0, 1)   # r0 = 1
EXIT = Insn(0x95, 0, 0, 0, 0)


@pytest.mark.parametrize("reg", range(11, 16))
@pytest.mark.parametrize("where", ["dst", "src"])
def test_registers_above_r10_are_undecided_not_an_index_error(reg: int, where: str) -> None:
    bad = Insn(0xBF, reg if where == "dst" else 0, reg if where == "src" else 1, 0, 0)  # mov
    result = prog.run([R0_IS_1, bad, EXIT], CTXS[0])
    assert result.allowed is None and f"pc1: register r{reg} does not exist" in result.why_undecided


def test_explain_of_a_journal_with_register_11_answers_in_one_line(tmp_path) -> None:
    """`gputrace explain` of an EPERM whose recorded device program uses r11: the
    verdict is unknown (the program could not be run), said in the why line, and
    the journal's next event is still explained."""
    hostile = prog.encode([Insn(0xB7, 11, 0, 0, 1), EXIT])  # r11 = 1; exit
    program = DeviceProgram(7, "hostile", "00" * 8, hostile).to_json()
    lines = []
    for err in (errno.EPERM, errno.EACCES):
        event = denial(4242, "/dev/nvidia0", err)
        event.facts = _facts(**{"device_cgroup.v2_programs": [program]})
        lines.append(json.dumps(event.to_json()))
    src = tmp_path / "journal.jsonl"
    src.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([sys.executable, "-m", "tracer", "explain", str(src)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    whys = [line for line in proc.stdout.splitlines() if line.startswith("  why: ")]
    assert len(whys) == 2, proc.stdout
    assert whys[0].startswith("  why: [unknown]"), whys[0]
    assert "Traceback" not in proc.stdout
    as_json = subprocess.run([sys.executable, "-m", "tracer", "explain", "--json", str(src)],
                             capture_output=True, text=True, timeout=60)
    first = json.loads(as_json.stdout.splitlines()[0])["verdict"]
    ladder = {step["layer"]: step for step in first["ladder"]}
    assert ladder["device_cgroup_v2"]["refuses"] is None
    assert "register r11 does not exist" in ladder["device_cgroup_v2"]["detail"]
    assert base64.b64decode(program["insns_b64"]) == hostile
