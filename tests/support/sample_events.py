"""Events as the daemon journals them, built in code for sink and report tests."""

from __future__ import annotations

from typing import Any, Optional

from tracer.event import Event, Node, Process
from tracer.facts import Facts


def fact(value: Any, source: str = "live", origin: str = "") -> dict[str, Any]:
    return {"value": value, "source": source, "origin": origin}


def verdict(reason: str, command: str = "sudo usermod -aG video alice") -> dict[str, Any]:
    return {"reason": reason, "summary": f"{reason} happened to alice on buildhost.",
            "confidence": "high", "check": None, "model_detail": "", "evidence": [],
            "fixes": [{"summary": "add the user to the node's group", "command": command,
                       "applies_to": "host", "rank": 1}], "notes": []}


def denial(pid: int, path: str = "/dev/nvidia0", count: int = 1, at: float = 1_800_000_000.0,
           kind: str = "denial", reason: Optional[str] = "not_in_group", engine: Optional[str] = None,
           uid: int = 1000, errno: int = 13, minor: int = 0, comm: bytes = b"python3",
           user: Optional[str] = "alice", **extra_facts: Any) -> Event:
    facts: dict[str, Any] = {"node.class": fact("nvidia-gpu")}
    if engine:
        facts["container.engine"] = fact(engine)
        facts["container.id"] = fact("0123456789abcdef0123")
        facts["container.name"] = fact("trainer")
    if user:
        facts["host.user_name"] = fact(user)
    facts.update({k.replace("__", "."): fact(v) for k, v in extra_facts.items()})
    return Event(time=at, sensor="bpf", syscall="openat", errno=errno,
                 process=Process(pid=pid, tid=pid, comm=comm, uid=uid, gid=uid, groups=[uid]),
                 node=Node(path=path.encode(), major=195, minor=minor), kind=kind, count=count,
                 key=f"{pid}:openat:{errno}:{path}",
                 facts=Facts.from_json(facts if kind == "denial" else {}),
                 verdict=verdict(reason) if reason and kind == "denial" else None)


def update(first: Event, count: int, at: float) -> Event:
    return Event(time=at, sensor=first.sensor, syscall=first.syscall, errno=first.errno,
                 process=first.process, node=first.node, kind="update", count=count,
                 key=first.key)
