"""Differential test: the access model against the running kernel.

Random (seeded) device nodes -- mode, owner, group, POSIX ACL -- are opened by
actor processes with random identities: plain host users, root with lowered
capabilities, and processes in user namespaces with non-identity maps that do or
do not map the node's ids.  Every open's errno (ENXIO = allowed: no driver
behind majors 195/226; EACCES/EPERM = refused) must match the model exactly.
Set GPUTRACE_ACCESS_SEED to replay another seed.
"""

from __future__ import annotations

import base64
import errno
import grp
import os
import pwd
import random
import stat
from dataclasses import dataclass, replace
from typing import Any, Iterator, Optional

import pytest

from tests.support import actor
from tests.support.nodes import (
    NodeSpec, device_cgroup, make_node, node_dir, nodev_mount, read_acl, throwaway_group, throwaway_user,
)
from tests.support.nodes import gttest_node_dir, make_device_cgroup, make_device_node  # noqa: F401 (fixtures)
from tracer.enrichment.device_rules import V1DeviceList, parse_rule
from tracer.verdict.groups import SupplementaryGroups
from tracer.verdict.access_model import (
    CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, MAY_READ, MAY_WRITE, AccessDecision, Credentials,
    IdMap, NodeFacts, PosixAcl, UserNamespace, decide_open,
)

pytestmark = pytest.mark.kernel

SEED = int(os.environ.get("GPUTRACE_ACCESS_SEED", "6181"))
UIDS = (0, 41001, 41002, 41003, 41004)
GIDS = (0, 42001, 42002, 42003, 42004)
ACCESS = (("O_RDONLY", MAY_READ), ("O_WRONLY", MAY_WRITE), ("O_RDWR", MAY_READ | MAY_WRITE))
ROOT_CAP_CHOICES = (0, 1 << CAP_DAC_OVERRIDE, 1 << CAP_DAC_READ_SEARCH,
                    (1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH), (1 << 64) - 1)
RANGE_BASE = 100000  # a large block every random map adds after its single ids
OVERFLOW_ID = 65534


@dataclass(frozen=True)
class Identity:
    label: str
    plan: dict[str, Any]
    kuid: int            # what the kernel should hold as fsuid/fsgid/groups
    kgid: int
    kgroups: tuple[int, ...]


@dataclass(frozen=True)
class Case:
    identity: Identity
    path: str
    facts: NodeFacts
    flags: str
    kernel_errno: int
    decision: AccessDecision
    creds: Credentials

    @property
    def agrees(self) -> bool:
        if self.kernel_errno == errno.ENXIO:
            return self.decision.allowed
        return not self.decision.allowed and self.kernel_errno == self.decision.errno

    def describe(self) -> str:
        kernel = errno.errorcode.get(self.kernel_errno, str(self.kernel_errno))
        return (f"seed={SEED} {self.identity.label} open({self.path}, {self.flags}): "
                f"kernel {kernel}, model {self.decision}\n  node {self.facts}\n  creds {self.creds}\n"
                f"  plan {self.identity.plan}")


def random_perm(rng: random.Random) -> int:
    return rng.choice((0, 4, 6, 2, 6, 4, 7, 0))


def random_node_spec(rng: random.Random) -> NodeSpec:
    mode = random_perm(rng) << 6 | random_perm(rng) << 3 | random_perm(rng)
    acl = None
    if rng.random() < 0.5:
        users = tuple((u, random_perm(rng)) for u in rng.sample(UIDS, rng.randint(0, 2)))
        groups = tuple((g, random_perm(rng)) for g in rng.sample(GIDS, rng.randint(0, 2)))
        mask = rng.choice((None, None, 0, 4, 6, 2, 7))
        acl = PosixAcl(users=users, groups=groups, group_obj=random_perm(rng), mask=mask)
    return NodeSpec(major=rng.choice((195, 226)), minor=rng.randint(0, 255), mode=mode,
                    uid=rng.choice(UIDS), gid=rng.choice(GIDS), acl=acl)


def random_map(rng: random.Random, pool: tuple[int, ...]) -> tuple[str, list[int]]:
    """A non-identity map: inside 0.. -> a shuffled subset of ``pool``, then a block."""
    outside = [i for i in pool if rng.random() < 0.6] or [rng.choice(pool)]
    rng.shuffle(outside)
    lines = [f"{inside} {kid} 1" for inside, kid in enumerate(outside)]
    lines.append(f"{len(outside)} {RANGE_BASE} 1000")
    return "\n".join(lines), outside


