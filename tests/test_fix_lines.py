"""Hostile names through every fix template: each line a person pastes must carry the
node path, group, user and mount point as exactly one value of its syntax (a shell
argument, a udev value, a DeviceAllow= path), or be a refusal that names no value
and says what to rename.

The oracle does not trust fix_lines.py: every template is rendered twice, once with
plain marker values and once with the hostile ones, and each line is parsed by its
own syntax's reader (shlex for shell, a udev value reader, systemd's unquoting rules,
YAML).  The hostile line must parse to the marker line's words with each marker
replaced by the hostile value, word for word."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
from collections import Counter
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.example_counts import fuzz, print_example_counts, ran  # noqa: F401
from tests.test_enrichment_fixtures import denial, fixture_enricher
from tracer.verdict import reasons as R
from tracer.verdict.explain import explain_records
from tracer.verdict.fixes import FIXES
from tracer.verdict.fixes_driver_config import STORY_FIXES
from tracer.verdict.fixes_numbers import FORMS, recreate_node

MARK = {"node_path": "/dev/mkdir/mknode", "group": "mkgroup", "user_name": "mkuser",
        "mount": "/mkmount", "gid": 4242, "unit": "mkunit", "helper": "/mkbin/mkhelper"}
NODE_NAME = "mknode"
NASTY = ['x";id>f;"', "a;reboot", "$(touch pwned)", "`id`", "a\nb", "a\\b", "a\\", "\ufffd",
         "a\ufffdb", "-rf", "--device=/", "a b", "'", '"', "%n", "%%", "$HOME", "*", "a|b",
         "#x", "x,y", "{a,b}", "a\x00b", "\r", "~root", "!x", "a\tb", "\u2028", "\x1b[2J",
         "nvidia0", "renderD128", "a\udcffb", "--", "-", "a\\\nb", "ok'\"'\"'"]
LINES: Counter[str] = Counter()   # how many lines of each syntax were checked, for the note


Flags = tuple[str, bool, bool, bool, bool, bool, bool, bool, bool]


def _ctx(reason_flags: Flags, values: dict[str, Any]) -> dict[str, Any]:
    node_class, v2, landlock, selinux, cap_held, root_gid, unit, blocked, listed = reason_flags
    ctx = {"path": values["node_path"], "node_path": values["node_path"],
           "node_class": node_class, "gid": 0 if root_gid else values["gid"],
           "group": values["group"], "user_name": values["user_name"], "user": "x",
           "runtime": "any", "mount": values["mount"], "major": 195, "minor": 0,
           "container_gid": 44, "cap_held": cap_held,
           "lsm": "Landlock" if landlock else "AppArmor (docker-default)",
           "lsm_label": "system_u:system_r:container_t:s0" if selinux else "docker-default",
           "node_label": "system_u:object_r:xserver_misc_device_t:s0" if selinux else None}
    if v2:
        ctx["device_layer"] = "device_cgroup_v2"
    if unit:  # a systemd unit's device policy (issue 18), its name as hostile as the rest
        ctx.update(unit=values.get("unit", MARK["unit"]), unit_private=True,
                   unit_prop="DeviceAllow", allow_name=None)
    if blocked:  # nvidia-modprobe present but not setuid root: its path goes into chmod
        ctx.update(modprobe_blockers=["not_setuid_root"], on_host=False,
                   modprobe_path=values.get("helper", MARK["helper"]))
    if listed:  # the user is in the group in /etc/group (issue 17), and the container's
        # user is named from the image's /etc/passwd: both as hostile as the rest
        ctx.update(member_listed=True, user_groups=[ctx["gid"]],
                   container_user=values["user_name"], dropper="gosu")
    return ctx


def _story_ctx(flags: Flags, values: dict[str, Any]) -> dict[str, Any]:
    """What config_stories.py and number_mismatch.py add to the context (issue 18)."""
    return {**_ctx(flags, values), "cdi_spec": "/etc/cdi/nvidia.yaml",
            "cdi_device": "nvidia.com/gpu=0" if flags[1] else "vendor.example/accel=a",
            "cdi_host_gid": values["gid"], "cdi_node_path": values["node_path"],
            "driver_mode_intended": "0666", "driver_mode_source": "/etc/modprobe.d/nv.conf:3",
            "toolkit_config": "/etc/nvidia-container-runtime/config.toml",
            "unit": values.get("unit", MARK["unit"]), "container_name": "gpu1", "stale_major": 240,
            "engine": "docker" if flags[2] else None, "cgroup_version": 2 if flags[1] else 1,
            "driver_major": None if flags[3] else 508}


# every template: the reasons', and those the stories and number forms put first
TEMPLATES: dict[str, tuple[Any, Any]] = {
    **{reason: (template, _ctx) for reason, template in FIXES.items()},
    **{f"story:{key}": (template, _story_ctx) for key, template in STORY_FIXES.items()},
    **{f"form:{key}": (template, _story_ctx) for key, template in FORMS.items()},
    "recreate_node": (lambda ctx: recreate_node(ctx, "-u -c=0"), _story_ctx)}


ALL_FLAGS = list(itertools.product(("nvidia-gpu", "drm-render"), *[(False, True)] * 8))
# every branch of every template: all flags off, each one on alone, all on
FLAGS = [ALL_FLAGS[0]] + [f for f in ALL_FLAGS if sum(map(bool, f[1:])) == 1
                          or f[0] == "drm-render" and not any(f[1:])] + [ALL_FLAGS[-1]]


# ------------------------------------------------------------- line readers

def _shell_words(line: str) -> list[str]:
    """Words as a POSIX shell splits them; operators (; | & < > ( )) outside quotes
    come out as words of their own."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def _udev_pairs(line: str) -> list[tuple[str, str, str]]:
    """udev's rule reader: KEY OP "VALUE" separated by commas; inside the quotes only
    \\" is an escape (udev-rules.c parse_value)."""
    pairs, pos = [], 0
    pattern = re.compile(r'\s*([A-Z_]+)(==|!=|\+=|-=|:=|=)"')
    while pos < len(line):
        head = pattern.match(line, pos)
        assert head, f"not a udev pair at {line[pos:]!r} in {line!r}"
        value, i = [], head.end()
        while line[i] != '"':
            if line[i] == "\\" and line[i + 1] == '"':
                i += 1
            value.append(line[i])
            i += 1
        pairs.append((head.group(1), head.group(2), "".join(value)))
        pos = i + 1
        rest = re.match(r"\s*,?\s*", line[pos:])
        pos += rest.end() if rest else 0
    return pairs


