"""What the continuous schedule keeps between its ticks, shared by both
stores (SQL with ``?`` placeholders; PostgreSQL swaps them for ``%s``):

- ``pair_changes``: one row per stored batch, the refs of the pairs it
  wrote, so a tick reads the pairs new events touched since the last one
  instead of the whole window. Its ``mark`` orders rows by commit: SQLite's
  AUTOINCREMENT id (one writer at a time), PostgreSQL's transaction id
  (read back from the snapshot's xmin: a batch that commits after a tick's
  snapshot has a transaction id at least that xmin).
- ``ticks``: per rule, the last tick's T, its mark, what the tick ran
  under (a fingerprint of the rule, the settle time and the exceptions
  active at T) and whether its rows were cut by the limit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable
from dataclasses import dataclass, replace
from typing import Optional

import msgpack

from agent.shared.rule import Rule

TICKS_SCHEMA = """
CREATE TABLE IF NOT EXISTS ticks (
    rule_id TEXT PRIMARY KEY,
    at_ms {int} NOT NULL,
    mark {int} NOT NULL,
    fingerprint TEXT NOT NULL,
    cut {int} NOT NULL
);
"""
TICK_SQL = "SELECT at_ms, mark, fingerprint, cut FROM ticks WHERE rule_id = ?"
TICK_SAVE_SQL = (
    "INSERT INTO ticks(rule_id, at_ms, mark, fingerprint, cut) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (rule_id) DO UPDATE SET at_ms = excluded.at_ms, mark = excluded.mark, "
    "fingerprint = excluded.fingerprint, cut = excluded.cut"
)
# the pairs with an event lo < ts <= hi (the window's edges, the settle edge)
PAIRS_BETWEEN_SQL = "SELECT DISTINCT pair FROM events WHERE ts > ? AND ts <= ?"
# the pairs whose alert of the rule leaves the window: they may alert again
ALERTS_BETWEEN_SQL = "SELECT DISTINCT exe, path FROM alerts WHERE rule_id = ? AND at_ms > ? AND at_ms <= ?"
INCREMENTAL_MAX_MS = 600_000  # a tick this long after the last one looks at the whole window


@dataclass(frozen=True)
class TickState:
    at_ms: int
    mark: int
    fingerprint: str
    cut: bool


def fingerprint(rule: Rule, settle_ms: int, active: Iterable[object]) -> str:
    """What a tick's result depends on besides the events: the rule's
    parameters, the settle time, the exceptions active at T."""
    text = repr((replace(rule, exceptions=()), settle_ms, tuple(active)))
    return hashlib.sha256(text.encode()).hexdigest()


def pack_refs(refs: Collection[int]) -> bytes:
    """SQLite's ``pair_changes.pairs``: the refs, msgpack."""
    return bytes(msgpack.packb(sorted(refs)))


def unpack_refs(blob: bytes) -> list[int]:
    return [int(r) for r in msgpack.unpackb(blob)]


def edges(last_ms: int, at_ms: int, window_ms: int, settle_ms: int) -> list[tuple[int, int]]:
    """The (lo, hi] ranges of event times whose pairs a tick at T looks at
    after one at ``last_ms``: events entering the window (an agent's clock
    ahead), leaving it, and passing the settle time."""
    return [
        (last_ms, at_ms),
        (last_ms - window_ms, at_ms - window_ms),
        (last_ms - settle_ms, at_ms - settle_ms),
    ]


def usable(state: Optional[TickState], at_ms: int, fp: str) -> bool:
    """May a tick at T work from ``state`` (what changed since), or must it
    look at the whole window? Whole: no state yet, the last tick cut rows
    (they wait in the window, not in the changes), anything it ran under
    differs, or T is before it or long after it."""
    return (
        state is not None
        and not state.cut
        and state.fingerprint == fp
        and state.at_ms <= at_ms <= state.at_ms + INCREMENTAL_MAX_MS
    )


# A pair count (up to count_below, newest first) as ranked_among reads it:
# (ref, events counted, the agents test, the oldest of those counted).
PairCount = tuple[int, int, bool, int]
BUSY_MAX = 1 << 20  # pairs the memo below remembers (about 100 MB at most)


class BusyPairs:
    """The pairs a tick need not count again yet: one found with count_below
    events or more, the oldest of its newest count_below at t_b, is no row
    while T - window < t_b (events are only added inside a window: pruning
    stops at retention, which is longer than the window). A path every server
    writes is counted about once a window, not every second. Per process, a
    cache of facts about stored events only: any collector may keep one."""

    def __init__(self) -> None:
        self._until: dict[tuple[int, int], dict[int, int]] = {}
        self._at = 0

    def _memo(self, rule: Rule, at_ms: int) -> dict[int, int]:
        if at_ms < self._at:  # a clock stepped back: what was learnt is about later windows
            self._until.clear()
        self._at = at_ms
        return self._until.setdefault((rule.window_ms, rule.count_below), {})

    def to_count(self, rule: Rule, at_ms: int, refs: Collection[int]) -> list[int]:
        """The pairs of ``refs`` that may be rows at T."""
        memo = self._memo(rule, at_ms)
        return [r for r in refs if memo.get(r, 0) <= at_ms]

    def rows(self, rule: Rule, at_ms: int, counts: Iterable[PairCount]) -> list[int]:
        """The pairs of ``counts`` that are rows at T; the busy ones are remembered."""
        memo = self._memo(rule, at_ms)
        if len(memo) > BUSY_MAX:
            memo.clear()
        low, out = max(1, rule.agent_count), []
        for ref, cc, agents_ok, oldest in counts:
            if cc >= rule.count_below:
                memo[ref] = oldest + rule.window_ms
            elif cc >= low and agents_ok:
                out.append(ref)
        return out
