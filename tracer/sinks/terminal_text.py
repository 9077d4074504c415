"""Make untrusted bytes safe to print on an operator's terminal.

Paths and `comm` are chosen by whoever runs the denied process: they may hold
escape sequences, control characters, bidi overrides or invalid UTF-8.  Every
such byte or character is shown as a visible escape (\\x1b, \\u202e); a
backslash is doubled so the escaped form is unambiguous.
"""

from __future__ import annotations

import unicodedata

_UNSAFE_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def escape(raw: "bytes | str | None", limit: int = 4096) -> str:
    if raw is None:
        return "-"
    text = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
    out = []
    for ch in text[:limit]:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, kept by surrogateescape
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif code < 0x80:
            out.append(ch if 0x20 <= code < 0x7F else f"\\x{code:02x}")
        elif unicodedata.category(ch) in _UNSAFE_CATEGORIES:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(ch)
    if len(text) > limit:
        out.append(f"...(+{len(text) - limit} chars)")
    return "".join(out)
