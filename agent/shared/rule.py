"""The rule as data, and its exact semantics as pure functions.

:class:`Rule` holds every part of Elastic's "Unusual File Creation by Web
Server" (2025 ES|QL text, ``shared/rule/``) with the published values as
defaults; config may override any of them. :func:`matches` is the ``where``
clause for one event, :func:`reference_rows` the whole query over a set of
agents' events at an evaluation time T: the reference the collector's SQL is
checked against.

ES|QL details kept exactly: ``in`` and ``==`` are case-sensitive; LIKE knows
``*`` (any run) and ``?`` (one character) and nothing else (``\\`` escapes);
the window is T - 1 h < @timestamp <= T; ``user.id`` is a string; a
multi-valued field in an equality test is null, so it never matches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

from agent.shared.events import FileEvent, UserInfo
from agent.shared.exceptions import ExceptionSet, RuleException
from agent.shared.like import is_pattern, like_regex
from agent.shared.text import render

RULE_NAME = "Unusual File Creation by Web Server"

USER_NAMES = (
    "apache", "www-data", "httpd", "nginx", "lighttpd", "tomcat",
    "tomcat8", "tomcat9", "ftp", "ftpuser", "ftpd",
)  # fmt: skip
USER_IDS = ("99", "33", "498", "48")
PROCESS_NAMES = (
    "apache", "nginx", "apache2", "httpd", "lighttpd", "caddy", "node",
    "mongrel_rails", "java", "gunicorn", "uwsgi", "openresty", "cherokee",
    "h2o", "resin", "puma", "unicorn", "traefik", "tornado", "hypercorn",
    "daphne", "twistd", "yaws", "webfsd", "httpd.worker", "flask", "rails",
    "mongrel",
    # LIKE patterns of the query: an entry with * or ? is a pattern
    "php-*", "python*", "ruby*", "perl*",
)  # fmt: skip
TAGS = (
    "Domain: Endpoint", "OS: Linux", "Use Case: Threat Detection",
    "Tactic: Persistence", "Tactic: Execution", "Tactic: Command and Control",
    "Data Source: Elastic Defend", "Rule Type: BBR",
)  # fmt: skip


@dataclass(frozen=True)
class Technique:
    tactic_id: str
    tactic_name: str
    technique_id: str
    technique_name: str
    subtechnique_id: str = ""
    subtechnique_name: str = ""


THREAT = (
    Technique("TA0003", "Persistence", "T1505", "Server Software Component", "T1505.003", "Web Shell"),
    Technique("TA0002", "Execution", "T1059", "Command and Scripting Interpreter", "T1059.004", "Unix Shell"),
    Technique("TA0011", "Command and Control", "T1071", "Application Layer Protocol"),
)


class NameSet:
    """Exact names plus LIKE patterns, matched case-sensitively."""

    def __init__(self, names: Iterable[str]) -> None:
        names = list(names)
        self.exact = frozenset(n for n in names if not is_pattern(n))
        self.patterns = tuple(like_regex(n) for n in names if is_pattern(n))
        self._seen: dict[str, bool] = {}

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, str):
            return False
        if value in self.exact:
            return True
        if not self.patterns:
            return False
        hit = self._seen.get(value)
        if hit is None:  # a host has few task names: each is matched against the patterns once
            if len(self._seen) >= 4096:
                self._seen.clear()
            hit = self._seen[value] = any(p.match(value) for p in self.patterns)
        return hit


@dataclass(frozen=True)
class Rule:
    """Every part of the rule; the defaults are the published rule."""

    name: str = RULE_NAME
    enabled: bool = True  # no: the agents keep nothing for it, the collector raises nothing
    rule_id: str = "rarewrite-unusual-file-creation-by-web-server"
    description: str = (
        "A web server process or user created or renamed a file that no other host in the "
        "fleet wrote in the last hour: a possible web shell, planted cron job or dropped script."
    )
    user_names: tuple[str, ...] = USER_NAMES
    user_ids: tuple[str, ...] = USER_IDS
    process_names: tuple[str, ...] = PROCESS_NAMES
    combinator: str = "and"  # "and" (2025 query) or "or" (Elastic's 2026 revision)
    actions: tuple[str, ...] = ("creation", "rename")
    strict_event_type: bool = False  # the 2025 text's literal event.type == "change"
    os_type: str = "linux"
    window_ms: int = 3_600_000
    count_below: int = 5  # rows need cc < count_below
    agent_count: int = 1  # rows need agent_count == this
    limit: int = 100
    schedule_ms: int = 3_600_000
    building_block: bool = True  # "Rule Type: BBR": its alerts are hidden by default in Kibana
    severity: str = "medium"
    risk_score: int = 47
    tags: tuple[str, ...] = TAGS
    threat: tuple[Technique, ...] = field(default=THREAT)
    # Exceptions (agent.shared.exceptions): none by default, the rule as published
    exceptions: tuple[RuleException, ...] = ()
    # Alert suppression: rows whose suppress_by values equal an alert's within
    # suppress_for of it are folded into it ("suppress": a missing value is one
    # more value; "do_not_suppress": a row missing one is never folded)
    suppress_by: tuple[str, ...] = ()
    suppress_for_ms: int = 3_600_000
    suppress_missing: str = "suppress"
    quarantine: bool = False  # the agent moves an alert's file aside (opt-in, on both sides)

    @cached_property
    def _users(self) -> frozenset[str]:
        # ES|QL's `user.name in (...)` compares exactly: a `*` in a user name is just a `*`
        # (only process.name has LIKE patterns in the query)
        return frozenset(self.user_names)

    @cached_property
    def _processes(self) -> NameSet:
        return NameSet(self.process_names)

    def user_matches(self, name: Optional[str], uid: Optional[str]) -> bool:
        return name in self._users or (uid is not None and uid in self.user_ids)

    def process_matches(self, name: Optional[str]) -> bool:
        return name in self._processes

    def could_match(self, process_name: Optional[str], user: UserInfo) -> bool:
        """The query's user and process predicates, combined as the rule says:
        can an event written by this process as this user match at all? (The
        event's action, type and OS decide the rest, in :func:`matches`.)"""
        proc = self.process_matches(process_name)
        if self.combinator == "and":
            return proc and self.user_matches(user.name, user.id)
        return proc or self.user_matches(user.name, user.id)


def matches(rule: Rule, event: FileEvent) -> bool:
    """The query's ``where`` clause for one event (the window aside)."""
    if event.os_type != rule.os_type or event.action not in rule.actions:
        return False
    if rule.strict_event_type and event.event_type != ("change",):
        return False
    return rule.could_match(event.process.name, event.user)


def in_window(rule: Rule, ts_ms: int, at_ms: int) -> bool:
    return at_ms - rule.window_ms < ts_ms <= at_ms


@dataclass(frozen=True)
class Row:
    """One row of the rule's result, with the query's columns."""

    cc: int
    agent_count: int
    host_names: tuple[str, ...]
    agent_ids: tuple[str, ...]
    executable: Optional[bytes]
    path: Optional[bytes]


@dataclass(frozen=True)
class Sighting:
    """An event as one agent reported it."""

    agent_id: str
    host_name: str
    event: FileEvent


def sort_rows(rows: Iterable[Row], limit: int) -> list[Row]:
    """Ascending cc; ties broken by key so output is deterministic."""
    key = lambda r: (r.cc, r.executable or b"", r.path or b"")  # noqa: E731
    return sorted(rows, key=key)[:limit]


def reference_rows(rule: Rule, sightings: Iterable[Sighting], at_ms: int) -> list[Row]:
    """The rule's rows at T over the union of every agent's events, the
    events an exception active at T matches left out."""
    groups: dict[tuple[Optional[bytes], Optional[bytes]], list[Sighting]] = {}
    excepted = ExceptionSet(rule.exceptions, at_ms)
    for s in sightings:
        ev = s.event
        if not (in_window(rule, ev.ts_ms, at_ms) and matches(rule, ev)):
            continue
        actor = (ev.process.name, ev.user.name, ev.user.id)
        exe = ev.process.executable
        if excepted and excepted.removes_event(exe, ev.path, s.host_name, s.agent_id, actor):
            continue
        groups.setdefault((ev.process.executable, ev.path), []).append(s)
    rows = []
    for (exe, path), group in groups.items():
        agents = sorted({s.agent_id for s in group})
        if len(agents) == rule.agent_count and len(group) < rule.count_below:
            hosts = tuple(sorted({s.host_name for s in group}))
            rows.append(Row(len(group), len(agents), hosts, tuple(agents), exe, path))
    return sort_rows(rows, rule.limit)


def row_document(row: Row) -> dict[str, object]:
    """A row as the query prints it (JSON-ready; bytes rendered, see events.render)."""
    return {
        "cc": row.cc,
        "agent_count": row.agent_count,
        "host.name": list(row.host_names),
        "agent.id": list(row.agent_ids),
        "process.executable": render(row.executable),
        "file.path": render(row.path),
    }


__all__: Sequence[str] = ("Rule", "Row", "Sighting", "matches", "reference_rows", "row_document")
