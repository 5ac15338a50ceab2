"""The new-terms and outbreak rules at the collector: their rows at T, their
alert documents, and their runs (each new event or outbreak alerted once).

New terms are decided at ingest (:mod:`agent.collector.terms`); what is left
here is reading them:

- :func:`new_terms_rows`: the rule's new events with T - lookback < ts <= T
  (what ``collector evaluate --rule via-web-server --at T`` prints);
- :func:`outbreak_rows`: (executable, path) pairs whose new events of the
  source rule in (T - within, T] come from at least ``hosts`` agents;
- :func:`run_new_terms`: alert every new event received since the last run
  (a late batch still alerts, as Elastic's ``event.ingested`` override
  intends), unless its time is older than the retention (a replay of
  recorded data that seeds the history raises nothing);
- :func:`run_outbreak`: alert each outbreak row at T, at most once per pair
  per ``within``.

Alert ids are derived from what was found (the event, or the pair and its
first host's event), so replicas and restarts never raise one twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from agent.collector import evaluate as ev
from agent.collector.enrichment import with_notes
from agent.collector.storage import open_store
from agent.collector.storage.base import Pair, Store, StoredEvent, TermHit
from agent.shared.exceptions import file_extension, text_of
from agent.shared.rules import AnyRule, NewTermsRule, OutbreakRule
from agent.shared.text import dumps, iso, raw_base64, visible

NEW_TERMS_FIELDS = ("file.path", "host.id", "process.executable")


@dataclass(frozen=True)
class OutbreakRow:
    exe: Optional[bytes]
    path: Optional[bytes]
    hits: tuple[TermHit, ...]  # the first new event of each agent, oldest first

    @property
    def first_ts(self) -> int:
        return self.hits[0].ts


def new_terms_rows(store: Store, rule: NewTermsRule, at_ms: int) -> list[TermHit]:
    return store.term_hits(rule.rule_id, at_ms - rule.lookback_ms, at_ms)


def outbreak_rows(store: Store, rule: OutbreakRule, source: NewTermsRule, at_ms: int) -> list[OutbreakRow]:
    groups: dict[tuple[Optional[bytes], Optional[bytes]], dict[str, TermHit]] = {}
    for hit in store.term_hits(source.rule_id, at_ms - rule.within_ms, at_ms, on_hosts=rule.hosts):
        groups.setdefault((hit.exe, hit.path), {}).setdefault(hit.agent_id, hit)
    # on_hosts: the store keeps only pairs new on that many agents (grouped in SQL)
    rows = [OutbreakRow(exe, path, tuple(by_agent.values())) for (exe, path), by_agent in groups.items()]
    return sorted(rows, key=lambda r: (r.first_ts, r.exe or b"", r.path or b""))


def evaluate_other_db(
    db_path: str, rule: Union[NewTermsRule, OutbreakRule], rules: Sequence[Any], at_ms: int
) -> list[dict[str, Any]]:
    """``collector evaluate --rule``: the rule's rows at T as JSON-ready documents
    (the database opened read-only, as for the first rule)."""
    store = open_store(db_path, readonly=True)
    try:
        if isinstance(rule, NewTermsRule):
            return [new_terms_document(h) for h in new_terms_rows(store, rule, at_ms)]
        source = next((r for r in rules if isinstance(r, NewTermsRule) and r.key == rule.source), None)
        if source is None:
            return []
        return [outbreak_document(r) for r in outbreak_rows(store, rule, source, at_ms)]
    finally:
        store.close()


# ------------------------------------------------------------ documents


def new_terms_document(hit: TermHit) -> dict[str, Any]:
    """A new event as ``collector evaluate`` prints it (one JSON line)."""
    d = hit.detail or {}
    pname, uname, uid = hit.actor
    return {
        "@timestamp": iso(hit.ts),
        "event.ingested": iso(hit.received_ms),
        "event.action": d.get("action"),
        "host.id": hit.host_id,
        "host.name": hit.host_name,
        "agent.id": hit.agent_id,
        "process.executable": visible(hit.exe),
        "process.name": pname,
        "user.name": uname,
        "user.id": uid,
        "file.path": visible(hit.path),
        "file.extension": file_extension(text_of(hit.path)),
    }


def outbreak_document(row: OutbreakRow) -> dict[str, Any]:
    return {
        "host_count": len(row.hits),
        "host.name": [h.host_name for h in row.hits],
        "host.id": [h.host_id for h in row.hits],
        "agent.id": [h.agent_id for h in row.hits],
        "process.executable": visible(row.exe),
        "file.path": visible(row.path),
        "first_seen": iso(row.first_ts),
        "last_seen": iso(row.hits[-1].ts),
    }


def _stored(hit: TermHit) -> StoredEvent:
    return StoredEvent(hit.ts, hit.agent_id, hit.host_name, hit.detail, hit.actor)


def _hash(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big") + part)
    return h.hexdigest()


def _opt(b: Optional[bytes]) -> bytes:
    return b"-" if b is None else b"+" + b


def hit_alert_id(rule_id: str, hit: TermHit) -> str:
    return _hash(rule_id.encode(), hit.agent_id.encode(), _opt(hit.exe), _opt(hit.path), str(hit.ts).encode())


def _base_doc(
    rule: AnyRule, alert_uuid: str, at_ms: int, first_ms: int, pair: Pair, hosts: str
) -> dict[str, Any]:
    """What every alert of these rules carries: ECS, the rule, the pair."""
    exe, path = pair
    doc: dict[str, Any] = {
        "@timestamp": iso(at_ms),
        "ecs": {"version": ev.ECS_VERSION},
        "event": {
            "kind": "signal",
            "category": ["file"],
            "module": "rarewrite",
            "severity": ev.SEVERITY_NUMBER.get(rule.severity, 2),
            "risk_score": rule.risk_score,
        },
        "kibana": {"alert": ev.kibana_alert(rule, alert_uuid, first_ms, visible(exe), visible(path), hosts)},
        "rule": {
            "name": rule.name,
            "id": rule.rule_id,
            "uuid": ev.rule_uuid(rule),
            "description": rule.description,
        },
        "tags": list(rule.tags),
        "threat": ev.threat_doc(rule),
        "process": {"executable": visible(exe)},
        "file": {"path": visible(path), "extension": file_extension(text_of(path))},
    }
    raw = {k: v for k, v in (("process.executable", raw_base64(exe)), ("file.path", raw_base64(path))) if v}
    if raw:
        doc["rarewrite"] = {"raw_base64": raw}
    return doc


def new_terms_alert(rule: NewTermsRule, hit: TermHit, at_ms: int) -> dict[str, Any]:
    doc = _base_doc(rule, hit_alert_id(rule.rule_id, hit), at_ms, hit.ts, (hit.exe, hit.path), hit.host_name)
    kinds = (hit.detail or {}).get("etype") or ["creation"]
    doc["event"]["type"] = list(kinds)
    doc["kibana"]["alert"]["new_terms"] = [visible(hit.path), hit.host_id, visible(hit.exe)]
    doc["host"] = {"name": [hit.host_name], "id": [hit.host_id]}
    doc["agent"] = {"id": [hit.agent_id]}
    doc.setdefault("rarewrite", {}).update(
        {
            "new_terms": {
                "fields": list(NEW_TERMS_FIELDS),
                "history_window_ms": rule.history_ms,
                "received": iso(hit.received_ms),
            },
            "first_seen": iso(hit.ts),
            "events": [ev.event_doc(_stored(hit))],
        }
    )
    return doc


def outbreak_alert(rule: OutbreakRule, row: OutbreakRow, at_ms: int) -> dict[str, Any]:
    first = row.hits[0]
    alert_uuid = _hash(rule.rule_id.encode(), _opt(row.exe), _opt(row.path), str(first.ts).encode())
    hosts = ", ".join(h.host_name for h in row.hits)
    doc = _base_doc(rule, alert_uuid, at_ms, row.first_ts, (row.exe, row.path), hosts)
    doc["event"]["type"] = ["creation"]
    doc["host"] = {"name": [h.host_name for h in row.hits], "id": [h.host_id for h in row.hits]}
    doc["agent"] = {"id": [h.agent_id for h in row.hits]}
    doc.setdefault("rarewrite", {}).update(
        {
            "outbreak": {
                "host_count": len(row.hits),
                "hosts_at_least": rule.hosts,
                "within_ms": rule.within_ms,
            },
            "first_seen": iso(row.first_ts),
            "last_seen": iso(row.hits[-1].ts),
            "events": [ev.event_doc(_stored(h)) for h in row.hits],
        }
    )
    return doc


# ------------------------------------------------------------ runs


def _record(
    store: Store, rule_id: str, found: Sequence[tuple[dict[str, Any], Pair, int]], at_ms: int
) -> list[dict[str, Any]]:
    """Store (document, pair, first event time) as alerts; return the documents new to the store."""
    items = [
        (str(doc["kibana"]["alert"]["uuid"]), pair, at_ms, first, dumps(doc), None)
        for doc, pair, first in found
    ]
    new = set(store.record_alerts(rule_id, items))
    return [doc for doc, _, _ in found if doc["kibana"]["alert"]["uuid"] in new]


def run_new_terms(
    store: Store,
    rule: NewTermsRule,
    now_ms: int,
    since_ms: int,
    retention_ms: int,
    raised: Optional[dict[str, int]] = None,
) -> list[dict[str, Any]]:
    """Alert the new events received in (since, now] whose time is within the
    retention; return the alerts not raised before. ``raised`` (alert id ->
    received time), kept by the caller from run to run, lets the hits of an
    overlap already alerted be passed over without building their documents."""
    hits = [
        h
        for h in store.term_hits(rule.rule_id, since_ms, now_ms, by_received=True)
        if h.ts > now_ms - retention_ms
    ]
    ids = [hit_alert_id(rule.rule_id, h) for h in hits]
    if raised is not None:
        for old in [k for k, received in raised.items() if received <= since_ms]:
            del raised[old]
        fresh = [(h, i) for h, i in zip(hits, ids) if i not in raised]
        hits, ids = [h for h, _ in fresh], [i for _, i in fresh]
    found = [(new_terms_alert(rule, h, now_ms), (h.exe, h.path), h.ts) for h in hits]
    for doc, pair, ts in found:
        with_notes(doc["rarewrite"]["events"], store.notes_for(pair, ts, ts))
    out = _record(store, rule.rule_id, found, now_ms)
    if raised is not None:  # recorded (or recorded before): not to be built again
        raised.update((i, h.received_ms) for h, i in zip(hits, ids))
    return out


def run_outbreak(store: Store, rule: OutbreakRule, source: NewTermsRule, now_ms: int) -> list[dict[str, Any]]:
    """Alert the outbreak rows at ``now``, a pair at most once per ``within``."""
    alerted = store.alerted_pairs(rule.rule_id, now_ms - rule.within_ms)
    rows = [r for r in outbreak_rows(store, rule, source, now_ms) if (r.exe, r.path) not in alerted]
    found = [(outbreak_alert(rule, r, now_ms), (r.exe, r.path), r.first_ts) for r in rows]
    for (doc, pair, first), r in zip(found, rows):
        with_notes(doc["rarewrite"]["events"], store.notes_for(pair, first, r.hits[-1].ts))
    return _record(store, rule.rule_id, found, now_ms)
