"""The rule's rows with its exceptions applied: the query with each active
exception's ``and not (...)`` in its ``where`` (see agent.shared.exceptions).

Pairs an exception could touch (its file and executable conditions match
the pair) are left out of the store's own ranked walk, which counts every
other pair exactly as without exceptions. Of those, a pair an exception
names by pair fields only has no event left; the rest are counted here,
event by event, by who wrote each event. The two lists merge in the rule's
order (cc, then exe, then path).

Who wrote an event (process.name, user.*) is stored with it from schema 3
on (SQLite) / 2 (PostgreSQL); events stored before have none, so an
exception on those fields does not remove them.
"""

from __future__ import annotations

from agent.collector.storage.base import PairRef, RankedRow, Store, StoredEvent
from agent.shared.exceptions import ExceptionSet, RuleException
from agent.shared.rule import Row, Rule

# A pair of a row has fewer than count_below events left; it may have had
# many excepted ones, so its events are read up to this many.
EVENTS_READ_MAX = 100_000
_SETS: dict[tuple[RuleException, ...], ExceptionSet] = {}  # kept across ticks: its pair cache too


def active(rule: Rule, at_ms: int) -> tuple[RuleException, ...]:
    """The rule's exceptions active at T."""
    return tuple(x for x in rule.exceptions if x.active_at(at_ms))


def exception_set(rule: Rule, at_ms: int) -> ExceptionSet:
    """The compiled exceptions active at T, the same object while they are
    the same (the continuous schedule asks every second about mostly the
    same pairs: each pair's glob matching is done once)."""
    active_now = active(rule, at_ms)
    got = _SETS.get(active_now)
    if got is None:
        if len(_SETS) >= 8:
            _SETS.clear()
        got = _SETS[active_now] = ExceptionSet(active_now, at_ms)
    return got


def _order(r: RankedRow) -> tuple[int, bytes, bytes]:
    # exe and path are never b"" (the wire refuses empty names): None sorts first as in SQL
    return (r.row.cc, r.row.executable or b"", r.row.path or b"")


def ranked_rows(store: Store, rule: Rule, at_ms: int) -> list[RankedRow]:
    """The rule's rows at T, exceptions applied, each with its first event time."""
    excepted = exception_set(rule, at_ms)
    if not excepted:
        return store.ranked_rows(rule, at_ms)
    lo = at_ms - rule.window_ms
    touched, partial = _split(excepted, store.pairs_since(lo))
    rows = store.ranked_rows(rule, at_ms, skip=touched)
    rows.extend(_touched_rows(store, rule, excepted, partial, lo, at_ms))
    rows.sort(key=_order)
    return rows[: rule.limit]


def ranked_among(store: Store, rule: Rule, at_ms: int, refs: set[int]) -> list[RankedRow]:
    """Every row at T among the pairs ``refs`` (a continuous tick's), exceptions applied."""
    excepted = exception_set(rule, at_ms)
    if not excepted:
        return store.ranked_among(rule, at_ms, refs)
    touched, partial = _split(excepted, store.pair_refs(refs))
    rows = store.ranked_among(rule, at_ms, refs.difference(touched))
    rows.extend(_touched_rows(store, rule, excepted, partial, at_ms - rule.window_ms, at_ms))
    rows.sort(key=_order)
    return rows


def _split(
    excepted: ExceptionSet, pairs: list[PairRef]
) -> tuple[list[int], dict[int, tuple[PairRef, tuple[int, ...]]]]:
    """The pairs an exception could touch (the store's count leaves them
    out) and, of those, the ones counted here event by event."""
    touched: list[int] = []
    partial: dict[int, tuple[PairRef, tuple[int, ...]]] = {}
    for p in pairs:
        candidates = excepted.pair_candidates(p[1], p[2])
        if candidates:
            touched.append(p[0])
            if not excepted.removes_all(candidates):  # who wrote each event decides
                partial[p[0]] = (p, candidates)
    return touched, partial


def _touched_rows(
    store: Store,
    rule: Rule,
    excepted: ExceptionSet,
    touched: dict[int, tuple[PairRef, tuple[int, ...]]],
    lo: int,
    at_ms: int,
) -> list[RankedRow]:
    if not touched:
        return []
    kept: dict[int, list[tuple[int, str, str]]] = {}
    for ev in store.window_events(list(touched), lo, at_ms):
        if not excepted.removes(touched[ev.pair][1], ev.host_name, ev.agent_id, ev.actor):
            kept.setdefault(ev.pair, []).append((ev.ts, ev.agent_id, ev.host_name))
    out = []
    for ref, events in kept.items():
        agents = sorted({a for _, a, _ in events})
        if len(agents) != rule.agent_count or len(events) >= rule.count_below:
            continue
        _, exe, path = touched[ref][0]
        hosts = tuple(sorted({h for _, _, h in events}))
        row = Row(len(events), len(agents), hosts, tuple(agents), exe, path)
        out.append(RankedRow(row, min(t for t, _, _ in events)))
    return out


def rows(store: Store, rule: Rule, at_ms: int) -> list[Row]:
    return [r.row for r in ranked_rows(store, rule, at_ms)]


def row_events(store: Store, rule: Rule, row: Row, lo_ms: int, at_ms: int) -> list[StoredEvent]:
    """The events of a row (up to count_below, oldest first), excepted ones left out."""
    pair = (row.executable, row.path)
    excepted = exception_set(rule, at_ms)
    candidates = excepted.pair_candidates(*pair) if excepted else ()
    if not candidates:
        return store.pair_events(pair, lo_ms, at_ms, rule.count_below)
    got = store.pair_events(pair, lo_ms, at_ms, EVENTS_READ_MAX)
    kept = [e for e in got if not excepted.removes(candidates, e.host_name, e.agent_id, e.actor)]
    return kept[: rule.count_below]
