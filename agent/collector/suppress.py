"""Alert suppression, as Elastic's detection rules do it (``[rule]
suppress_by``, ``suppress_for``, ``suppress_missing``).

The first row of a suppression key raises an alert; a later row with the
same key within ``suppress_for`` of that alert raises none: it is recorded as
folded into it (so it is never alerted again either), counted in the
alert's ``kibana.alert.suppression.docs_count`` and listed in
``rarewrite.suppressed``. The grown alert (same ``kibana.alert.uuid``) goes
to every output again, at most once a minute.

A key is the row's values of the ``suppress_by`` fields, nothing else: rows
that differ in any of them (another extension, another directory) are never
folded together. With ``suppress_missing = do_not_suppress`` a row missing a
value is never folded; with ``suppress`` (the default, Elastic's too) the
missing value is one more value.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Optional

from agent.collector.storage.base import AlertItem, RankedRow, Store
from agent.shared.exceptions import pair_values
from agent.shared.rule import Row, Rule
from agent.shared.text import dumps, iso

SEND_EVERY_MS = 60_000  # a growing alert is sent again at most this often
LISTED_MAX = 100  # folded rows listed on an alert (all are counted)


def terms(rule: Rule, row: Row) -> list[dict[str, Any]]:
    """Elastic's ``kibana.alert.suppression.terms`` for a row."""
    values: dict[str, Any] = dict(pair_values(row.executable, row.path))
    values["host.name"] = list(row.host_names)
    values["agent.id"] = list(row.agent_ids)
    return [{"field": f, "value": values[f]} for f in rule.suppress_by]


def key(rule: Rule, row_terms: list[dict[str, Any]]) -> Optional[bytes]:
    """The suppression key of a row, or None when it is not to be folded."""
    if rule.suppress_missing == "do_not_suppress" and any(t["value"] in (None, []) for t in row_terms):
        return None
    return json.dumps([rule.rule_id, row_terms], ensure_ascii=True, sort_keys=True).encode()


def _start(doc: dict[str, Any], row_terms: list[dict[str, Any]], first_ts: int) -> None:
    doc["kibana"]["alert"]["suppression"] = {
        "terms": row_terms,
        "docs_count": 0,
        "start": iso(first_ts),
        "end": iso(first_ts),
    }
    doc["rarewrite"]["suppressed"] = []


def _fold(parent: dict[str, Any], child: dict[str, Any], ranked: RankedRow, at_ms: int) -> None:
    sup = parent["kibana"]["alert"]["suppression"]
    sup["docs_count"] += 1
    sup["end"] = max(sup["end"], iso(ranked.first_ts))
    parent["kibana"]["alert"]["last_detected"] = iso(at_ms)
    listed = parent["rarewrite"].setdefault("suppressed", [])
    if len(listed) < LISTED_MAX:
        listed.append(
            {
                "kibana.alert.uuid": child["kibana"]["alert"]["uuid"],
                "process.executable": child["process"]["executable"],
                "file.path": child["file"]["path"],
                "host.name": child["host"]["name"],
                "first_seen": iso(ranked.first_ts),
                "cc": ranked.row.cc,
            }
        )


def record(
    store: Store, rule: Rule, ranked: Sequence[RankedRow], docs: Sequence[dict[str, Any]], at_ms: int
) -> tuple[list[dict[str, Any]], int]:
    """Record a run's alerts, folding what suppression folds; return the
    alerts raised (new) and how many rows were folded."""
    raised: list[dict[str, Any]] = []
    parents: dict[bytes, tuple[str, dict[str, Any]]] = {}
    folded = 0
    for r, doc in zip(ranked, docs):
        alert_id = str(doc["kibana"]["alert"]["uuid"])
        row_terms = terms(rule, r.row)
        skey = key(rule, row_terms)
        parent = _parent(store, rule, skey, at_ms, parents)
        if parent is None:
            if skey is not None:
                _start(doc, row_terms, r.first_ts)
        else:
            _fold(parent[1], doc, r, at_ms)
        item: AlertItem = (alert_id, (r.row.executable, r.row.path), at_ms, r.first_ts, dumps(doc), skey)
        if parent is None:
            if store.record_alerts(rule.rule_id, [item]):
                raised.append(doc)
                if skey is not None:
                    parents[skey] = (alert_id, doc)
        elif store.fold_alert(rule.rule_id, item, parent[0], dumps(parent[1])):
            folded += 1
    return raised, folded


def _parent(
    store: Store,
    rule: Rule,
    skey: Optional[bytes],
    at_ms: int,
    parents: dict[bytes, tuple[str, dict[str, Any]]],
) -> Optional[tuple[str, dict[str, Any]]]:
    if skey is None:
        return None
    if skey not in parents:
        got = store.suppression_parent(rule.rule_id, skey, at_ms - rule.suppress_for_ms)
        if got is None:
            return None
        parents[skey] = (got[0], json.loads(got[1]))
    return parents[skey]


def due_updates(store: Store, rule: Rule, now_ms: int) -> list[dict[str, Any]]:
    """The grown alerts not sent for a minute: to send again (marked sent)."""
    due = store.suppressed_due(rule.rule_id, now_ms - SEND_EVERY_MS)
    if due:
        store.mark_emitted([a for a, _ in due], now_ms)
    return [json.loads(d) for _, d in due]
