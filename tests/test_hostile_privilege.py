"""Least privilege: gputrace runs as root and reads what untrusted processes
control.  No shell ever sees event data, and a container's files are read
inside the container's root: a hostile image cannot point /etc/group at a host
file (absolute symlink, `..` climb) and have root read it for them."""

from __future__ import annotations

import ast
import os
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest

from tracer.enrichment import process as process_mod
from tracer.facts import Facts
from tracer.in_root import resolve_in_root
from tracer.host import HostPaths

TRACER = Path(__file__).resolve().parent.parent / "tracer"
SHELL_CALLS = {("os", "system"), ("os", "popen"), ("os", "execl"), ("os", "execlp"),
               ("os", "execle"), ("os", "execv"), ("os", "execvp"), ("os", "spawnl"),
               ("os", "posix_spawn"), ("subprocess", "getoutput"),
               ("subprocess", "getstatusoutput")}
SUBPROCESS_RUNNERS = {"run", "Popen", "call", "check_call", "check_output"}


def calls_in(path: Path) -> Iterator[tuple[ast.Call, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name):
            yield node, f"{node.func.value.id}.{node.func.attr}"


def shell_problems(path: Path) -> list[str]:
    problems = []
    for call, name in calls_in(path):
        where = f"{path.name}:{call.lineno} {name}"
        module, attr = name.split(".", 1)
        if (module, attr) in SHELL_CALLS:
            problems.append(f"{where}: runs a shell or replaces the process")
        if module == "subprocess" and attr in SUBPROCESS_RUNNERS:
            for kw in call.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant)
                                              and kw.value.value is False):
                    problems.append(f"{where}: shell=")
            first = call.args[0] if call.args else None
            if first is not None and not isinstance(first, (ast.List, ast.Tuple, ast.Name)):
                problems.append(f"{where}: command is not an argument list")
            if isinstance(first, ast.Name) and not _bound_to_list(path, first.id):
                problems.append(f"{where}: command {first.id} is not built as a list")
    return problems


def _bound_to_list(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    values = [n.value for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign))
              and any(isinstance(t, ast.Name) and t.id == name
                      for t in (n.targets if isinstance(n, ast.Assign) else [n.target]))]
    args = [a for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
            for a in n.args.args if a.arg == name]
    return all(_is_list_expr(v) for v in values) and \
        all(a.annotation is not None and "list" in ast.unparse(a.annotation) for a in args) and \
        bool(values or args)


def _is_list_expr(value: ast.expr) -> bool:
    if isinstance(value, ast.IfExp):
        return _is_list_expr(value.body) and _is_list_expr(value.orelse)
    return isinstance(value, (ast.List, ast.Tuple, ast.ListComp))


def test_no_shell_anywhere_in_tracer() -> None:
    files = sorted(TRACER.rglob("*.py"))
    assert len(files) > 30
    problems = [p for f in files for p in shell_problems(f)]
    assert problems == []


def test_shell_check_catches_shell_use(tmp_path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os, subprocess\n"
                   "def f(path):\n"
                   "    os.system('ls ' + path)\n"
                   "    subprocess.run('ls ' + path, shell=True)\n"
                   "    subprocess.run(f'cat {path}')\n")
    found = shell_problems(bad)
    assert len(found) == 4, found  # system, shell=, string command twice


# ----------------------------------------------------------- container root

SECRET = "gtleak:x:4242:gtvictim\n"


@pytest.fixture
def hostile_container(tmp_path) -> Iterator[tuple[int, Path, str]]:
    """A real process chrooted into a rootfs whose /etc/group leads to a host file,
    by an absolute symlink, a `..` climb, and a symlinked /etc directory."""
    host_secret = tmp_path / "gttest-host-secret"
    host_secret.write_text(SECRET)
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    climb = "../" * 12 + str(host_secret).lstrip("/")
    pid = os.fork()
    if pid == 0:  # the "container": chroot and wait
        try:
            os.chroot(str(root))
            os.chdir("/")
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        while os.readlink(f"/proc/{pid}/root") != str(root):
            time.sleep(0.01)
        yield pid, root, climb
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def container_group_fact(pid: int) -> object:
    facts = Facts()
    process_mod.container_root_facts(HostPaths(), pid, facts)
    return facts.get("container.etc_group")