def random_identity(rng: random.Random, index: int) -> Identity:
    host_groups = tuple(rng.sample(GIDS, rng.randint(0, 3)))
    if rng.random() < 0.45:
        uid, gid = rng.choice(UIDS), rng.choice(GIDS)
        plan: dict[str, Any] = {"uid": uid, "gid": gid, "groups": list(host_groups)}
        if uid == 0:
            plan["cap_effective"] = rng.choice(ROOT_CAP_CHOICES)
        return Identity(f"host#{index}", plan, uid, gid, host_groups)
    host_uid, host_gid = rng.choice(UIDS[1:]), rng.choice(GIDS[1:])
    uid_map, uid_outside = random_map(rng, UIDS)
    gid_map, gid_outside = random_map(rng, GIDS)
    setgroups = rng.choice(("allow", "deny"))
    plan = {"uid": host_uid, "gid": host_gid, "groups": list(host_groups),
            "userns": {"uid_map": uid_map, "gid_map": gid_map, "setgroups": setgroups}}
    kuid, kgid, kgroups = host_uid, host_gid, host_groups
    inner: dict[str, Any] = {}
    if rng.random() < 0.8:  # else keep the host ids, unmapped or not
        inner_uid = 0 if rng.random() < 0.6 else rng.randrange(len(uid_outside))
        inner_gid = rng.randrange(len(gid_outside))
        inner = {"uid": inner_uid, "gid": inner_gid}
        kuid, kgid = uid_outside[inner_uid], gid_outside[inner_gid]
        if setgroups == "allow" and rng.random() < 0.7:
            chosen = rng.sample(range(len(gid_outside)), rng.randint(0, len(gid_outside)))
            inner["groups"] = chosen
            kgroups = tuple(gid_outside[g] for g in chosen)
    plan["inner"] = inner
    return Identity(f"userns#{index}", plan, kuid, kgid, kgroups)


def own_device_cgroup() -> V1DeviceList:
    """The v1 devices.list of this test's cgroup, which the children share (an unknown
    device cgroup would leave every decision unknown, never allowed)."""
    with open("/proc/self/cgroup", encoding="ascii") as handle:
        where = next(line.split(":", 2)[2].strip() for line in handle
                     if "devices" in line.split(":", 2)[1].split(","))
    with open(f"/sys/fs/cgroup/devices{where}/devices.list", encoding="ascii") as handle:
        return V1DeviceList.from_devices_list(handle.read())


def node_facts(path: str, **extra: Any) -> NodeFacts:
    """Facts as the kernel now holds them (setting an ACL rewrites the group bits)."""
    st = os.stat(path)
    extra.setdefault("device_cgroup", own_device_cgroup())
    return NodeFacts(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, major=os.major(st.st_rdev),
                     minor=os.minor(st.st_rdev), acl=read_acl(path), **extra)


def credentials(identity: Identity, truth: dict[str, Any]) -> Credentials:
    """The model's input, cross-checked against what the actor saw in /proc."""
    userns = UserNamespace()
    if identity.plan.get("userns"):
        userns = UserNamespace.single(truth["uid_map"], truth["gid_map"])
    uid_view = userns.levels[0].uid_map if userns.levels else None
    gid_view = userns.levels[0].gid_map if userns.levels else None

    def seen(kid: int, view: Optional[IdMap]) -> int:
        inside = kid if view is None else view.to_inside(kid)
        return OVERFLOW_ID if inside is None else inside

    status = truth["status"]
    assert int(status["Uid"].split()[3]) == seen(identity.kuid, uid_view), (identity, status)
    assert int(status["Gid"].split()[3]) == seen(identity.kgid, gid_view), (identity, status)
    assert sorted(int(g) for g in status["Groups"].split()) == sorted(
        seen(g, gid_view) for g in identity.kgroups), (identity, status)
    return Credentials(fsuid=identity.kuid, fsgid=identity.kgid,
                       groups=SupplementaryGroups.from_facts(list(identity.kgroups)),
                       cap_effective=int(status["CapEff"], 16), userns=userns)


def run_identity(identity: Identity, nodes: list[tuple[str, NodeFacts]],
                 extra_plan: Optional[dict[str, Any]] = None) -> Iterator[Case]:
    actions = [{"op": "open", "path": path, "flags": flags} for path, _ in nodes for flags, _ in ACCESS]
    result = actor.spawn({**identity.plan, **(extra_plan or {}), "actions": actions}).check()
    creds = credentials(identity, result.truth or {})
    outcomes = iter(result.results)
    for path, facts in nodes:
        for flags, mask in ACCESS:
            outcome = next(outcomes)
            yield Case(identity, path, facts, flags, outcome["errno"], decide_open(facts, creds, mask), creds)


def assert_all_agree(cases: list[Case], minimum: int, what: str) -> None:
    bad = [case for case in cases if not case.agrees]
    allowed = sum(case.kernel_errno == errno.ENXIO for case in cases)
    print(f"\n{what}: {len(cases)} cases (kernel allowed {allowed}, refused {len(cases) - allowed}), "
          f"{len(cases) - len(bad)} agree, seed {SEED}")
    assert len(cases) >= minimum
    assert not bad, f"{len(bad)} of {len(cases)} disagree; first:\n" + "\n".join(c.describe() for c in bad[:8])


