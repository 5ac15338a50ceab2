"""Which rows a tick of the continuous schedule alerts.

A row is alerted once its pair's first event in the window is at least
``settle_ms`` old, once per window. A tick every second used to rank the
whole window; now, when the last tick's state allows it
(agent.collector.storage.ticks.usable), a tick looks only at the pairs whose
row or standing may have changed since that tick (``Store.tick_candidates``):
a pair none of those touch has the same events in the window, the same
first event time and, but for the alerts the last tick raised, the same
alerts as then, so it was either alerted by the last tick or is still not
alertable. The result is the whole-window pick's, at a cost that grows with
the new events, not with the window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from agent.collector import excepted
from agent.collector.storage.base import Pair, RankedRow, Store
from agent.collector.storage.ticks import TickState
from agent.shared.rule import Rule


def fresh(
    ranked: Sequence[RankedRow], alerted: set[Pair], at_ms: int, settle_ms: Optional[int]
) -> list[RankedRow]:
    """The rows of pairs not alerted yet whose first event has settled (any, for hourly runs)."""
    return [
        r
        for r in ranked
        if (r.row.executable, r.row.path) not in alerted
        and (settle_ms is None or r.first_ts <= at_ms - settle_ms)
    ]


def changed_fresh(store: Store, rule: Rule, at_ms: int, settle_ms: int, last: TickState) -> list[RankedRow]:
    """Every row at T that a tick may alert, in the rule's order, from what
    changed since the tick ``last`` (call inside ``store.read()``)."""
    refs = store.tick_candidates(rule.rule_id, last, at_ms, rule.window_ms, settle_ms)
    ranked = excepted.ranked_among(store, rule, at_ms, refs)
    pairs = [(r.row.executable, r.row.path) for r in ranked]
    alerted = store.alerted_among(rule.rule_id, at_ms - rule.window_ms, pairs) if pairs else set()
    return fresh(ranked, alerted, at_ms, settle_ms)
