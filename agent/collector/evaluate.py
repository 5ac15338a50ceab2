"""The evaluator: the rule's rows at T, and alert documents built from them.

:func:`evaluate` is a pure function of the store and T. The two schedules,
:func:`run_hourly` and :func:`run_continuous`, decide which rows become
alerts and record them in the store, so a pair is never alerted twice in
overlapping windows and a restart never alerts again what was alerted.

An alert's id is ``sha256(rule_id, exe, path, bucket)`` with the bucket
``h:<T // schedule>`` for hourly runs and ``c:<first event time>`` for the
continuous schedule: the same run over the same data gives the same id.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Optional

from agent.collector import continuous, excepted, suppress
from agent.collector.enrichment import context_fields, with_notes
from agent.collector.storage import open_store, ticks
from agent.collector.storage.base import GapRow, Pair, RankedRow, Store, StoredEvent
from agent.shared.rule import Row, Rule
from agent.shared.rules import AnyRule
from agent.shared.text import dumps, iso, raw_base64, visible

log = logging.getLogger("rarewrite.collector.evaluate")

SEVERITY_NUMBER = {"low": 1, "medium": 2, "high": 3, "critical": 4}
CUT_COUNT_MAX = 10_000_000  # rows ranked to count what the limit cut
RunStats = dict[str, int]  # "cut": rows over the limit, "suppressed": rows folded
ECS_VERSION = "8.17.0"  # the ECS release the alert documents follow (tests/data/ecs_fields.json)


def evaluate(store: Store, rule: Rule, at_ms: int) -> list[Row]:
    """The rule's rows at T (window at_ms - window < ts <= at_ms), its
    exceptions active at T applied."""
    return excepted.rows(store, rule, at_ms)


def evaluate_db(db_path: str, rule: Rule, at_ms: int) -> list[Row]:
    """Open ``db_path`` (a SQLite file or a PostgreSQL URL) read-only (live
    servers may hold it) and evaluate.

    A missing file or one that is not a collector database raises StoreError.
    """
    store = open_store(db_path, readonly=True)
    try:
        return evaluate(store, rule, at_ms)
    finally:
        store.close()


def alert_id(rule_id: str, pair: Pair, bucket: str) -> str:
    h = hashlib.sha256()
    for part in (
        rule_id.encode(),
        b"-" if pair[0] is None else b"+" + pair[0],
        b"-" if pair[1] is None else b"+" + pair[1],
    ):
        h.update(len(part).to_bytes(8, "big") + part)
    h.update(bucket.encode())
    return h.hexdigest()


def threat_doc(rule: AnyRule) -> list[dict[str, Any]]:
    by_tactic: dict[str, dict[str, Any]] = {}
    for t in rule.threat:
        entry = by_tactic.setdefault(
            t.tactic_id,
            {
                "framework": "MITRE ATT&CK",
                "tactic": {
                    "id": t.tactic_id,
                    "name": t.tactic_name,
                    "reference": f"https://attack.mitre.org/tactics/{t.tactic_id}/",
                },
                "technique": [],
            },
        )
        tech: dict[str, Any] = {
            "id": t.technique_id,
            "name": t.technique_name,
            "reference": f"https://attack.mitre.org/techniques/{t.technique_id}/",
        }
        if t.subtechnique_id:
            sub_path = t.subtechnique_id.replace(".", "/")
            tech["subtechnique"] = [
                {
                    "id": t.subtechnique_id,
                    "name": t.subtechnique_name,
                    "reference": f"https://attack.mitre.org/techniques/{sub_path}/",
                }
            ]
        entry["technique"].append(tech)
    return list(by_tactic.values())


def _octal_mode(mode: Any) -> str:
    return f"{int(mode) & 0o7777:o}"


def _base64(data: Any) -> str:
    return base64.b64encode(data).decode()


def _same(value: Any) -> Any:
    return value


# (wire field, ECS field, conversion), in the order the document lists them.
_DETAIL_FIELDS: tuple[tuple[str, str, Callable[[Any], Any]], ...] = (
    ("etype", "event.type", list),
    ("pid", "process.pid", _same),
    ("pname", "process.name", _same),
    ("cmd", "process.command_line", _same),
    ("ppid", "process.parent.pid", _same),
    ("ppname", "process.parent.name", _same),
    ("ppexe", "process.parent.executable", visible),
    ("uname", "user.name", _same),
    ("uid", "user.id", _same),
    ("attr", "rarewrite.attribution", _same),
    ("orig", "file.Ext.original.path", visible),
    ("hpath", "rarewrite.file.host_path", visible),
    ("vpid", "rarewrite.process.vpid", _same),
)
# a container's event: its ``ctr`` map (wire field, ECS field)
_CONTAINER_FIELDS = (("id", "container.id"), ("rt", "container.runtime"), ("name", "container.name"),
                     ("image", "container.image.name"))  # fmt: skip
_FACT_FIELDS: tuple[tuple[str, str, Callable[[Any], Any]], ...] = (
    ("size", "file.size", _same),
    ("uid", "file.uid", str),  # ECS: keyword
    ("gid", "file.gid", str),
    ("mode", "file.mode", _octal_mode),
    ("sha256", "file.hash.sha256", _same),
    ("sample", "rarewrite.file.sample_base64", _base64),
    ("gone", "rarewrite.file.gone", bool),
)


def event_doc(ev: StoredEvent) -> dict[str, Any]:
    """One stored event of the pair, as the alert's original event (dotted ECS keys)."""
    doc: dict[str, Any] = {"@timestamp": iso(ev.ts), "agent.id": ev.agent_id, "host.name": ev.host_name}
    d = ev.detail
    if d is None:
        doc["rarewrite.detail"] = "count"  # sent as a count time: no detail by design
        return doc
    doc["event.action"] = d.get("action")
    doc.update((dst, conv(d[src])) for src, dst, conv in _DETAIL_FIELDS if d.get(src) is not None)
    ctr = d.get("ctr")
    if isinstance(ctr, dict):
        doc.update((dst, ctr[src]) for src, dst in _CONTAINER_FIELDS if ctr.get(src) is not None)
    for src, dst in (
        ("ppexe", "process.parent.executable"),
        ("orig", "file.Ext.original.path"),
        ("hpath", "rarewrite.file.host_path"),
    ):
        raw = raw_base64(d.get(src))
        if raw is not None:
            doc[f"rarewrite.raw_base64.{dst}"] = raw
    facts = d.get("file")
    if isinstance(facts, dict):
        doc.update((dst, conv(facts[src])) for src, dst, conv in _FACT_FIELDS if facts.get(src) is not None)
    ctx = d.get("ctx")
    if isinstance(ctx, dict):
        doc.update(context_fields(ctx))
    return doc