def _systemd_words(value: str) -> list[str]:
    """extract_first_word(EXTRACT_UNQUOTE) then unit specifiers ('%%' is '%')."""
    words, word, quote, i, started = [], [], "", 0, False
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            word.append(value[i + 1])
            i += 2
            started = True
            continue
        if quote:
            if ch == quote:
                quote = ""
            else:
                word.append(ch)
        elif ch in "\"'":
            quote, started = ch, True
        elif ch in " \t":
            if started:
                words.append("".join(word))
            word, started = [], False
        else:
            word.append(ch)
            started = True
        i += 1
    assert not quote, f"unterminated quote in {value!r}"
    if started:
        words.append("".join(word))
    assert all(re.fullmatch(r"(%%|[^%])*", w) for w in words), f"bare % in {value!r}"
    return [w.replace("%%", "%") for w in words]


def _syntax(line: str) -> str:
    if line.startswith("# "):
        return "refusal"
    if line.startswith(("KERNEL==", "ACTION==")):
        return "udev"
    if line.startswith(("DeviceAllow=", "SystemCallFilter=")):
        return "systemd"
    if line.startswith("options "):
        return "modprobe"
    if line.startswith(("securityContext:", "[containers]")):
        return "yaml"
    if line.startswith(("[Unit]", "[Service]")):
        return "unit"  # a unit file or drop-in (issue 18): each line read by systemd's rules
    if line.endswith(" rw,"):
        return "apparmor"
    return "shell"


def _read(line: str) -> list[Any]:
    kind = _syntax(line)
    if kind == "udev":
        return list(_udev_pairs(line))
    if kind == "systemd":
        key, _, value = line.partition("=")
        return [key] + _systemd_words(value)
    if kind == "modprobe":
        assert "\n" not in line and "#" not in line and '"' not in line
        return line.split()
    if kind == "yaml":
        return [yaml.safe_load(line) if line.startswith("securityContext") else line]
    if kind == "unit":
        out: list[Any] = []
        for one in line.splitlines():
            assert not one.startswith("#") or re.fullmatch(r"# [a-z][A-Za-z0-9 ,.'/:()=+_-]*", one)
            key, _, value = one.partition("=")
            out.append(tuple([key] + (_systemd_words(value) if key == "DeviceAllow" else [value])))
        return out
    if kind == "apparmor":
        path = line[:-len(" rw,")]
        assert re.fullmatch(r"/[^\s\"',#*?\[\]{}^\\]*", path), f"AppArmor would misread {path!r}"
        return [path, "rw,"]
    return _shell_words(line[len("RUN "):] if line.startswith("RUN ") else line)


# ------------------------------------------------------------- the oracle