@pytest.fixture(scope="module")
def random_nodes() -> Iterator[list[tuple[str, NodeFacts]]]:
    rng = random.Random(SEED)
    with node_dir("/dev") as directory:
        nodes = []
        for index in range(24):
            path = make_node(os.path.join(directory, f"n{index}"), random_node_spec(rng))
            nodes.append((path, node_facts(path)))
        yield nodes


def test_model_matches_kernel_on_random_nodes_and_identities(random_nodes: list[tuple[str, NodeFacts]]) -> None:
    rng = random.Random(SEED + 1)
    cases = [case for index in range(30) for case in run_identity(random_identity(rng, index), random_nodes)]
    assert sum(c.facts.acl is not None for c in cases) > 100
    assert {c.decision.check for c in cases} >= {
        "dac_owner", "dac_group", "dac_other", "dac_acl_user", "dac_acl_group", "dac_acl_mask",
        "cap_dac_override", "cap_dac_read_search"}
    assert_all_agree(cases, 500, "random nodes")


def test_model_matches_kernel_on_nodev_mount() -> None:
    rng = random.Random(SEED + 2)
    with nodev_mount("nodev") as where:
        nodes = []
        for index in range(4):
            path = make_node(os.path.join(where, f"n{index}"), replace(random_node_spec(rng), mode=0o666))
            nodes.append((path, node_facts(path, nodev_mount=True)))
        identities = [Identity("root", {}, 0, 0, ())] + [random_identity(rng, i) for i in range(3)]
        cases = [case for ident in identities for case in run_identity(ident, nodes)]
    assert all(c.kernel_errno == errno.EACCES and c.decision.check == "nodev_mount" for c in cases)
    assert_all_agree(cases, 40, "nodev mount")


def test_model_matches_kernel_with_device_cgroup_deny_rule(random_nodes: list[tuple[str, NodeFacts]]) -> None:
    rng = random.Random(SEED + 3)
    policy = V1DeviceList(default_allow=True, exceptions=(parse_rule("c 195:* rwm"),))
    nodes = [(path, replace(facts, device_cgroup=policy)) for path, facts in random_nodes]
    identities = [Identity("root", {}, 0, 0, ())] + [random_identity(rng, i) for i in range(5)]
    with device_cgroup([("devices.deny", "c 195:* rwm")]) as cgroup:
        join = {"cgroup_procs": [os.path.join(cgroup, "cgroup.procs")]}
        cases = [case for ident in identities for case in run_identity(ident, nodes, join)]
    assert any(c.kernel_errno == errno.EPERM for c in cases)
    assert any(c.kernel_errno == errno.ENXIO for c in cases)
    assert_all_agree(cases, 300, "device cgroup deny 195")


def test_model_matches_kernel_with_device_cgroup_allowlist(random_nodes: list[tuple[str, NodeFacts]]) -> None:
    rng = random.Random(SEED + 4)
    some_nvidia_minor = next(f.minor for _, f in random_nodes if f.major == 195)
    rules = [("devices.deny", "a"), ("devices.allow", "c 226:* r"),
             ("devices.allow", f"c 195:{some_nvidia_minor} rw")]
    identities = [Identity("root", {}, 0, 0, ())] + [random_identity(rng, i) for i in range(5)]
    with device_cgroup(rules) as cgroup:
        with open(os.path.join(cgroup, "devices.list")) as handle:
            policy = V1DeviceList.from_devices_list(handle.read())
        assert not policy.default_allow and len(policy.exceptions) == 2
        nodes = [(path, replace(facts, device_cgroup=policy)) for path, facts in random_nodes]
        join = {"cgroup_procs": [os.path.join(cgroup, "cgroup.procs")]}
        cases = [case for ident in identities for case in run_identity(ident, nodes, join)]
    assert any(c.kernel_errno == errno.EPERM for c in cases)
    assert any(c.kernel_errno == errno.ENXIO for c in cases)
    assert_all_agree(cases, 300, "device cgroup allowlist")


def test_nodes_made_with_setfacl_read_back_like_xattr_nodes() -> None:
    with node_dir("/dev") as directory:
        by_xattr = make_node(os.path.join(directory, "x"), NodeSpec(
            195, 3, 0o640, 0, 42001, acl=PosixAcl(users=((41001, 6),), group_obj=4, mask=6)))
        by_setfacl = make_node(os.path.join(directory, "s"), NodeSpec(
            195, 3, 0o640, 0, 42001, setfacl=("u:41001:rw",)))
        assert read_acl(by_xattr) == read_acl(by_setfacl) == PosixAcl(((41001, 6),), (), 4, 6)
        assert stat.S_IMODE(os.stat(by_xattr).st_mode) == stat.S_IMODE(os.stat(by_setfacl).st_mode) == 0o660


