"""The workspace a denial scenario builds in (see tests/support/scenarios.py).

A `Scenario` gives its host objects unique names, journals each one in its work
directory, and registers its removal; leaving the scenario removes them in reverse
order, reporting every step that failed without stopping the others.  After a test
process was killed, `sweep_stale_scenarios()` replays the journals of scenarios whose
owner is gone.  Needs root.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import grp
import os
import pwd
import random
import secrets
import shutil
import stat
import subprocess
import time
from typing import Callable, Sequence

from tests.support import podman as podman_support
from tests.support.probe import (OWNER_FILE, Attempt, Node, ProbeHolder, probe_binary,
                                 process_identity, read_report)

NVIDIA_MAJOR = 195
DRM_MAJOR = 226
NVIDIA_TEST_MINORS = range(16, 250)     # 254/255 are nvidia-modeset/nvidiactl
RENDER_TEST_MINORS = range(129, 192)    # renderD128 is the usual first GPU
RENDER_NODE_DIR = "/dev/dri-gttest"
ROOTFUL_GLOBAL_OPTIONS = ("--cgroup-manager=cgroupfs",)  # no systemd as PID 1 here
# This VM's hard limits are lower than podman's defaults, which runc then fails to set.
ROOTFUL_RUN_OPTIONS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096")
HOLD_S = 3.0
CGROUP_ROOT = "/sys/fs/cgroup"
SCENARIO_ROOT = "/tmp"          # work directories: SCENARIO_ROOT/gttest-NAME-TOKEN
JOURNAL_FILE = "created"        # "kind<TAB>value" per host object, in creation order


class ScenarioError(RuntimeError):
    """A scenario could not be built or cleaned up; the message says which step."""


class Scenario:
    """One scenario's workspace: a unique token for names, a work directory, and a
    stack of undo steps run in reverse order when the scenario ends."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.token = secrets.token_hex(3)
        self.started = time.monotonic()
        self.stack = contextlib.ExitStack()
        self.cleanup_errors: list[str] = []
        self.workdir = ""

    def __enter__(self) -> "Scenario":
        self.workdir = os.path.join(SCENARIO_ROOT, f"gttest-{self.name}-{self.token}")
        os.mkdir(self.workdir, 0o755)
        os.chmod(self.workdir, 0o755)  # users of the scenario must reach gtprobe and rootfs
        with open(os.path.join(self.workdir, OWNER_FILE), "w", encoding="ascii") as owner:
            owner.write(process_identity(os.getpid()))
        self.created("tree", self.workdir)
        return self

    def __exit__(self, exc_type: object, exc: "BaseException | None", tb: object) -> None:
        self.stack.close()
        if not self.cleanup_errors:
            return
        message = f"{self.name}: cleanup failed: {'; '.join(self.cleanup_errors)}"
        if exc is None:
            raise ScenarioError(message)
        if hasattr(exc, "add_note"):  # Python 3.11+: keep the leak visible beside the failure
            exc.add_note(message)

    def undo(self, what: str, step: Callable[..., object], *args: object) -> None:
        """Register a cleanup step; a failing step is recorded and the others still run."""
        def guarded() -> None:
            try:
                step(*args)
            except Exception as exc:  # noqa: BLE001 - every leak must be reported, none may stop the rest
                self.cleanup_errors.append(f"{what}: {exc}")
        self.stack.callback(guarded)

    def created(self, kind: str, value: str) -> None:
        """Note a host object in the journal (for `sweep_stale_scenarios` after a crash)
        and register its removal."""
        with open(os.path.join(self.workdir, JOURNAL_FILE), "a", encoding="utf-8") as journal:
            journal.write(f"{kind}\t{value}\n")
        self.undo(f"remove {kind} {value}", REMOVERS[kind], value)

    # --- host objects -------------------------------------------------------------

    def group(self, role: str, gid: "int | None" = None) -> grp.struct_group:
        name = f"gt{role}{self.token}"
        run_command(["groupadd", *(["--gid", str(gid)] if gid is not None else []), name])
        self.created("group", name)
        return grp.getgrnam(name)

    def user(self, role: str, groups: Sequence[str] = (), home: bool = False) -> pwd.struct_passwd:
        """A throwaway user; useradd also gives it /etc/subuid and /etc/subgid ranges
        (SUB_UID_COUNT in login.defs), which userdel takes back."""
        name = f"gt{role}{self.token}"
        argv = ["useradd", "--shell", "/usr/sbin/nologin",
                "--create-home" if home else "--no-create-home"]
        if groups:
            argv += ["--groups", ",".join(groups)]
        run_command(argv + [name])
        self.created("user", name)
        return pwd.getpwnam(name)

    def node(self, major: int, minors: range, name: str, mode: int, gid: int,
             directory: str = "/dev") -> Node:
        """mknod a character node with a minor no other run holds (mknod is the claim)."""
        for minor in random.sample(minors, len(minors)):
            path = os.path.join(directory, name.format(minor=minor))
            try:
                os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(major, minor))
            except FileExistsError:
                continue
            self.created("node", path)
            os.chown(path, 0, gid)
            os.chmod(path, mode)
            return Node(path, major, minor, mode, gid)
        raise ScenarioError(f"no free minor for {name} in {directory}")

    def nvidia_node(self, mode: int = 0o660, gid: int = 0, directory: str = "/dev") -> Node:
        return self.node(NVIDIA_MAJOR, NVIDIA_TEST_MINORS, "nvidia-gttest{minor}", mode, gid, directory)

    def render_node(self, mode: int = 0o660, gid: int = 0) -> Node:
        # Shared by concurrent runs: each removes it once empty; a run that finds it
        # gone between makedirs and mknod (another run's rmdir) simply makes it again.
        self.created("dir", RENDER_NODE_DIR)
        for _ in range(3):
            os.makedirs(RENDER_NODE_DIR, 0o755, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                return self.node(DRM_MAJOR, RENDER_TEST_MINORS, "renderD{minor}", mode, gid,
                                 RENDER_NODE_DIR)
        raise ScenarioError(f"{RENDER_NODE_DIR} keeps vanishing")

    def mount(self, source: str, target: str, fstype: str, options: str) -> None:
        os.makedirs(target, exist_ok=True)
        run_command(["mount", "-t", fstype, "-o", options, source, target])
        self.created("mount", target)

    # --- the attempt --------------------------------------------------------------

    def run_on_host(self, node: Node, user: "pwd.struct_passwd | None" = None,
                    hold_s: float = HOLD_S, cgroup_procs: "str | None" = None) -> Attempt:
        """Run gtprobe directly on the host (as `user` with exactly its /etc/group
        memberships, or as root), optionally moved into a cgroup before it opens."""
        argv = [probe_binary(), node.path, f"{hold_s:g}", self.token]
        if cgroup_procs is not None:
            argv = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', cgroup_procs, *argv]
        credentials: dict[str, object] = {}
        if user is not None:
            credentials = {"user": user.pw_uid, "group": user.pw_gid,
                           "extra_groups": os.getgrouplist(user.pw_name, user.pw_gid)}
        holder = self._holder(argv, os.environ.copy(), **credentials)
        report = read_report(holder, self.token)
        return self._hold(Attempt(
            scenario=self.name, token=self.token, node=node, opened_path=node.path,
            report=report, host_pid=holder.process.pid, holder=holder,  # sh execs gtprobe
            setup_s=self.elapsed(), user=user.pw_name if user else "root"))

    def run_in_container(self, podman: podman_support.Podman, node: Node, rootfs: str,
                         container_path: str, run_options: Sequence[str], hold_s: float,
                         user: str) -> Attempt:
        name = f"gttest-{self.name}-{self.token}"
        cgroup_options: list[str] = []
        if podman.rootless:  # no cgroups on v1; its processes die with the user: see _delete_user
            self.undo(f"podman rm {name}", podman.remove, name)
        else:
            # A parent of our own (podman's default is a shared libpod_parent), so that
            # the container's and conmon's cgroups can be removed without races.
            self.created("cgroup", f"gttest-{self.token}")
            cgroup_options = [f"--cgroup-parent=/gttest-{self.token}"]
            self.created("rootful-container", name)
        run_args = ["--rm", "--name", name, "--network=none", *cgroup_options, *run_options,
                    "--rootfs", rootfs, "/gtprobe", container_path, f"{hold_s:g}", self.token]
        holder = self._holder(podman.argv("run", *run_args), podman.env())
        report = read_report(holder, self.token)
        try:
            host_pid, container_id = podman.container_identity(name)
        except podman_support.PodmanFailed as exc:
            raise ScenarioError(f"{self.name}: {exc}") from exc
        return self._hold(Attempt(
            scenario=self.name, token=self.token, node=node, opened_path=container_path,
            report=report, host_pid=host_pid, holder=holder, setup_s=self.elapsed(),
            user=user, container_id=container_id, container_name=name, engine=podman))

    def _holder(self, argv: list[str], env: dict[str, str], **credentials: object) -> ProbeHolder:
        holder = ProbeHolder.start(argv, env, os.path.join(self.workdir, "probe.stderr"),
                                   **credentials)
        self.undo("end the probe", holder.finish)
        return holder

    def _hold(self, attempt: Attempt) -> Attempt:
        self.undo("release the probe", attempt.release)
        if not attempt.alive():
            raise ScenarioError(f"{self.name}: pid {attempt.host_pid} is not the probe "
                                f"(token {self.token} not in its command line)")
        return attempt

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def run_command(argv: list[str], timeout: float = 30.0) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ScenarioError(f"{argv[0]} took over {timeout:.0f}s") from exc
    except FileNotFoundError as exc:
        raise ScenarioError(f"{argv[0]} is not installed") from exc
    if done.returncode != 0:
        raise ScenarioError(f"{' '.join(argv)}: {done.stderr.strip()[-300:]}")
    return done.stdout


def _delete_user(name: str) -> None:
    """Kill what the user still runs (rootless pause process, conmon, container), then
    remove it with its home, subordinate ids and podman's per-user runtime dirs."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return
    podman_support.kill_processes_of_uid(entry.pw_uid)
    run_command(["userdel", *(["--remove"] if os.path.isdir(entry.pw_dir) else []), name])
    for leftover in (f"/run/user/{entry.pw_uid}", f"/tmp/podman-run-{entry.pw_uid}",
                     f"/tmp/containers-user-{entry.pw_uid}", f"/tmp/storage-run-{entry.pw_uid}"):
        shutil.rmtree(leftover, ignore_errors=True)


def _delete_group(name: str) -> None:
    with contextlib.suppress(KeyError):
        grp.getgrnam(name)
        run_command(["groupdel", name])


def _rmdir_if_empty(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        try:
            os.rmdir(path)
        except OSError as exc:
            if exc.errno != errno_codes.ENOTEMPTY:  # another run still uses it
                raise


def _remove_cgroup(relative: str, patience_s: float = 3.0) -> None:
    """Remove the cgroup `relative` (and its children) from every hierarchy, killing
    what is left in it (only our probe or conmon goes there).  conmon may outlive
    `podman run` by a moment, hence the retries."""
    deadline = time.monotonic() + patience_s
    hierarchies = [CGROUP_ROOT] + [os.path.join(CGROUP_ROOT, h) for h in os.listdir(CGROUP_ROOT)]
    for hierarchy in hierarchies:       # the root itself is the hierarchy on a pure v2 host
        top = os.path.join(hierarchy, relative)
        if not os.path.isdir(top):
            continue
        for directory, _, _ in sorted(os.walk(top), key=lambda walked: -len(walked[0])):
            while True:
                with open(os.path.join(directory, "cgroup.procs"), encoding="ascii") as members:
                    for pid in members.read().split():
                        podman_support.kill_and_wait(int(pid))
                try:
                    os.rmdir(directory)
                    break
                except OSError as exc:
                    if exc.errno != errno_codes.EBUSY or time.monotonic() >= deadline:
                        raise
                    time.sleep(0.05)


def _unlink_if_present(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _unmount(path: str) -> None:
    if os.path.ismount(path):
        run_command(["umount", path])


def _remove_rootful_container(name: str) -> None:
    podman_support.Podman(global_options=ROOTFUL_GLOBAL_OPTIONS).remove(name)


# kind -> how to remove an object of that kind; each is a no-op once it is gone.
REMOVERS: dict[str, Callable[[str], None]] = {
    "tree": lambda path: shutil.rmtree(path, ignore_errors=True),
    "dir": _rmdir_if_empty,
    "node": _unlink_if_present,
    "file": _unlink_if_present,
    "mount": _unmount,
    "cgroup": _remove_cgroup,
    "group": _delete_group,
    "user": _delete_user,
    "rootful-container": _remove_rootful_container,
}


def _read_journal(workdir: str) -> list[tuple[str, str]]:
    try:
        with open(os.path.join(workdir, JOURNAL_FILE), encoding="utf-8") as journal:
            return [(kind, value) for kind, value in
                    (line.rstrip("\n").split("\t", 1) for line in journal) if kind in REMOVERS]
    except OSError:
        return []


def sweep_stale_scenarios(root: str = SCENARIO_ROOT) -> list[str]:
    """Undo the scenarios (and remove the gtprobe builds) whose test process died
    without cleaning up (SIGKILL, CI timeout), replaying their journals; those of
    live processes are left alone.  Returns the directories swept."""
    swept = []
    for entry in sorted(os.listdir(root)):
        workdir = os.path.join(root, entry)
        owner_file = os.path.join(workdir, OWNER_FILE)
        if not entry.startswith("gttest-") or not os.path.isfile(owner_file):
            continue
        with open(owner_file, encoding="ascii") as owner:
            identity = owner.read().strip()
        try:
            if process_identity(int(identity.split()[0])) == identity:
                continue
        except (OSError, ValueError, IndexError):
            pass
        for kind, value in reversed(_read_journal(workdir)):
            with contextlib.suppress(Exception):  # best effort: the rest must still go
                REMOVERS[kind](value)
        shutil.rmtree(workdir, ignore_errors=True)
        swept.append(workdir)
    return swept