def alert_documents(
    rule: Rule,
    rows: Sequence[RankedRow],
    at_ms: int,
    store: Store,
    schedule: str = "hourly",
) -> list[dict[str, Any]]:
    """ECS alert documents for ``rows`` at T, enriched from the store."""
    lo = at_ms - rule.window_ms
    gaps = store.gaps_overlapping(lo, at_ms)
    docs = []
    for ranked in rows:
        row = ranked.row
        events = excepted.row_events(store, rule, row, lo, at_ms)
        doc = _alert_doc(rule, ranked, at_ms, schedule, events, gaps)
        with_notes(doc["rarewrite"]["events"], store.notes_for((row.executable, row.path), lo, at_ms))
        docs.append(doc)
    return docs


def _alert_doc(
    rule: Rule,
    ranked: RankedRow,
    at_ms: int,
    schedule: str,
    events: Sequence[StoredEvent],
    gaps: Sequence[GapRow],
) -> dict[str, Any]:
    row = ranked.row
    lo = at_ms - rule.window_ms
    pair = (row.executable, row.path)
    bucket = f"h:{at_ms // rule.schedule_ms}" if schedule == "hourly" else f"c:{ranked.first_ts}"
    exe, path, host = visible(row.executable), visible(row.path), ", ".join(row.host_names)
    # creation -> "creation", rename -> "change", as the original events say
    kinds = sorted({t for e in events if e.detail for t in e.detail.get("etype") or ()}) or ["creation"]
    doc: dict[str, Any] = {
        "@timestamp": iso(at_ms),
        "ecs": {"version": ECS_VERSION},
        "event": {
            "kind": "signal",  # what Elastic's own detection alerts carry
            "category": ["file"],
            "type": kinds,
            "module": "rarewrite",
            "severity": SEVERITY_NUMBER.get(rule.severity, 2),
            "risk_score": rule.risk_score,
        },
        "kibana": {
            "alert": kibana_alert(
                rule, alert_id(rule.rule_id, pair, bucket), ranked.first_ts, exe, path, host
            )
        },
        "rule": {
            "name": rule.name,
            "id": rule.rule_id,
            "uuid": rule_uuid(rule),
            "description": rule.description,
        },
        "tags": list(rule.tags),
        "threat": threat_doc(rule),
        "process": {"executable": exe},
        "file": {"path": path},
        "host": {"name": list(row.host_names)},
        "agent": {"id": list(row.agent_ids)},
        "rarewrite": _rarewrite_doc(ranked, at_ms, lo, schedule, events, gaps),
    }
    raw = {k: v for k, v in (("process.executable", raw_base64(row.executable)),
                             ("file.path", raw_base64(row.path))) if v is not None}  # fmt: skip
    if raw:  # names that are not UTF-8: the text escapes them (\xNN), these are the bytes
        doc["rarewrite"]["raw_base64"] = raw
    return doc