def plant(root: Path, how: str, host_secret: str, climb: str) -> None:
    group = root / "etc" / "group"
    if how == "absolute":
        group.symlink_to(host_secret)
    elif how == "climb":
        group.symlink_to(climb)
    elif how == "etc_dir":
        os.rmdir(root / "etc")
        (root / "etc").symlink_to(os.path.dirname(host_secret))
        os.symlink(os.path.basename(host_secret), os.path.join(os.path.dirname(host_secret), "group"))


@pytest.mark.kernel
@pytest.mark.parametrize("how", ["absolute", "climb", "etc_dir"])
def test_container_etc_group_never_reads_a_host_file(hostile_container, how) -> None:
    pid, root, climb = hostile_container
    host_secret = str(root.parent / "gttest-host-secret")
    plant(root, how, host_secret, climb)
    # what a naive reader gets: the kernel follows the symlink from the host's root
    assert open(f"/proc/{pid}/root/etc/group", encoding="utf-8").read() == SECRET
    assert resolve_in_root(f"/proc/{pid}/root", "/etc/group") is None
    assert container_group_fact(pid) is None


@pytest.mark.kernel
def test_host_file_check_fails_without_resolve_in_root(hostile_container, monkeypatch) -> None:
    """With the in-root resolution replaced by a plain join, the leak shows."""
    pid, root, climb = hostile_container
    plant(root, "absolute", str(root.parent / "gttest-host-secret"), climb)
    monkeypatch.setattr(process_mod, "read_in_root",
                        lambda r, p: open(os.path.join(r, p.lstrip("/")), encoding="utf-8").read())
    assert container_group_fact(pid) == {"gtleak": 4242}


@pytest.mark.kernel
def test_a_symlink_inside_the_container_still_works(hostile_container) -> None:
    pid, root, _ = hostile_container
    (root / "etc" / "group.real").write_text("video:x:44:alice\n")
    (root / "etc" / "group").symlink_to("/etc/group.real")  # absolute, inside the container
    assert container_group_fact(pid) == {"video": 44}
    assert resolve_in_root(f"/proc/{pid}/root", "/etc/../etc/group") == \
        f"/proc/{pid}/root/etc/group.real"


def test_container_file_swapped_for_a_symlink_mid_read_never_leaks(tmp_path) -> None:
    """A container that keeps swapping its /etc/group between a plain file and a
    symlink to a host secret cannot make root read the secret: the kernel
    resolves the path inside the container root (openat2 RESOLVE_IN_ROOT)."""
    import threading

    from tracer.in_root import read_in_root

    secret = tmp_path / "host-secret"
    secret.write_text("SECRET:x:0:\n")
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    plain = root / "etc" / "group.plain"
    plain.write_text("video:x:44:\n")
    link = root / "etc" / "group.link"
    link.symlink_to(secret)  # absolute: on the host it names the secret
    target = root / "etc" / "group"
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            for source in (plain, link):
                tmp = root / "etc" / "group.tmp"
                if source == link:
                    if tmp.exists() or tmp.is_symlink():
                        tmp.unlink()
                    tmp.symlink_to(secret)
                else:
                    tmp.write_text("video:x:44:\n")
                os.replace(tmp, target)

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    seen = set()
    try:
        for _ in range(3000):
            text = read_in_root(str(root), "/etc/group")
            seen.add(text)
    finally:
        stop.set()
        swapper.join(5)
    assert not any(t and "SECRET" in t for t in seen), seen
    assert "video:x:44:\n" in seen  # the container's own file is still read
