"""Differential test: the cgroup v2 device-program interpreter against the kernel.

Random rule sets are compiled into real BPF_CGROUP_DEVICE programs in the shapes
runc, crun and systemd generate (tests/support/device_program_styles.py), loaded
and attached to real v2 cgroups (some nested, so two programs are effective), and
read back the way production reads them (by cgroup id: BPF_PROG_QUERY effective,
BPF_PROG_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD xlated).  A root prober process in
the cgroup then really opens (read, write, read+write) and mknods char and block
nodes of driverless majors: EPERM = refused by the program, ENXIO or success =
allowed.  The interpreter must agree on every case; deliberately broken
interpreters must not.  GPUTRACE_DEVPROG_SEED replays another seed.
"""

from __future__ import annotations

import errno
import os
import random
import stat
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import pytest

from tests.support import device_program_styles as styles
from tests.support.devcg_prober import Prober
from tests.support.v2_device_cgroup import attach_program
from tracer.enrichment import device_program
from tracer.enrichment.device_cgroup_v2 import open_v2_cgroup, read_device_programs
from tracer.enrichment.device_rules import V2DevicePrograms
from tracer.enrichment.parse_proc import parse_proc_devices
from tracer.facts import SkipCounter

pytestmark = pytest.mark.kernel

SEED = int(os.environ.get("GPUTRACE_DEVPROG_SEED", "1911"))
UNIFIED = "/sys/fs/cgroup/unified"
RULE_SETS = 540
QUERIES_PER_SET = 24
LOCAL_MAJORS = (60, 61, 62, 63, 120, 121, 122)  # "local/experimental use" in devices.txt
MINORS = (0, 1, 2, 7, 200)
OPS = (("open", "O_RDONLY", "r"), ("open", "O_WRONLY", "w"), ("open", "O_RDWR", "rw"),
       ("mknod", "", "m"))


@dataclass(frozen=True)
class Case:
    style: str
    rules: Any
    policy: V2DevicePrograms
    kind: str
    major: int
    minor: int
    access: str
    kernel_errno: int

    @property
    def kernel_allowed(self) -> bool:
        return self.kernel_errno != errno.EPERM

    def model(self) -> Any:
        return self.policy.may(self.kind, self.major, self.minor, self.access)

    def describe(self) -> str:
        return (f"seed={SEED} {self.style} {self.kind} {self.major}:{self.minor} {self.access}: "
                f"kernel {errno.errorcode.get(self.kernel_errno, self.kernel_errno)}, "
                f"model {self.model()}\n  rules {self.rules}")


def _free_majors() -> tuple[int, ...]:
    with open("/proc/devices", encoding="ascii") as handle:
        text = handle.read()
    char = set(parse_proc_devices(text, SkipCounter()))
    block_text = text.split("Block devices:", 1)[-1]
    block = {int(line.split()[0]) for line in block_text.splitlines() if line.strip()}
    majors = tuple(m for m in LOCAL_MAJORS if m not in char and m not in block)
    assert len(majors) >= 4, "the local-use majors are taken by drivers on this host"
    return majors[:4]


@pytest.fixture(scope="module")
def nodes() -> Iterator[tuple[str, dict[tuple[str, int, int], str]]]:
    majors = _free_majors()
    directory = os.path.join("/dev", f"gttest-devprog-{uuid.uuid4().hex[:8]}")
    os.mkdir(directory, 0o755)
    made = {}
    try:
        for kind in "cb":
            for major in majors:
                for minor in MINORS:
                    path = os.path.join(directory, f"{kind}{major}_{minor}")
                    os.mknod(path, (stat.S_IFCHR if kind == "c" else stat.S_IFBLK) | 0o666,
                             os.makedev(major, minor))
                    made[(kind, major, minor)] = path
        yield directory, made
    finally:
        for path in made.values():
            os.unlink(path)
        for leftover in os.listdir(directory):
            os.unlink(os.path.join(directory, leftover))
        os.rmdir(directory)


@pytest.fixture(scope="module")
def cgroup_parent() -> Iterator[str]:
    if not os.path.exists(os.path.join(UNIFIED, "cgroup.procs")):
        pytest.fail(f"no cgroup2 hierarchy at {UNIFIED}")
    parent = os.path.join(UNIFIED, f"gttest-devprog-{uuid.uuid4().hex[:8]}")
    os.mkdir(parent)
    try:
        yield parent
    finally:
        for directory, _, _ in sorted(os.walk(parent), key=lambda w: -len(w[0])):
            os.rmdir(directory)