def _expected(marked: list[Any], values: dict[str, Any], kind: str) -> list[Any]:
    path = values["node_path"]
    swap = {MARK["node_path"]: "./" + path if kind == "shell" and path.startswith("-") else path,
            NODE_NAME: path.rsplit("/", 1)[-1], MARK["group"]: values["group"],
            MARK["user_name"]: values["user_name"],
            MARK["mount"]: "./" + values["mount"] if values["mount"].startswith("-")
            else values["mount"], MARK["unit"]: values.get("unit", MARK["unit"]),
            MARK["helper"]: "./" + values["helper"] if values.get("helper", "").startswith("-")
            else values.get("helper", MARK["helper"])}

    def one(word: Any) -> Any:
        if isinstance(word, tuple):
            return tuple(one(w) for w in word)
        if isinstance(word, str):
            option, eq, value = word.partition("=")
            if eq and option.startswith("--") and value in swap:  # --reuid=USER
                return option + eq + swap[value]
            return swap.get(word, word.replace(MARK["node_path"], swap[MARK["node_path"]]))
        return word
    return [one(w) for w in marked]


def _shell_can_carry(value: str, is_name: bool) -> bool:
    lossy = "\ufffd" in value or any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    return bool(value) and not lossy and "\0" not in value \
        and not (is_name and value.startswith("-"))


def _refusal_is_due(marked_line: str, values: dict[str, Any], kind: str) -> bool:
    """A refusal is due only when a value in the line is one its syntax cannot carry."""
    used = [(v, k) for k, v in values.items() if k != "gid" and MARK[k] in marked_line]
    if NODE_NAME in marked_line and MARK["node_path"] not in marked_line:
        used.append((values["node_path"].rsplit("/", 1)[-1], "node_name"))
    if kind == "shell":
        return any(not _shell_can_carry(v, k in ("group", "user_name", "unit")) for v, k in used)
    if kind == "udev":
        return any(not re.fullmatch(r"[A-Za-z0-9_.+:@-]+", v) for v, _ in used)
    return True  # systemd/AppArmor refuse whatever is outside their plain set; checked above


def check_template_lines(flags: Flags,
                         values: dict[str, Any]) -> Counter[str]:
    """Every template's lines for these values, read back; returns lines per syntax."""
    seen: Counter[str] = Counter()
    for reason, (template, context) in TEMPLATES.items():
        marked = template(context(flags, MARK))
        hostile = template(context(flags, values))
        assert len(marked) == len(hostile), reason
        for plain, fix in zip(marked, hostile):
            kind = _syntax(plain.command)
            seen[kind] += 1
            if _syntax(fix.command) == "refusal":
                seen["refused"] += 1
                assert re.fullmatch(r"# [a-z][A-Za-z0-9 ,.'/:()=+_-]*", fix.command), fix.command
                assert "cannot be written safely" in fix.summary
                assert fix.applies_to == plain.applies_to and not fix.where
                assert _refusal_is_due(plain.command, values, kind), (plain.command, values)
                continue
            assert _read(fix.command) == _expected(_read(plain.command), values, kind), \
                (reason, plain.command, fix.command)
    LINES.update(seen)
    return seen


# ------------------------------------------------------------- the tests

NAME = st.sampled_from(NASTY) | st.text(st.characters(codec="utf-8")
                                        | st.characters(categories=["Cs"]), min_size=1,
                                        max_size=24)
PATH = st.tuples(st.sampled_from(["/dev/", "/dev/dri/", "/", "", "-", "/tmp/a b/"]), NAME) \
    .map("".join)


@fuzz(1000)
@given(flags=st.sampled_from(ALL_FLAGS), path=PATH,
       group=NAME.filter(lambda g: g not in ("root", "0", "?")),
       user=NAME, mount=PATH.filter(lambda m: m != "?"))
def test_hostile_names_through_every_fix_template(flags: Any, path: str, group: str,
                                                   user: str, mount: str) -> None:
    ran("fix templates (hostile names)")
    check_template_lines(flags, {"node_path": path, "group": group, "user_name": user,
                                 "mount": mount, "gid": 4242, "unit": user, "helper": mount})


@pytest.mark.parametrize("name", NASTY)
def test_each_nasty_name_in_every_branch_of_every_template(name: str) -> None:
    """Every branch (node class, v1/v2, Landlock/SELinux/AppArmor, capability held,
    root group) of every template, with the name as path, group, user and mount."""
    seen: Counter[str] = Counter()
    for flags in FLAGS:
        seen += check_template_lines(flags, {"node_path": "/dev/" + name, "group": name,
                                             "user_name": name, "mount": name, "gid": 4242,
                                             "unit": name, "helper": name})
        seen += check_template_lines(flags, {"node_path": name, "group": "video",
                                             "user_name": "al", "mount": "/" + name,
                                             "gid": 4242})
    # every syntax was reached, so no template or reader silently dropped out
    assert all(seen[kind] for kind in ("shell", "udev", "systemd", "modprobe", "yaml",
                                       "apparmor", "unit")), seen