def _rarewrite_doc(
    ranked: RankedRow,
    at_ms: int,
    lo: int,
    schedule: str,
    events: Sequence[StoredEvent],
    gaps: Sequence[GapRow],
) -> dict[str, Any]:
    """What the ES|QL alert lacks: the rule's row, the original events, the gaps."""
    row = ranked.row
    return {
        "cc": row.cc,
        "agent_count": row.agent_count,
        "schedule": schedule,
        "window": {"start": iso(lo), "end": iso(at_ms)},
        "first_seen": iso(ranked.first_ts),
        "events": [event_doc(e) for e in events],
        "gap_on_other_agents": any(g.agent_id not in row.agent_ids for g in gaps),
        "gaps": [
            {
                "agent.id": g.agent_id,
                "start": iso(g.start_ms),
                "end": iso(g.end_ms),
                "lost": g.lost,
                "reason": g.reason,
            }
            for g in gaps
        ],
    }


def rule_uuid(rule: AnyRule) -> str:
    """A stable UUID for the rule (Kibana's ``kibana.alert.rule.uuid`` is a
    saved object's id; the rule's own id is ``rule_id``)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "rarewrite:rule:" + rule.rule_id))


def kibana_alert(
    rule: AnyRule, alert_uuid: str, first_ms: int, exe: Optional[str], path: Optional[str], host: str
) -> dict[str, Any]:
    """The ``kibana.alert.*`` fields of Elastic's detection alerts that apply here."""
    doc: dict[str, Any] = {
        "uuid": alert_uuid,
        "status": "active",
        "workflow_status": "open",
        "original_time": iso(first_ms),
        "reason": f"file event with process {exe}, file {path}, on {host} created {rule.severity} alert "
        f"{rule.name}.",
        "severity": rule.severity,
        "risk_score": rule.risk_score,
        "rule": {
            "name": rule.name,
            "rule_id": rule.rule_id,
            "uuid": rule_uuid(rule),
            "description": rule.description,
            "tags": list(rule.tags),
        },
    }
    if rule.building_block:
        doc["building_block_type"] = "default"
    return doc


def _record(
    store: Store,
    rule: Rule,
    ranked: Sequence[RankedRow],
    docs: list[dict[str, Any]],
    at_ms: int,
    stats: RunStats,
) -> list[dict[str, Any]]:
    """Record the run's alerts; return what goes to the outputs: the alerts
    raised, then suppressed alerts that grew (see agent.collector.suppress)."""
    if rule.suppress_by:
        raised, folded = suppress.record(store, rule, ranked, docs, at_ms)
        stats["suppressed"] = stats.get("suppressed", 0) + folded
        return raised + suppress.due_updates(store, rule, at_ms)
    items = [
        (
            str(doc["kibana"]["alert"]["uuid"]),
            (r.row.executable, r.row.path),
            at_ms,
            r.first_ts,
            dumps(doc),
            None,
        )
        for r, doc in zip(ranked, docs)
    ]
    new = set(store.record_alerts(rule.rule_id, items))
    return [doc for doc in docs if doc["kibana"]["alert"]["uuid"] in new]


