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
