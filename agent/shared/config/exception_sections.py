"""``[exception.NAME]`` sections and ``[rule] exceptions``: the admin's
exceptions and the shipped lists, resolved to the rule's tuple of
:class:`~agent.shared.exceptions.RuleException`.

A section's keys are ECS field names (one glob a line, commas also
separate), plus ``missing`` (fields the event must lack), ``expires`` (an
ISO 8601 instant) and ``comment``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Optional

from agent.shared.config.converters import words
from agent.shared.exceptions import FIELDS, RuleException
from agent.shared.like import glob_problem
from agent.shared.recommended import LISTS
from agent.shared.text import iso, parse_timestamp

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
PREFIX = "exception."

Entries = Mapping[str, tuple[str, str]]  # key -> (raw value, where)


def file_part(section: str, entries: Entries) -> str:
    """``FILE: `` of a section's first key (for problems about the section as a whole)."""
    first = next(iter(entries.values()))[1] if entries else f"[{section}]"
    return first.rsplit(": [", 1)[0] + ": " if ": [" in first else ""


def exception_section(
    section: str, entries: Entries, problems: list[str], now_ms: int, strict_expiry: bool
) -> Optional[RuleException]:
    """One ``[exception.NAME]`` section, or None when it has problems (listed)."""
    name = section[len(PREFIX) :]
    where0 = f"{file_part(section, entries)}[{section}]"
    before = len(problems)
    if not _NAME.match(name) or name in LISTS or name == "none":
        problems.append(
            f"{where0}: the name must be 1 to 64 of A-Z a-z 0-9 _ . - and not a shipped list or none"
        )
    conditions: list[tuple[str, tuple[str, ...]]] = []
    missing: tuple[str, ...] = ()
    expires: Optional[int] = None
    comment = ""
    for key, (value, where) in entries.items():
        if key == "comment":
            comment = value.strip()
        elif key == "expires":
            expires = _expires(value.strip(), where, problems, now_ms if strict_expiry else None)
        elif key == "missing":
            missing = _missing(
                value, where, problems, {f for f, _ in conditions} | set(entries) & set(FIELDS)
            )
        elif key in FIELDS:
            conditions.append((key, _globs(value, where, problems)))
        else:
            known = ", ".join([*FIELDS, "missing", "expires", "comment"])
            problems.append(f"{where}: unknown field (known: {known})")
    if not conditions and not missing and len(problems) == before:
        problems.append(f"{where0}: names no field, so it would remove every event")
    if len(problems) > before:
        return None
    return RuleException(name, tuple(sorted(conditions)), expires, comment, missing=tuple(sorted(missing)))


def _missing(value: str, where: str, problems: list[str], with_globs: set[str]) -> tuple[str, ...]:
    """``missing = FIELD, ...``: fields the event must lack."""
    fields = words(value)
    if not fields:
        problems.append(f"{where}: must list at least one field")
    for f in fields:
        if f not in FIELDS:
            problems.append(f"{where}: {f!r} is not a field (known: {', '.join(FIELDS)})")
        elif f in with_globs:
            problems.append(f"{where}: {f} has globs in this section too, so it can never be missing")
    return fields


def _expires(value: str, where: str, problems: list[str], now_ms: Optional[int]) -> Optional[int]:
    try:
        expires = parse_timestamp(value)
    except ValueError:
        problems.append(f"{where}: {value!r} is not an ISO 8601 instant (e.g. 2027-01-31T00:00:00Z)")
        return None
    if now_ms is not None and expires <= now_ms:
        problems.append(f"{where}: {iso(expires)} has passed, so the exception no longer applies")
    return expires


def _globs(value: str, where: str, problems: list[str]) -> tuple[str, ...]:
    globs = words(value)
    if not globs:
        problems.append(f"{where}: must list at least one glob")
    for g in globs:
        why = glob_problem(g)
        if why:
            problems.append(f"{where}: bad glob: {why}")
    return globs


def resolve(
    names: tuple[str, ...], own: Mapping[str, Optional[RuleException]], where: str, problems: list[str]
) -> tuple[RuleException, ...]:
    """``[rule] exceptions``: shipped lists and own sections by name, in order;
    ``none`` alone means no exception."""
    if names == ("none",):
        return ()
    out: list[RuleException] = []
    for n in names:
        if n in LISTS:
            out.extend(LISTS[n])
        elif n in own:
            exc = own[n]
            if exc is not None:  # a broken section: its problems are listed already
                out.append(exc)
        else:
            known = ", ".join(["none", *LISTS, *sorted(own)])
            problems.append(
                f"{where}: {n!r} is not an exception list or [exception.{n}] section (known: {known})"
            )
    return tuple(out)