# The helpers the differential test stands on: if they lied, agreement would mean nothing.

def test_actor_reports_its_truth_and_hostile_comm_bytes() -> None:
    comm = b"gt\xff\x1b[31m;rm"
    result = actor.spawn({"uid": 41001, "gid": 42001, "groups": [42002, 42003],
                          "comm_b64": base64.b64encode(comm).decode()}).check()
    truth = result.truth or {}
    assert result.comm == comm
    assert truth["status"]["Uid"].split() == ["41001"] * 4
    assert truth["status"]["Groups"].split() == ["42002", "42003"]
    assert truth["ns"]["user"] == os.stat("/proc/self/ns/user").st_ino
    inside = actor.spawn({"uid": 41001, "gid": 42001, "groups": [],
                          "userns": {"uid_map": "0 41001 1\n1 100000 10", "gid_map": "0 42001 1"},
                          "inner": {"uid": 0, "gid": 0}}).check().truth or {}
    assert inside["ns"]["user"] != truth["ns"]["user"]
    assert IdMap.parse(inside["uid_map"]) == IdMap.parse("0 41001 1\n1 100000 10")
    assert inside["status"]["CapEff"] == inside["status"]["CapPrm"] != "0000000000000000"


def test_actor_counts_every_attempt_and_runs_each_op(make_device_node: Any) -> None:
    refused = make_device_node("refused", NodeSpec(195, 1, 0o600))
    allowed = make_device_node("allowed", NodeSpec(226, 128, 0o666))
    directory, name = os.path.split(allowed)
    result = actor.spawn({"uid": 41002, "gid": 42002, "groups": [], "chdir": directory, "actions": [
        {"op": "open_loop", "path": refused, "flags": "O_RDWR", "count": 1500},
        {"op": "open_loop", "path": allowed, "count": 700},
        {"op": "openat2", "path": name, "dirfd": directory, "flags": "O_RDWR",
         "resolve": "RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS"},
        {"op": "open", "path": name, "flags": os.O_WRONLY},
        {"op": "creat", "path": refused},
        {"op": "ioctl", "path": allowed, "cmd": 0x5401},
        {"op": "open", "path": "/nonexistent-gttest"},
    ]}).check()
    loop_refused, loop_allowed, *rest = result.results
    assert loop_refused["failures"] == {"EACCES": 1500} and loop_refused["succeeded"] == 0
    assert loop_allowed["failures"] == {"ENXIO": 700}
    assert [r["errname"] for r in rest] == ["ENXIO", "ENXIO", "EACCES", "ENXIO", "ENOENT"]
    assert rest[3]["stage"] == "open"


def test_held_actor_lives_until_released_and_failures_come_back() -> None:
    plan = {"uid": 41003, "gid": 42003, "groups": [], "hold": True, "await_go": True,
            "actions": [{"op": "open", "path": "/proc/self/status"}]}
    with actor.start(plan) as held:
        assert (held.truth() or {})["pid"] == held.pid and held.result.results == []
        held.go()
        assert held.wait().check().errnos() == [0]
        with open(f"/proc/{held.pid}/status") as handle:
            assert "41003" in next(line for line in handle if line.startswith("Uid:"))
    assert held.result.returncode == 0 and not os.path.exists(f"/proc/{held.pid}/status")
    broken = actor.spawn({"uid": 41003, "userns": {"uid_map": "not a map"}})
    assert broken.error and "map the user namespace" in broken.error
    assert "unknown action" in (actor.spawn({"actions": [{"op": "fly"}]}).error or "")
    with pytest.raises(actor.ActorError, match="did not answer"):
        actor.spawn({"actions": [{"op": "sleep", "seconds": 30}]}, timeout=1.0)


def test_actor_joins_a_device_cgroup(make_device_cgroup: Any) -> None:
    cgroup = make_device_cgroup([("devices.deny", "c 195:* rwm")])
    result = actor.spawn({"cgroup_procs": [os.path.join(cgroup, "cgroup.procs")]}).check()
    devices_line = next(line for line in (result.truth or {})["cgroup"].splitlines() if ":devices:" in line)
    assert devices_line.endswith("/" + os.path.basename(cgroup))


def test_throwaway_users_and_groups_come_and_go() -> None:
    with throwaway_group() as (group_name, gid):
        with throwaway_user(groups=[group_name]) as person:
            assert person.name.startswith("gt") and gid in os.getgrouplist(person.name, person.gid)
        with pytest.raises(KeyError):
            pwd.getpwnam(person.name)
    with pytest.raises(KeyError):
        grp.getgrnam(group_name)