@pytest.mark.parametrize("gid", [None, -1, "27;id", True, 2 ** 40, "27"])
def test_a_group_number_that_is_not_a_number_is_never_written(gid: Any) -> None:
    """A hostile journal can give node.gid any JSON value: only an int is written."""
    for fix in FIXES[R.NOT_IN_GROUP](_ctx(FLAGS[0], dict(MARK, gid=gid))):
        if "--group-add" in fix.command or "supplementalGroups" in fix.command:
            assert isinstance(gid, int) and not isinstance(gid, bool) and gid >= 0, fix.command
        if fix.command.startswith("#"):
            assert "number" in fix.command


def test_the_issue_s_two_injections_are_inert() -> None:
    """A node named x";id>f;" must not add udev keys; a symlink a;reboot must not run."""
    node = {"node_path": '/dev/x";id>f;"', "group": "video", "user_name": "al",
            "mount": "/m", "gid": 44}
    flags: Flags = ("drm-render", False, False, False, False, False, False, False, False)
    udev = next(f for f in FIXES[R.MODE_RESTRICTIVE](_ctx(flags, node)))
    assert udev.command.startswith("# rename the node") and "id>f" not in udev.command
    reboot = dict(node, node_path="/dev/a;reboot")
    device = FIXES[R.DEVICE_CGROUP](_ctx(flags, reboot))
    assert device[1].command == "docker run --device '/dev/a;reboot' ..."
    assert _shell_words(device[1].command) == ["docker", "run", "--device", "/dev/a;reboot", "..."]


def test_shell_lines_run_in_a_real_shell_give_the_value_as_one_argument(tmp_path: Any) -> None:
    """bash itself (no PATH, every command a function printing its arguments, in an
    empty directory) reads each shell fix line: nothing else runs, nothing is written."""
    lines, expect = [], []
    for name in NASTY:
        values = {"node_path": "/dev/" + name, "group": name, "user_name": name,
                  "mount": "/" + name, "gid": 44}
        for flags in FLAGS:
            for template, context in TEMPLATES.values():
                for fix in template(context(flags, values)):
                    if _syntax(fix.command) == "shell" and not fix.command.startswith(
                            ("RUN ", "echo ", "LANDLOCK_", "gid: ", "major: ", "lxc.", "[")):
                        lines.append(fix.command)
                        words = _shell_words(fix.command)
                        while "&&" in words:  # one call per command of an a && b line
                            expect.append(words[:words.index("&&")])
                            words = words[words.index("&&") + 1:]
                        expect.append(words)
    commands = sorted({words[0] for words in expect})
    stubs = "".join(f"{c}() {{ printf '%s\\0' \"$#\" \"$FUNCNAME\" \"$@\"; }}\n" for c in commands)
    out = subprocess.run(["/bin/bash", "--norc", "--noprofile", "-s"],
                         input=(stubs + "\n".join(lines) + "\n").encode(),
                         env={"PATH": "/nonexistent"}, cwd=tmp_path, capture_output=True,
                         timeout=60)
    items = out.stdout.decode("utf-8").split("\0")
    got = []
    while len(items) > 1:
        count = int(items[0])
        got.append(items[1:2 + count])
        items = items[2 + count:]
    assert got == expect, out.stderr[-2000:]
    assert len(got) > 1000
    assert os.listdir(tmp_path) == [] and out.stderr == b"", out.stderr[-500:]


def test_explain_of_a_journal_with_a_hostile_node_path_quotes_it() -> None:
    """End to end: a recorded device-cgroup denial whose node path is a;reboot`id`."""
    event = denial(700, "/dev/nvidia0", 1, caps=0xA80425FB, mntns=4026532700)
    fixture_enricher("cgroup-v1-host").enrich(event)
    record = event.to_json()
    hostile = "/dev/a;reboot`id`\n$(x)"
    record["facts"]["node.path"]["value"] = hostile
    [explained] = list(explain_records([json.dumps(record)]))
    assert explained.verdict is not None and explained.verdict.reason == R.DEVICE_CGROUP
    commands = [f.command for f in explained.verdict.fixes]
    assert f"docker run --device {shlex.quote(hostile)} ..." in commands
    for command in commands:
        if _syntax(command) == "shell" and hostile[:6] in command:
            assert hostile in _shell_words(command)