def _whole_window(
    store: Store, rule: Rule, at_ms: int, settle_ms: Optional[int]
) -> tuple[list[RankedRow], int]:
    """The rows a run alerts, ranked over the whole window, and how many
    more the limit cut (call inside ``store.read()``)."""
    # The limit caps new alerts per run, so it applies after the pairs
    # already alerted are set aside; applied before, 100 old rows would
    # hide every new one for the rest of the window. The first
    # limit + len(alerted) rows hold at least limit rows of pairs not
    # alerted yet (or all there are); while the settle time sets more
    # aside, ask for twice as many. Same result as ranking every row,
    # without building every row.
    alerted = store.alerted_pairs(rule.rule_id, at_ms - rule.window_ms)
    want = rule.limit + len(alerted)
    while True:
        ranked = excepted.ranked_rows(store, replace(rule, limit=want), at_ms)
        fresh = continuous.fresh(ranked, alerted, at_ms, settle_ms)
        if len(fresh) > rule.limit or len(ranked) < want:
            break
        want *= 2
    if len(fresh) <= rule.limit:
        return fresh, 0
    # rows over the limit: count them (the next runs alert them)
    every = excepted.ranked_rows(store, replace(rule, limit=CUT_COUNT_MAX), at_ms)
    return fresh[: rule.limit], len(continuous.fresh(every, alerted, at_ms, settle_ms)) - rule.limit


def _documents(
    store: Store, rule: Rule, fresh: list[RankedRow], cut: int, at_ms: int, schedule: str, stats: RunStats
) -> list[dict[str, Any]]:
    docs = alert_documents(rule, fresh, at_ms, store, schedule)
    if cut:
        stats["cut"] = stats.get("cut", 0) + cut
        log.warning(
            "event=rows_cut rule_id=%s at=%s limit=%d cut=%d", rule.rule_id, iso(at_ms), rule.limit, cut
        )
        for doc in docs:
            doc["rarewrite"]["rows_cut"] = cut
    return docs


def _pick(
    store: Store, rule: Rule, at_ms: int, settle_ms: Optional[int], stats: RunStats
) -> tuple[list[RankedRow], list[dict[str, Any]]]:
    """The rows a run ranking the whole window alerts, and their documents."""
    with store.read():
        fresh, cut = _whole_window(store, rule, at_ms, settle_ms)
        schedule = "hourly" if settle_ms is None else "continuous"
        return fresh, _documents(store, rule, fresh, cut, at_ms, schedule, stats)


def run_hourly(
    store: Store, rule: Rule, at_ms: int, stats: Optional[RunStats] = None
) -> list[dict[str, Any]]:
    """One run of the rule's own schedule at T: alert every row whose pair was
    not alerted in an overlapping window (T - window, T]; return the new alerts.

    With several collectors on one database only one of them does a given
    run (the others get []), and its alerts commit all together or not at all.
    ``stats`` (if given) counts rows cut by the limit and rows suppressed."""
    stats = {} if stats is None else stats
    with store.schedule_run(rule.rule_id, "hourly", at_ms) as mine:
        if not mine:
            return []
        fresh, docs = _pick(store, rule, at_ms, None, stats)
        return _record(store, rule, fresh, docs, at_ms, stats)


def run_continuous(
    store: Store, rule: Rule, at_ms: int, settle_ms: int, stats: Optional[RunStats] = None
) -> list[dict[str, Any]]:
    """One tick of the continuous schedule: alert a row at T once its pair's
    first event in the window is at least ``settle_ms`` old, once per window.
    A tick another collector is running at the same moment is skipped. Rows
    the limit cut are alerted by the next ticks. A tick works from what
    changed since the last one when it can (agent.collector.continuous)."""
    stats = {} if stats is None else stats
    with store.schedule_run(rule.rule_id, "continuous", at_ms) as mine:
        if not mine:
            return []
        with store.read():
            mark = store.change_mark()  # first: what this snapshot holds of the changes
            last = store.tick_state(rule.rule_id)
            fp = ticks.fingerprint(rule, settle_ms, excepted.active(rule, at_ms))
            if last is not None and ticks.usable(last, at_ms, fp):
                fresh = continuous.changed_fresh(store, rule, at_ms, settle_ms, last)
                cut = max(0, len(fresh) - rule.limit)
                fresh = fresh[: rule.limit]
            else:
                fresh, cut = _whole_window(store, rule, at_ms, settle_ms)
            docs = _documents(store, rule, fresh, cut, at_ms, "continuous", stats)
        raised = _record(store, rule, fresh, docs, at_ms, stats)
        # saved after the alerts: a tick that fails before leaves the last state, a wider look next time
        store.save_tick(rule.rule_id, ticks.TickState(at_ms, mark, fp, cut > 0))
        return raised
