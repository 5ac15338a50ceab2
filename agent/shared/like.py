"""ES|QL's LIKE, the one glob language of rarewrite: the query's
``process.name like "php-*"`` and every exception value use it.

``*`` matches any run of characters (``/`` included), ``?`` exactly one, and
``\\`` makes the next ``*``, ``?`` or ``\\`` literal; matching is
case-sensitive and covers the whole value.
"""

from __future__ import annotations

import re
from typing import Optional


def like_regex(pattern: str) -> re.Pattern[str]:
    """ES|QL LIKE: ``*`` any run, ``?`` one character, ``\\`` escapes the next."""
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if ch == "*" else "." if ch == "?" else re.escape(ch))
        i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def is_pattern(name: str) -> bool:
    return "*" in name or "?" in name


def glob_problem(pattern: str) -> Optional[str]:
    """Why ``pattern`` is not a glob an admin meant, or None: empty, a NUL, or
    a ``\\`` that escapes nothing (ES|QL refuses those too)."""
    if not pattern:
        return "an empty value matches nothing"
    if "\0" in pattern:
        return "a NUL character cannot be in a name"
    i = 0
    while i < len(pattern):
        if pattern[i] == "\\":
            if i + 1 >= len(pattern) or pattern[i + 1] not in "*?\\":
                return f"{pattern!r}: '\\' must be followed by *, ? or \\ (it escapes one of them)"
            i += 1
        i += 1
    return None