def run_cases(prober: Prober, parent: str, nodes: dict[tuple[str, int, int], str],
              scratch: str, rng: random.Random, index: int) -> list[Case]:
    keys = sorted(nodes)
    majors = tuple(sorted({k[1] for k in keys}))
    chain = [styles.random_rule_set(rng, rng.choice(styles.STYLES), majors, MINORS)]
    if index % 5 == 4:  # nested: a parent program is effective too
        chain.insert(0, styles.random_rule_set(rng, rng.choice(styles.STYLES), majors, MINORS))
    directories, prog_fds = [], []
    where = parent
    for n, rules in enumerate(chain):
        where = os.path.join(where, f"s{index}_{n}")
        os.mkdir(where)
        directories.append(where)
        prog_fds.append(attach_program(where, rules))
    leaf = directories[-1]
    try:
        fd, path = open_v2_cgroup(UNIFIED, os.stat(leaf).st_ino, None)  # as production does
        try:
            policy = read_device_programs(fd, path)
        finally:
            os.close(fd)
        assert len(policy.programs) == len(chain), (policy, chain)
        queries = []
        for q in range(QUERIES_PER_SET):
            kind, major, minor = rng.choice(keys)
            op, flags, access = rng.choice(OPS)
            if op == "open":
                queries.append((kind, major, minor, access, ["open", nodes[(kind, major, minor)], flags]))
            else:
                target = os.path.join(scratch, f"m{index}_{q}")
                queries.append((kind, major, minor, access, ["mknod", target, kind, major, minor]))
        prober.join(os.path.join(leaf, "cgroup.procs"))
        try:
            errnos = prober.ask([q[4] for q in queries])
        finally:
            prober.join(os.path.join(UNIFIED, "cgroup.procs"))
    finally:
        for fd in prog_fds:
            os.close(fd)  # detaches nothing; rmdir releases the attachment
        for directory in reversed(directories):
            os.rmdir(directory)
    for err in errnos:
        assert err in (0, errno.EPERM, errno.ENXIO), f"unexpected {errno.errorcode.get(err, err)}"
    label = "+".join(r.style for r in chain)
    return [Case(label, chain, policy, k, ma, mi, acc, err)
            for (k, ma, mi, acc, _), err in zip(queries, errnos)]


@pytest.fixture(scope="module")
def cases(nodes: Any, cgroup_parent: str) -> list[Case]:
    directory, made = nodes
    rng = random.Random(SEED)
    out: list[Case] = []
    with Prober() as prober:
        prober.join("/sys/fs/cgroup/devices/cgroup.procs")  # v1: the allow-all root
        for index in range(RULE_SETS):
            out += run_cases(prober, cgroup_parent, made, directory, rng, index)
    return out


def _disagreements(cases: list[Case]) -> list[Case]:
    return [c for c in cases if c.model().allowed != c.kernel_allowed]


def test_interpreter_agrees_with_the_kernel(cases: list[Case]) -> None:
    bad = _disagreements(cases)
    refused = sum(not c.kernel_allowed for c in cases)
    styles_seen = {s for c in cases for s in c.style.split("+")}
    print(f"\ndevice programs: {RULE_SETS} rule sets, {len(cases)} cases "
          f"(kernel refused {refused}, allowed {len(cases) - refused}), "
          f"{len(cases) - len(bad)} agree, seed {SEED}")
    assert styles_seen == set(styles.STYLES)
    assert RULE_SETS >= 500 and len(cases) == RULE_SETS * QUERIES_PER_SET
    assert 0.2 < refused / len(cases) < 0.8, "the rule sets must both allow and refuse"
    assert sum("+" in c.style for c in cases) > 1000  # stacked programs are covered
    assert all(c.model().allowed is not None for c in cases), "these programs are all modelled"
    assert not bad, f"{len(bad)} of {len(cases)} disagree; first:\n" + "\n".join(c.describe() for c in bad[:6])


def test_a_refusal_names_the_program_and_its_deciding_instructions(cases: list[Case]) -> None:
    refused = next(c for c in cases if not c.kernel_allowed and c.style == "systemd")
    decision = refused.model()
    assert decision.program is not None and decision.program["name"] == "sd_devices"
    assert len(decision.program["tag"]) == 16 and decision.program["id"] > 0
    assert decision.deciding and decision.deciding[-1].endswith("exit")
    assert "sd_devices" in decision.detail


