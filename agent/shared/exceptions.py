"""Rule exceptions: named, admin-written conditions on an event's ECS fields
that take the event out of the rule before it is counted.

An exception matches an event when every field it names matches (AND), and
a field matches when any of its globs does (OR; globs are ES|QL LIKE, see
:mod:`agent.shared.like`). A field the event lacks matches no glob, so an
exception naming it does not apply to that event; a field listed under
``missing`` matches only when the event lacks it. An event that an active
exception matches is removed before the aggregation: the rule's query with

    and not ((f1 is not null and (f1 like g1 or f1 like g2)) and f2 ... and f3 is null)

added to its ``where`` for each exception. An exception with ``expires`` is
active for evaluation times before that instant.

The fields fall in three groups by where the collector finds them: the pair
(``process.executable`` and the ``file.*`` fields, known for every stored
event), the agent (``host.name``, ``agent.id``) and the actor
(``process.name``, ``user.name``, ``user.id``: sent with every event,
bare count times included, see :mod:`agent.shared.wire.format`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

from agent.shared.events import Actor
from agent.shared.like import like_regex

PAIR_FIELDS = ("process.executable", "file.path", "file.name", "file.directory", "file.extension")
AGENT_FIELDS = ("host.name", "agent.id")
ACTOR_FIELDS = ("process.name", "user.name", "user.id")
FIELDS = PAIR_FIELDS + AGENT_FIELDS + ACTOR_FIELDS

# Actor: (process.name, user.name, user.id) of an event; None where unknown
NO_ACTOR: Actor = (None, None, None)
PAIR_CACHE_MAX = 1 << 18  # pairs whose candidates are remembered (about 60 MB at most)


@dataclass(frozen=True)
class RuleException:
    """One exception: field -> globs, ANDed across fields."""

    name: str
    conditions: tuple[tuple[str, tuple[str, ...]], ...]
    expires_ms: Optional[int] = None
    comment: str = ""
    source: str = ""  # where the noise it removes is documented (shipped lists)
    missing: tuple[str, ...] = ()  # fields the event must lack ("f is null")

    def active_at(self, at_ms: int) -> bool:
        return self.expires_ms is None or at_ms < self.expires_ms

    def fields(self) -> dict[str, tuple[str, ...]]:
        return dict(self.conditions)


def text_of(value: Optional[bytes]) -> Optional[str]:
    """A file name as globs see it: UTF-8, undecodable bytes one character each."""
    return None if value is None else value.decode("utf-8", "surrogateescape")


def file_name(path: Optional[str]) -> Optional[str]:
    return None if path is None else path.rsplit("/", 1)[-1] or None


def file_directory(path: Optional[str]) -> Optional[str]:
    if path is None or "/" not in path:
        return None
    head = path.rsplit("/", 1)[0]
    return head or "/"


def file_extension(path: Optional[str]) -> Optional[str]:
    """What follows the name's last dot, without it (ECS; ``a.tar.gz``: ``gz``).
    A dot file has one too, as Beats and Go's filepath.Ext say (``.htaccess``:
    ``htaccess``), so it never shares a suppression key with the
    extensionless files of its folder."""
    name = file_name(path)
    if name is None or "." not in name:
        return None
    return name.rsplit(".", 1)[1] or None


def pair_values(exe: Optional[bytes], path: Optional[bytes]) -> dict[str, Optional[str]]:
    p = text_of(path)
    return {
        "process.executable": text_of(exe),
        "file.path": p,
        "file.name": file_name(p),
        "file.directory": file_directory(p),
        "file.extension": file_extension(p),
    }


def _field_regex(globs: Sequence[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{like_regex(g).pattern})" for g in globs), re.DOTALL)


Test = tuple[object, Optional[re.Pattern[str]]]  # (field key, its globs; None: must be missing)


class _Compiled:
    def __init__(self, exc: RuleException) -> None:
        conds: dict[str, Optional[re.Pattern[str]]] = {f: _field_regex(g) for f, g in exc.conditions}
        conds.update((f, None) for f in exc.missing)
        self.name = exc.name
        self.pair: list[Test] = [(f, conds[f]) for f in PAIR_FIELDS if f in conds]
        self.agent: list[Test] = [(f, conds[f]) for f in AGENT_FIELDS if f in conds]
        self.actor: list[Test] = [(i, conds[f]) for i, f in enumerate(ACTOR_FIELDS) if f in conds]

    @staticmethod
    def _all(tests: Iterable[Test], get: Mapping[object, Optional[str]]) -> bool:
        for key, rx in tests:
            v = get.get(key)
            if rx is None:
                if v is not None:
                    return False
            elif v is None or not rx.match(v):
                return False
        return True


class ExceptionSet:
    """The exceptions active at one evaluation time, compiled.

    The collector asks in two steps: :meth:`pair_candidates` once per pair
    (which exceptions could apply to it at all), then :meth:`removes` per
    event of the pairs that have candidates."""

    def __init__(self, exceptions: Iterable[RuleException], at_ms: int) -> None:
        self._all = [_Compiled(e) for e in exceptions if e.active_at(at_ms)]
        self._seen: dict[tuple[Optional[bytes], Optional[bytes]], tuple[int, ...]] = {}

    def __bool__(self) -> bool:
        return bool(self._all)

    def pair_candidates(self, exe: Optional[bytes], path: Optional[bytes]) -> tuple[int, ...]:
        """Indexes of the exceptions whose pair fields all match (exe, path)."""
        key = (exe, path)
        got = self._seen.get(key)
        if got is None:
            values: Mapping[object, Optional[str]] = pair_values(exe, path)  # type: ignore[assignment]
            got = tuple(i for i, c in enumerate(self._all) if c._all(c.pair, values))
            if len(self._seen) >= PAIR_CACHE_MAX:
                self._seen.clear()
            self._seen[key] = got
        return got

    def removes_all(self, candidates: Sequence[int]) -> bool:
        """Does one of ``candidates`` name only pair fields (so it removes
        every event of the pair, whoever wrote it)?"""
        return any(not self._all[i].agent and not self._all[i].actor for i in candidates)

    def removes(self, candidates: Sequence[int], host_name: str, agent_id: str, actor: Actor) -> bool:
        """Does one of ``candidates`` match the rest of the event?"""
        if not candidates:
            return False
        agent: Mapping[object, Optional[str]] = {"host.name": host_name, "agent.id": agent_id}
        who: Mapping[object, Optional[str]] = dict(enumerate(actor))
        for i in candidates:
            c = self._all[i]
            if c._all(c.agent, agent) and c._all(c.actor, who):
                return True
        return False

    def removes_event(
        self, exe: Optional[bytes], path: Optional[bytes], host_name: str, agent_id: str, actor: Actor
    ) -> bool:
        return self.removes(self.pair_candidates(exe, path), host_name, agent_id, actor)
