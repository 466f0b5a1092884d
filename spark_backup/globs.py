"""Include and exclude globs over absolute POSIX paths, compiled to regular expressions."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence


@functools.lru_cache(maxsize=256)
def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Translate a glob to a regex over absolute POSIX paths (``ValueError`` if malformed).

    ``*`` and ``?`` stay within one path segment, ``**`` spans segments, ``[...]`` is a class.
    A pattern without '/' matches a basename anywhere (``*.swp``); one with '/' matches the whole
    path from the root (``/etc/kubernetes/**/*.yaml``); a relative one with '/' matches at any
    depth (``secrets/*.key``).
    """
    original = pattern
    if "/" not in pattern:
        pattern = "**/" + pattern
    elif not pattern.startswith("/"):
        pattern = "/**/" + pattern
    regex, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            regex += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            regex += ".*"
            i += 2
        elif char == "*":
            regex += "[^/]*"
            i += 1
        elif char == "?":
            regex += "[^/]"
            i += 1
        elif char == "[":
            end = pattern.find("]", i + 2)
            if end == -1:
                regex += re.escape(char)
                i += 1
            else:
                body = pattern[i + 1 : end].replace("\\", "\\\\")
                regex += "[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]"
                i = end + 1
        else:
            regex += re.escape(char)
            i += 1
    try:
        return re.compile(("^/?" if not pattern.startswith("/") else "^") + regex + "$")
    except re.error as exc:
        raise ValueError(f"invalid glob {original!r}: {exc.msg}") from None


def patterns_regex(patterns: Sequence[str]) -> re.Pattern[str] | None:
    """One regex matching a path that any of the globs matches; None for no globs."""
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{glob_to_regex(p).pattern})" for p in patterns))


def matches_any(path: str, patterns: Sequence[str]) -> bool:
    regex = patterns_regex(patterns)
    return bool(regex and regex.match(path))