def _jne_as_jeq(op: int, dst: int, src: int, bits: int) -> bool:
    return ORIGINAL_JUMP(0x10 if op == 0x50 else op, dst, src, bits)


def _and_ignored(op: int, dst: int, src: int, bits: int, insn: Any) -> int:
    return dst if op == 0x50 else ORIGINAL_ALU(op, dst, src, bits, insn)


def _ctx_major_minor_swapped(kind: str, major: int, minor: int, access: int) -> bytes:
    return ORIGINAL_CTX(kind, minor, major, access)


def _ctx_without_access(kind: str, major: int, minor: int, access: int) -> bytes:
    return ORIGINAL_CTX(kind, major, minor, 0)


def _ctx_type_swapped(kind: str, major: int, minor: int, access: int) -> bytes:
    return ORIGINAL_CTX("c" if kind == "b" else "b", major, minor, access)


ORIGINAL_JUMP, ORIGINAL_ALU, ORIGINAL_CTX = (device_program._jump_taken, device_program._alu,
                                             device_program.dev_ctx)
BROKEN = {"jne_as_jeq": ("_jump_taken", _jne_as_jeq), "and_ignored": ("_alu", _and_ignored),
          "major_minor_swapped": ("dev_ctx", _ctx_major_minor_swapped),
          "access_dropped": ("dev_ctx", _ctx_without_access),
          "block_char_swapped": ("dev_ctx", _ctx_type_swapped)}


@pytest.mark.parametrize("variant", sorted(BROKEN) + ["first_program_only"])
def test_broken_interpreters_fail(cases: list[Case], variant: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    if variant == "first_program_only":  # ignores inherited programs
        fresh = [Case(c.style, c.rules, V2DevicePrograms(c.policy.programs[-1:]), c.kind, c.major,
                      c.minor, c.access, c.kernel_errno) for c in cases]
    else:
        name, broken = BROKEN[variant]
        monkeypatch.setattr(device_program, name, broken)
        fresh = [Case(c.style, c.rules, V2DevicePrograms(c.policy.programs), c.kind, c.major,
                      c.minor, c.access, c.kernel_errno) for c in cases]
    assert _disagreements(fresh), f"the broken interpreter {variant} still agrees"


def test_helpers_maps_and_loops_are_undecided() -> None:
    call = device_program.encode([device_program.Insn(0x85, 0, 0, 0, 14),
                                  device_program.Insn(0xB7, 0, 0, 0, 1), device_program.Insn(0x95, 0, 0, 0, 0)])
    loop = device_program.encode([device_program.Insn(0xB7, 0, 0, 0, 1),
                                  device_program.Insn(0x05, 0, 0, -1, 0), device_program.Insn(0x95, 0, 0, 0, 0)])
    stack = device_program.encode([device_program.Insn(0x7A, 10, 0, -8, 1),
                                   device_program.Insn(0xB7, 0, 0, 0, 1), device_program.Insn(0x95, 0, 0, 0, 0)])
    from tracer.device_programs import DeviceProgram
    for raw, why in ((call, "helper"), (loop, "loop"), (stack, "stack")):
        decision = V2DevicePrograms((DeviceProgram(7, "x", "00" * 8, raw),)).may("c", 195, 0, "rw")
        assert decision.allowed is None and why in decision.detail, decision


def test_snapshot_outlives_the_cgroup(nodes: Any) -> None:
    """What the container tracker keeps at container start still decides after the
    cgroup (and its program) is gone, by id or by path."""
    from tests.support.v2_device_cgroup import deny_major, v2_device_cgroup
    from tracer.enrichment.device_cgroup_v2 import snapshot_device_programs

    with v2_device_cgroup(deny_major(195, "crun")) as cgroup:
        by_id = snapshot_device_programs(UNIFIED, cgroup_id=os.stat(cgroup).st_ino)
        by_path = snapshot_device_programs(UNIFIED, path="/" + os.path.basename(cgroup))
        gone_id = os.stat(cgroup).st_ino
    assert by_id is not None and by_path is not None
    assert by_id.programs == by_path.programs and len(by_id.programs) == 1
    assert by_id.programs[0].name == "crun_devices"
    assert by_id.may("c", 195, 0, "rw").allowed is False
    assert by_id.may("c", 1, 3, "rw").allowed is True
    assert snapshot_device_programs(UNIFIED, cgroup_id=gone_id) is None
