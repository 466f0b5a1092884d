"""Text from outside (file names, archive members, manifest fields, tool messages) made safe to
show: the one rule every place that prints or logs such text uses."""

from __future__ import annotations

import re

# C0 and C1 control characters (every terminal escape sequence starts with one) except tab,
# and the Unicode controls that reorder or hide what follows them (bidi overrides, line and
# paragraph separators), which can make a name read as another.
_UNSAFE_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """``text`` with control characters shown as escapes (``\\x1b``, ``\\u202e``): a file name
    or a manifest field never reaches a terminal or a log as an escape sequence."""
    return _UNSAFE_RE.sub(_escape, str(text))


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
