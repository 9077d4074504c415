"""Human-readable lines for `gputrace watch`."""

from __future__ import annotations

import datetime as _dt
import json
from typing import IO, Any

from tracer.event import Event
from tracer.sinks.terminal_text import escape


def _clock(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3]


def denial_line(event: Event) -> str:
    p, n = event.process, event.node
    target = escape(n.path) if n.path else (f"dev {n.major}:{n.minor}" if n.major is not None else "?")
    if n.path and n.major is not None:
        target += f" ({n.major}:{n.minor})"
    extra = ""
    if event.syscall == "ioctl" and event.ioctl_cmd is not None:
        extra = f" cmd=0x{event.ioctl_cmd:08x}"
    return (f"{_clock(event.time)} pid={p.pid} comm={escape(p.comm)} uid={'?' if p.uid is None else p.uid} "
            f"{event.syscall} {target} {event.errno_name}{extra}")


def update_line(event: Event) -> str:
    p, n = event.process, event.node
    return (f"{_clock(event.time)}   ... pid={p.pid} {escape(n.path) if n.path else '?'} "
            f"{event.errno_name} x{event.count} so far")


def node_line(event: Event) -> str:
    f, n = event.facts, event.node
    dev = f" ({n.major}:{n.minor})" if n.major is not None else ""
    perms = (f" mode {f.get('node.mode')} uid {f.get('node.uid')} gid {f.get('node.gid')}"
             if "node.mode" in f else "")
    return (f"{_clock(event.time)} node {escape(str(f.get('node.change', '?')))} "
            f"{escape(n.path)}{dev}{perms} [{event.sensor}]")


def verdict_lines(verdict: dict[str, Any]) -> list[str]:
    lines = [f"  why: [{escape(str(verdict.get('reason', 'unknown')))}] "
             f"{escape(str(verdict.get('summary', '')))}"]
    for fix in (verdict.get("fixes") or [])[:3]:
        command = str(fix.get("command") or fix.get("summary", "")).split("\n")
        lines.append(f"  fix ({escape(str(fix.get('applies_to', 'any')))}): {escape(command[0])}")
        lines.extend(f"       {escape(more)}" for more in command[1:])
        if fix.get("security_note"):
            lines.append(f"       security: {escape(str(fix['security_note']))}")
    return lines


class ConsoleSink:
    """One line per denial (plus its verdict), one per count update."""

    def __init__(self, out: IO[str], as_json: bool = False) -> None:
        self.out = out
        self.as_json = as_json

    def consume(self, event: Event) -> None:
        if self.as_json:
            self.out.write(json.dumps(event.to_json(), sort_keys=False) + "\n")
        elif event.kind == "update":
            self.out.write(update_line(event) + "\n")
        elif event.kind == "node":
            self.out.write(node_line(event) + "\n")
        else:
            self.out.write(denial_line(event) + "\n")
            if event.verdict:
                self.out.write("\n".join(verdict_lines(event.verdict)) + "\n")
        self.out.flush()
