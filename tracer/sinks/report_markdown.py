"""Markdown for a report (reads well pasted into GitHub/GitLab issues) and redaction.

`redact()` replaces user names, the host name and home directories everywhere
in a report with tokens derived from the value (same input, same token), so
two reports of one host still line up after redaction.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from typing import Any, Callable

RULE = "\n"


def token(kind: str, value: str) -> str:
    return f"{kind}-{hashlib.sha256(f'{kind}:{value}'.encode()).hexdigest()[:8]}"


def _replacers(report: dict[str, Any]) -> list[tuple[re.Pattern[str], str]]:
    host = report.get("host") or {}
    users = host.get("users") or []
    names = {u["name"] for u in users if u.get("name") and u.get("uid", 0) != 0}
    for cause in report.get("causes") or []:
        names |= {p["user"] for p in cause.get("processes") or [] if p.get("user")
                  and p.get("uid") != 0}
    for node in host.get("gpu_nodes") or []:
        for entry in node.get("acl") or []:
            if entry.get("tag") == "user" and entry.get("name") and entry.get("id") != 0:
                names.add(entry["name"])
    homes = {u["home"]: u["name"] for u in users
             if u.get("home", "/") not in ("/", "") and u.get("name") in names}
    out: list[tuple[re.Pattern[str], str]] = []
    for home in sorted(homes, key=len, reverse=True):
        out.append((re.compile(re.escape(home) + r"(?=/|\b|$)"), f"/home/{token('user', homes[home])}"))
    for name in sorted(names, key=len, reverse=True):
        out.append((re.compile(rf"(?<![\w.-]){re.escape(name)}(?![\w-])"), token("user", name)))
    if host.get("hostname"):
        out.append((re.compile(rf"(?<![\w.-]){re.escape(host['hostname'])}(?![\w-])"),
                    token("host", host["hostname"])))
    return out


def _walk(value: Any, fix: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fix(value)
    if isinstance(value, list):
        return [_walk(v, fix) for v in value]
    if isinstance(value, dict):
        return {fix(k) if isinstance(k, str) else k: _walk(v, fix) for k, v in value.items()}
    return value


def redact(report: dict[str, Any]) -> dict[str, Any]:
    replacers = _replacers(report)

    def fix(text: str) -> str:
        for pattern, replacement in replacers:
            text = pattern.sub(replacement, text)
        return text

    out: dict[str, Any] = _walk(copy.deepcopy(report), fix)
    out["redacted"] = True
    return out


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ") or "–"


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _cause_lines(number: int, cause: dict[str, Any]) -> list[str]:
    lines = [f"### {number}. `{cause['reason']}`: {plural(cause['count'], 'denial')} "
             f"({plural(cause['events'], 'aggregated event')})", "",
             cause["summary"], "",
             f"- First seen: {cause['first_seen']}, last seen: {cause['last_seen']}"]
    if cause.get("confidence"):
        lines.append(f"- Confidence: {cause['confidence']}")
    lines += ["- Nodes: " + ", ".join(f"`{n['path']}` ({n['errno']}, {n['count']}x)"
                                       for n in cause["nodes"]), ""]
    rows = []
    for p in cause["processes"]:
        c = p.get("container") or {}
        where = " ".join(str(x) for x in (c.get("engine"), c.get("name") or
                                          (c.get("id") or "")[:12]) if x) or "host"
        rows.append([p["pid"], f"`{p['comm']}`", p.get("user") or p["uid"],
                     ",".join(str(g) for g in p["groups"]), where, p["count"]])
    lines += _table(["pid", "comm", "user", "groups", "container", "denials"], rows)
    if cause.get("processes_not_shown"):
        lines.append(f"\n…and {cause['processes_not_shown']} more processes.")
    if cause["fixes"]:
        lines += ["", "**Fixes** (best first):", ""]
        for i, fix in enumerate(cause["fixes"], 1):
            where = f" (in `{fix['where']}`)" if fix.get("where") else ""
            lines.append(f"{i}. {fix.get('summary', '')} — applies to {fix.get('applies_to', 'any')}{where}")
            command = str(fix.get("command", "")).split("\n")
            lines += ["", "   ```", *(f"   {part}" for part in command), "   ```"]
            if fix.get("security_note"):
                lines.append(f"   > Security: {fix['security_note']}")
            lines.append("")
    for note in cause.get("notes") or []:
        lines.append(f"\n_Note: {note}_")
    return lines + [""]


def _host_lines(host: dict[str, Any]) -> list[str]:
    nv = host.get("nvidia") or {}
    distro = host.get("distro") or {}
    lines = ["## Host", "",
             f"- Host: {host.get('hostname') or '?'}",
             f"- Kernel: {(host.get('kernel') or {}).get('release') or '?'}",
             f"- Distribution: {distro.get('pretty_name') or distro.get('id') or '?'}",
             f"- NVIDIA driver: {nv.get('version') or ('loaded' if nv.get('loaded') else 'not loaded')}"]
    for kind in ("engines", "oci_runtimes"):
        if host.get(kind):
            label = "Container engines" if kind == "engines" else "OCI runtimes"
            lines.append(f"- {label}: " + ", ".join(f"{e['name']} ({e['version']})" for e in host[kind]))
    params = nv.get("params") or {}
    keep = ("DeviceFileUID", "DeviceFileGID", "DeviceFileMode", "ModifyDeviceFiles",
            "RmProfilingAdminOnly")
    if params:
        lines += ["", "Driver device-file policy (`/proc/driver/nvidia/params`):", ""]
        lines += _table(["param", "value"], [[k, params[k]] for k in keep if k in params])
    lines += ["", "### GPU device nodes", ""]
    rows = []
    for n in host.get("gpu_nodes") or []:
        acl = ",".join(f"{e['tag']}:{e.get('name') or e.get('id') or ''}:{e['perm']}"
                       for e in n.get("acl") or [] if e["tag"] in ("user", "group", "mask"))
        mount = n.get("mount") or {}
        rows.append([f"`{n['path']}`", n["class"], f"{n['major']}:{n['minor']}", n["mode"],
                     f"{n.get('owner') or n['uid']}:{n.get('group') or n['gid']}", acl,
                     n.get("selinux"), ",".join(mount.get("options") or [])])
    lines += _table(["node", "class", "dev", "mode", "owner", "ACL", "label", "mount"], rows)
    if host.get("users"):
        lines += ["", "### Users", ""]
        lines += _table(["user", "uid", "groups"], [
            [u["name"], u["uid"], ", ".join(f"{g.get('name') or '?'}({g['gid']})" for g in u["groups"])]
            for u in host["users"]])
    configs = [("containers.conf", c) for c in host.get("containers_conf") or []]
    if host.get("nvidia_container_runtime_config"):
        configs.append(("nvidia-container-runtime", host["nvidia_container_runtime_config"]))
    configs += [("CDI spec", c) for c in host.get("cdi_specs") or []]
    for title, entry in configs:
        lines += ["", f"<details><summary>{title}: <code>{entry['path']}</code></summary>", "",
                  "```json", json.dumps(entry, indent=2, default=str), "```", "", "</details>"]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    totals = report["totals"]
    window = report["window"]
    span = f"since {window['since']}" if window.get("since") else "whole journal"
    lines = ["# gputrace report", "",
             f"{plural(totals['denials'], 'GPU node denial')} in "
             f"{plural(totals['aggregates'], 'aggregated event')}, "
             f"{plural(totals['causes'], 'distinct cause')} ({span}, until {window['until']}). "
             f"gputrace {report['gputrace_version']}, report v{report['report_version']}"
             f"{', redacted' if report.get('redacted') else ''}.", ""]
    journal = report["journal"]
    if journal["lost_lines"]:
        lines += [f"> {journal['lost_lines']} journal line(s) could not be read back "
                  f"({', '.join(f'{k}: {v}' for k, v in journal['lost_by_reason'].items())}).", ""]
    folded = totals.get("folded") or {}
    if folded:
        lines += [f"> Journal lines held more than a report keeps; counted, not shown "
                  f"({', '.join(f'{k}: {v}' for k, v in sorted(folded.items()))}).", ""]
    lines += ["## Denials by cause", ""]
    if not report["causes"]:
        lines += ["No denials recorded in this window.", ""]
    for number, cause in enumerate(report["causes"], 1):
        lines += _cause_lines(number, cause)
    lines += _timeline_lines(report.get("timeline") or [])
    lines += _host_lines(report["host"])
    return "\n".join(lines) + "\n"


def _timeline_lines(entries: list[dict]) -> list[str]:
    if not entries:
        return []
    rows = []
    for e in entries:
        dev = f" ({e['major']}:{e['minor']})" if e.get("major") is not None else ""
        if "pid" in e:
            detail = f"pid {e['pid']}, {e.get('reason') or 'unknown'}"
        elif e.get("mode"):
            detail = f"mode {e['mode']} uid {e.get('uid')} gid {e.get('gid')}"
        else:
            detail = e.get("sensor", "")
        rows.append([e["time"], e["what"], f"{e.get('path')}{dev}", detail])
    return ["## Timeline", ""] + _table(["time", "what", "node", "detail"], rows) + [""]
