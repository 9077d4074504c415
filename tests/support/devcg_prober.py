"""A long-lived root child that asks the kernel device-cgroup questions in batches.

The parent moves it between cgroups (`join`) and sends batches of operations; the
child answers one errno per operation, 0 for success.  Opens target nodes of
majors with no driver, so an allowed open gives ENXIO; a mknod creates then
removes a node.  One JSON object per line both ways.

    with Prober() as prober:
        prober.join("/sys/fs/cgroup/unified/gttest-x/cgroup.procs")
        prober.ask([["open", "/dev/gttest-y/n0", "O_RDWR"], ["mknod", "/dev/gttest-y/m", "c", 240, 3]])
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from typing import Any

FLAGS = {"O_RDONLY": os.O_RDONLY, "O_WRONLY": os.O_WRONLY, "O_RDWR": os.O_RDWR}


def _errno_of(op: list[Any]) -> int:
    try:
        if op[0] == "open":
            fd = os.open(op[1], FLAGS[op[2]] | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            os.close(fd)
        elif op[0] == "mknod":
            kind = stat.S_IFBLK if op[2] == "b" else stat.S_IFCHR
            os.mknod(op[1], kind | 0o600, os.makedev(op[3], op[4]))
            os.unlink(op[1])
        else:
            raise ValueError(f"unknown op {op[0]!r}")
    except OSError as exc:
        return exc.errno or -1
    return 0


def child_main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        if "join" in request:
            for path in request["join"]:
                with open(path, "w", encoding="ascii") as procs:
                    procs.write(str(os.getpid()))
            answer: Any = {"ok": True}
        else:
            answer = {"errnos": [_errno_of(op) for op in request["ops"]]}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


class Prober:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from tests.support.devcg_prober import child_main; child_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

    def _send(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the prober died")
        answer: dict[str, Any] = json.loads(line)
        return answer

    @property
    def pid(self) -> int:
        return self.process.pid

    def join(self, *procs_files: str) -> None:
        self._send({"join": list(procs_files)})

    def ask(self, ops: list[list[Any]]) -> list[int]:
        errnos: list[int] = self._send({"ops": ops})["errnos"]
        return errnos

    def __enter__(self) -> "Prober":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
