"""New terms at ingest: which records of a batch are each rule's, and which
of the new-terms rules' records are new.

The agent tags every record with the rules it matched (``rules`` and the
masks of :mod:`agent.shared.wire.format`); :func:`split` keeps the first
rule's records in the batch (the events table is that rule's alone, as it
always was) and makes a :data:`Candidate` of every record of a new-terms rule.

"New", exactly as the rule says: an event is new when no event of the same
rule with the same (``host``, ``process.executable``, ``file.path``) lies in
the history window before it: ``ts - previous > history``, ties counting as
seen. The store keeps one row per combination, its ``first_ts`` and
``last_ts`` (a run of events no two of which are more than the history
apart), updated in the batch's own transaction, so a resent batch changes
nothing and a restart loses nothing; :func:`decide` is the rule on that row.
Agents ship their events in time order, and for events in time order it is
exact. A late event (before its run's newest) is new only if it comes before
the run's first event; an alert already raised stays raised.

The host is the authenticated agent (``host.id`` from the batch is reported
in alerts, but one agent cannot claim another host's history): the same as
the rule wherever one agent runs per host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple, Optional, Union

from agent.shared import wire
from agent.shared.rule import Rule
from agent.shared.rules import NewTermsRule, OutbreakRule


class Candidate(NamedTuple):
    """A record of a new-terms rule: an event (``detail`` set) or a count time."""

    rule_id: str
    history_ms: int
    pair: bytes  # wire.pair_key(exe, path)
    ts: int
    exe: Optional[bytes]
    path: Optional[bytes]
    detail: Optional[bytes]  # packed, as the events table holds it
    actor: Optional[bytes]  # wire.actor_key


Run = tuple[int, int]  # (first_ts, last_ts) of a combination's run


def split(
    batch: wire.RowBatch, first: Rule, others: Sequence[Union[NewTermsRule, OutbreakRule]]
) -> tuple[wire.RowBatch, list[Candidate]]:
    """The batch with only the first rule's records, and the new-terms rules'
    candidates in batch order. A batch without ``rules`` (an older agent) is
    the first rule's alone."""
    if not batch.rules:
        return (batch, []) if first.enabled else (replace(batch, events=(), counts=()), [])
    first_bit = _bit(batch.rules, first.rule_id) if first.enabled else 0
    new_terms = [
        (r, _bit(batch.rules, r.rule_id)) for r in others if isinstance(r, NewTermsRule) and r.enabled
    ]
    new_terms = [(r, b) for r, b in new_terms if b]
    cands: list[Candidate] = []
    for rule, bit in new_terms:
        for (ts, key, exe, path, detail, actor), mask in zip(batch.events, batch.event_rules):
            if mask & bit and exe and path:
                cands.append(Candidate(rule.rule_id, rule.history_ms, key, ts, exe, path, detail, actor))
        for (key, exe, path, times, actor), mask in zip(batch.counts, batch.count_rules):
            if mask & bit and exe and path:
                cands.extend(
                    Candidate(rule.rule_id, rule.history_ms, key, t, exe, path, None, actor) for t in times
                )
    if len(new_terms) > 1 or batch.counts:
        cands.sort(key=lambda c: c.ts)  # stable: the agent's order where times tie
    events = tuple(e for e, m in zip(batch.events, batch.event_rules) if m & first_bit)
    counts = tuple(c for c, m in zip(batch.counts, batch.count_rules) if m & first_bit)
    if len(events) == len(batch.events) and len(counts) == len(batch.counts):
        return batch, cands
    return replace(batch, events=events, counts=counts), cands


def _bit(rules: tuple[str, ...], rule_id: str) -> int:
    return 1 << rules.index(rule_id) if rule_id in rules else 0


def decide(run: Optional[Run], ts: int, history_ms: int) -> tuple[bool, Run]:
    """Is an event at ``ts`` new, given its combination's stored run; the run after it."""
    if run is None:
        return True, (ts, ts)
    first, last = run
    if ts > last:
        if ts - last > history_ms:
            return True, (ts, ts)  # a new run: nothing in the history before it
        return False, (first, ts)
    if ts >= first:
        return False, run
    if first - ts > history_ms:
        return True, run  # an older, separate run: keep the newer one
    return True, (ts, last)  # late, before the run began (the run's first event stays alerted)


def new_candidates(
    cands: Sequence[Candidate], stored: dict[tuple[str, bytes], Optional[Run]]
) -> tuple[list[Candidate], dict[tuple[str, bytes], Run]]:
    """Walk the candidates in order over the stored runs (``stored`` holds the
    row of each (rule, pair), None when there is none): the new ones, and
    each changed run to write back."""
    runs = dict(stored)
    changed: dict[tuple[str, bytes], Run] = {}
    hits = []
    for c in cands:
        k = (c.rule_id, c.pair)
        is_new, after = decide(runs.get(k), c.ts, c.history_ms)
        if is_new:
            hits.append(c)
        if after != runs.get(k):
            runs[k] = changed[k] = after
    return hits, changed
