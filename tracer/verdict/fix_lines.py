"""Values written into fix lines a person will paste: shell, udev, systemd,
modprobe and AppArmor syntax.

Node paths, group, user and mount names are chosen by whoever made the node or
the account, so each value goes through the function for the syntax it lands
in.  Each function returns the whole token, quotes included, or raises
`Unpastable` when that syntax cannot carry the value exactly (a newline in a
udev rule, U+FFFD standing for bytes we no longer have).  `fix_line` turns
such a refusal into a fix that says what to rename instead of writing the
value.  Every fix template in `fixes.py` renders its command through here.
"""

from __future__ import annotations

import re
import shlex
from typing import Callable, Optional

from tracer.verdict.reasons import Fix

# Characters each config syntax takes literally, without quoting, globbing or
# substitution.  Anything else is refused rather than escaped by guesswork.
_UDEV_NAME = re.compile(r"[A-Za-z0-9_.+:@-]+")           # KERNEL== is a glob with '|'
_MODPROBE_WORD = re.compile(r"[A-Za-z0-9_.,:+/-]+")
_MODULE_NAME = re.compile(r"[A-Za-z0-9_-]+")
_APPARMOR_PATH = re.compile(r"/[A-Za-z0-9_.+:@/-]*")      # no globs, quotes, ',' or spaces
_SYSTEMD_QUOTED = set(" \t\"'\\")                         # carried inside "..." with '\'


class Unpastable(ValueError):
    """A value the line's syntax cannot carry exactly."""

    def __init__(self, subject: str, why: str, instead: Optional[str] = None) -> None:
        super().__init__(f"the {subject} {why}")
        self.subject = subject
        self.why = why
        self.instead = instead or f"rename the {subject}"


def _text(value: object, subject: str) -> str:
    """A value that is the exact name: known, text, and not a lossy decoding."""
    if value is None:
        raise Unpastable(subject, "is not known", f"find the {subject}'s name")
    if not isinstance(value, str):
        raise Unpastable(subject, "is not a name", f"find the {subject}'s name")
    if value == "":
        raise Unpastable(subject, "has an empty name")
    if "\ufffd" in value or any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):
        raise Unpastable(subject, "has a name that is not valid UTF-8 (shown with U+FFFD)")
    if "\0" in value:
        raise Unpastable(subject, "has a name holding a NUL byte")
    return value


def _no_controls(value: str, subject: str, syntax: str) -> str:
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F or ch in "\u2028\u2029\x85" for ch in value):
        raise Unpastable(subject, f"has a name holding a line break or control character, "
                         f"which a {syntax} line cannot carry")
    return value


def number(value: object, subject: str) -> str:
    """A non-negative integer (gid, major): written as digits, never as a string."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise Unpastable(subject, "is not a known number", f"find the {subject}'s number")
    return str(value)


def shell_word(value: object, subject: str) -> str:
    """One shell argument naming an account or group (never an option)."""
    text = _text(value, subject)
    if text.startswith("-"):
        raise Unpastable(subject, "has a name starting with '-', which the command would "
                         "read as an option")
    return shlex.quote(text)


def shell_path(value: object, subject: str = "node") -> str:
    """One shell argument naming a path; a leading '-' is written as './-'."""
    text = _text(value, subject)
    return shlex.quote("./" + text if text.startswith("-") else text)


def udev_value(value: object, subject: str = "node") -> str:
    """A quoted udev rule value (KERNEL== match or GROUP= assignment).  KERNEL== is a
    glob with '|' alternatives and GROUP= expands '%' and '$', so only names made of
    letters, digits and `_.+:@-` are written."""
    text = _text(value, subject)
    if not _UDEV_NAME.fullmatch(text):
        raise Unpastable(subject, "has a name with characters a udev rule would read as "
                         "a pattern, substitution or quote")
    return f'"{text}"'


def systemd_device_path(value: object, subject: str = "node") -> str:
    """A `DeviceAllow=` device path: under /dev/, normalized, '%' doubled (unit
    specifiers), quoted with backslash escapes when it holds spaces or quotes."""
    text = _no_controls(_text(value, subject), subject, "systemd")
    if not text.startswith("/dev/"):
        raise Unpastable(subject, "is not under /dev/, and DeviceAllow= takes only /dev/ "
                         "paths", "name the node by its path under /dev/")
    parts = text[len("/dev/"):].split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise Unpastable(subject, "has a path that is not normalized, which DeviceAllow= "
                         "refuses", "name the node by its normalized /dev/ path")
    text = text.replace("%", "%%")
    if not _SYSTEMD_QUOTED & set(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modprobe_options(module: str, params: dict[str, object]) -> str:
    """`options MODULE PARAM=VALUE ...` for /etc/modprobe.d: numbers, or words
    without spaces, quotes or '#' (the line is split on whitespace)."""
    if not _MODULE_NAME.fullmatch(module):
        raise Unpastable("module", "is not a module name")
    words = []
    for param, value in params.items():
        if not _MODULE_NAME.fullmatch(param):
            raise Unpastable("module parameter", "is not a parameter name")
        if isinstance(value, int) and not isinstance(value, bool):
            word = number(value, f"{param} value")
        else:
            word = _text(value, f"{param} value")
            if not _MODPROBE_WORD.fullmatch(word):
                raise Unpastable(f"{param} value", "has characters a modprobe.d line "
                                 "cannot carry", f"choose a {param} value without them")
        words.append(f"{param}={word}")
    return f"options {module} " + " ".join(words)


def apparmor_path(value: object, subject: str = "node") -> str:
    """A path in an AppArmor file rule: only when it holds no glob, quote, comma
    or space, which the profile language would read otherwise."""
    text = _text(value, subject)
    if not _APPARMOR_PATH.fullmatch(text):
        raise Unpastable(subject, "has a path with characters an AppArmor rule would read "
                         "as a pattern or separator")
    return text


def fix_line(summary: str, applies_to: str, render: Callable[[], str], *, where: str = "",
             security_note: str = "") -> Fix:
    """The fix with `render()` as its command, or, when a value cannot be written in
    that line's syntax, a fix that says so and what to rename instead.  The refusal's
    command is a shell comment holding no value, so it is safe to paste too."""
    try:
        command = render()
    except Unpastable as refused:
        return Fix(f"{summary} This line cannot be written safely: the {refused.subject} "
                   f"{refused.why}; {refused.instead} first.",
                   f"# {refused.instead}: it {refused.why}", applies_to)
    return Fix(summary, command, applies_to, where=where, security_note=security_note)
