"""The ``[rule.KEY]`` sections: the rules beside ``[rule]`` (see
:mod:`agent.shared.rules`).

The shipped ones are on by default: ``[rule.via-web-server]`` (Elastic's
new-terms rule) and ``[rule.outbreak]``; a section of that name changes any
of their keys (``enabled = no`` turns one off). A section of another name is
a rule of the admin's own and needs ``type = new_terms`` or ``type =
outbreak``; its other keys start from the shipped rule of that type.
Multi-line values, one entry a line::

    gated = java: jsp jspx war
            node nodejs: js mjs
    exclusions = path:*/storage/framework/sessions/*
                 process:node uid>=1000 uid:0

An exclusion line holds ``process:NAME``, ``path:PATTERN``, ``uid>=N`` and
``uid:N`` terms: terms of one field are ORed, fields ANDed (KQL's ``not``
block).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Callable, Union

from agent.shared.config.converters import boolean, choice, duration_ms, integer, nonempty_words, text, words
from agent.shared.config.exception_sections import file_part
from agent.shared.config.schema import build_section
from agent.shared.rules import (
    FIRST_RULE_KEY,
    MAX_RULES,
    NEW_TERMS,
    OUTBREAK,
    RULE_TYPES,
    Exclusion,
    NewTermsRule,
    OutbreakRule,
    default_rules,
)

PREFIX = "rule."
_KEY = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}\Z")
OtherRule = Union[NewTermsRule, OutbreakRule]
Raw = Mapping[str, tuple[str, str]]


def _gated(value: str) -> tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]:
    out = []
    for line in value.strip().splitlines():
        names, sep, exts = line.partition(":")
        if not sep or not names.split() or not exts.split():
            raise ValueError(f"{line.strip()!r}: write 'process names: extensions'")
        out.append((tuple(names.split()), tuple(exts.split())))
    return tuple(out)


def _exclusion(line: str) -> Exclusion:
    procs, paths, uids, at_least = [], [], [], None
    for term in line.split():
        if term.startswith("uid>="):
            at_least = integer(0, 1 << 32)(term[5:])
        elif term.startswith("uid:") and term[4:]:
            uids.append(term[4:])
        elif term.startswith("process:") and term[8:]:
            procs.append(term[8:])
        elif term.startswith("path:") and term[5:]:
            paths.append(term[5:])
        else:
            raise ValueError(f"{term!r}: an exclusion term is process:NAME, path:PATTERN, uid>=N or uid:N")
    return Exclusion(tuple(procs), tuple(paths), at_least, tuple(uids))


def _exclusions(value: str) -> tuple[Exclusion, ...]:
    if value.strip().lower() == "none":
        return ()
    return tuple(_exclusion(line) for line in value.strip().splitlines() if line.strip())


_COMMON: dict[str, tuple[str, Callable[[str], Any]]] = {
    "type": ("type", choice(*RULE_TYPES)),
    "enabled": ("enabled", boolean),
    "name": ("name", text),
    "rule_id": ("rule_id", text),
    "description": ("description", text),
    "schedule": ("schedule_ms", duration_ms),
    "severity": ("severity", choice("low", "medium", "high", "critical")),
    "risk_score": ("risk_score", integer(0, 100)),
    "building_block": ("building_block", boolean),
    "tags": ("tags", words),
    "quarantine": ("quarantine", boolean),
}
KEYS: Mapping[str, Mapping[str, tuple[str, Callable[[str], Any]]]] = {
    NEW_TERMS: {
        **_COMMON,
        "process_names": ("process_names", words),
        "gated": ("gated", _gated),
        "paths": ("paths", nonempty_words),
        "exclusions": ("exclusions", _exclusions),
        "history_window": ("history_ms", duration_ms),
        "lookback": ("lookback_ms", duration_ms),
    },
    OUTBREAK: {
        **_COMMON,
        "source": ("source", text),
        "hosts": ("hosts", integer(2, 100_000)),
        "within": ("within_ms", duration_ms),
    },
}


def _one(section: str, entries: Raw, problems: list[str], shipped: Mapping[str, OtherRule]) -> OtherRule:
    key = section[len(PREFIX) :]
    base = shipped.get(key)
    where = f"{file_part(section, entries)}[{section}]"
    if "type" in entries:
        kind, where = entries["type"][0].strip(), entries["type"][1]
    elif base is not None:
        kind = base.type
    else:
        kind = ""
    if kind not in RULE_TYPES:
        problems.append(
            f"{where}: type must be one of {', '.join(RULE_TYPES)} (a rule of your own needs one)"
        )
        kind = NEW_TERMS
    if base is None or base.type != kind:
        base = (
            NewTermsRule(key=key, rule_id=f"rarewrite-{key}")
            if kind == NEW_TERMS
            else OutbreakRule(key=key, rule_id=f"rarewrite-{key}")
        )
    return build_section(base, KEYS[kind], entries, problems, f"known keys for type = {kind}")


def rule_sections(
    raw: dict[str, dict[str, tuple[str, str]]], first_id: str, problems: list[str]
) -> tuple[OtherRule, ...]:
    """The shipped rules with their ``[rule.KEY]`` changes, then the admin's
    own in name order; the ``[rule.KEY]`` sections are taken out of ``raw``."""
    shipped = {r.key: r for r in default_rules()}
    mine = {}
    for section in sorted(s for s in raw if s.startswith(PREFIX)):
        key = section[len(PREFIX) :]
        entries = raw.pop(section)
        if not _KEY.match(key) or key == FIRST_RULE_KEY:
            problems.append(
                f"{file_part(section, entries)}[{section}]: a rule key is 1 to 64 of a-z 0-9 _ . - "
                f"({FIRST_RULE_KEY} is the [rule] section)"
            )
            continue
        mine[key] = _one(section, entries, problems, shipped)
    rules = [mine.pop(k, r) for k, r in shipped.items()] + list(mine.values())
    problems.extend(_checks(rules, first_id))
    return tuple(rules)


def _checks(rules: list[OtherRule], first_id: str) -> list[str]:
    problems = []
    ids = [first_id] + [r.rule_id for r in rules]
    for rid in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"[rule.*] rule_id: {rid!r} is used by more than one rule")
    if len(rules) + 1 > MAX_RULES:
        problems.append(f"[rule.*]: at most {MAX_RULES} rules")
    new_terms = {r.key: r for r in rules if isinstance(r, NewTermsRule)}
    for r in rules:
        if isinstance(r, OutbreakRule) and r.enabled:
            src = new_terms.get(r.source)
            if src is None:
                problems.append(f"[rule.{r.key}] source: {r.source!r} is not a new_terms rule")
            elif not src.enabled:
                problems.append(
                    f"[rule.{r.key}] source: rule {r.source!r} is disabled (disable this one too)"
                )
        if isinstance(r, NewTermsRule) and r.lookback_ms >= r.history_ms:
            problems.append(f"[rule.{r.key}] lookback: must be shorter than history_window")
    return problems
