"""The documents that come after an alert, and the actions it asks of an
agent: a follow-up when its file is requested later (the attacker calling
the shell), what an agent did about it (quarantine), and the quarantine
actions queued for a rule with ``quarantine = yes``.

They go through every output like alerts, with ``event.action``
``alert_followup`` or ``quarantine`` and ``rarewrite.followup.alert_id`` /
``rarewrite.response.alert`` naming the alert; their ids are derived from
what they are about, so a resent note never makes a second one.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Collection, Iterable, Sequence
from typing import Any, Optional

import msgpack

from agent.collector.enrichment import request_fields
from agent.collector.evaluate import ECS_VERSION
from agent.collector.storage.base import AgentRecord, Store
from agent.collector.storage.notes import Action, ActionRow
from agent.shared.text import iso, visible

FOLLOWUP_RULE_ID = "rarewrite-alert-followup"
ACTION_RULE_ID = "rarewrite-response"
NoteItem = tuple[int, Optional[bytes], Optional[bytes], str, dict[str, Any]]


def _response_doc(
    action: str, doc_id: str, at_ms: int, agent_id: str, host_name: str, reason: str, severity: str
) -> dict[str, Any]:
    rule_id = FOLLOWUP_RULE_ID if action == "alert_followup" else ACTION_RULE_ID
    rule_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, "rarewrite:rule:" + rule_id))
    return {
        "@timestamp": iso(at_ms),
        "ecs": {"version": ECS_VERSION},
        "event": {
            "kind": "signal",
            "category": ["web" if action == "alert_followup" else "file"],
            "type": ["info"],
            "module": "rarewrite",
            "action": action,
        },
        "message": reason,
        "kibana": {
            "alert": {
                "uuid": doc_id,
                "status": "active",
                "workflow_status": "open",
                "original_time": iso(at_ms),
                "reason": reason,
                "severity": severity,
                "rule": {"name": rule_id, "rule_id": rule_id, "uuid": rule_uuid},
            }
        },
        "rule": {"name": rule_id, "id": rule_id, "uuid": rule_uuid},
        "host": {"name": [host_name]},
        "agent": {"id": [agent_id]},
    }


def _file_fields(exe: Optional[bytes], path: Optional[bytes]) -> dict[str, Any]:
    return {"process": {"executable": visible(exe)}, "file": {"path": visible(path)}}


def followup_docs(
    agent_id: str,
    host_name: str,
    note: NoteItem,
    alerts: Iterable[tuple[str, str]],
    now_ms: int,
) -> list[dict[str, Any]]:
    """One ``alert_followup`` document per alert the note's event is in."""
    ts, exe, path, _, body = note
    reqs = [request_fields(r) for r in body.get("reqs", ())]
    out = []
    for alert_id, rule_id in alerts:
        key = "|".join(
            (alert_id, agent_id, str(ts), *(r["@timestamp"] + r.get("url.original", "") for r in reqs))
        )
        doc_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "rarewrite:followup:" + key))
        first = reqs[0] if reqs else {}
        reason = (
            f"after alert {alert_id}: {len(reqs)} request(s) for {visible(path)} on {host_name}"
            + (f", first {first.get('http.request.method', '?')} {first.get('url.original', '')} from "
               f"{first.get('source.ip', '?')} status {first.get('http.response.status_code', '?')}"
               if first else "")
        )  # fmt: skip
        doc = _response_doc("alert_followup", doc_id, now_ms, agent_id, host_name, reason, "high")
        doc.update(_file_fields(exe, path))
        doc["rarewrite"] = {
            "followup": {"alert_id": alert_id, "rule_id": rule_id, "event_time": iso(ts), "requests": reqs}
        }
        out.append(doc)
    return out


def action_doc(
    agent_id: str, host_name: str, note: NoteItem,
    now_ms: int,
) -> dict[str, Any]:  # fmt: skip
    """What an agent reports it did about an alert (quarantined, refused, failed, restored)."""
    ts, exe, path, _, body = note
    act = body["act"]
    result = act.get("result", "")
    reason = f"{result} {visible(path)} on {host_name} for alert {act.get('alert', '?')}" + (
        f": {act['why']}" if act.get("why") else ""
    )
    doc_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"rarewrite:action:{agent_id}:{act['id']}:{result}"))
    doc = _response_doc(
        "quarantine", doc_id, now_ms, agent_id, host_name, reason, "high" if result == "failed" else "medium"
    )
    doc.update(_file_fields(exe, path))
    doc["rarewrite"] = {"response": {**act, "event_time": iso(ts)}}
    return doc


def quarantine_targets(doc: dict[str, Any]) -> list[tuple[str, Optional[bytes], Optional[bytes]]]:
    """(agent id, exe, path) of an alert document: what its quarantine asks for."""
    exe = _raw(doc, "process.executable", doc.get("process", {}).get("executable"))
    path = _raw(doc, "file.path", doc.get("file", {}).get("path"))
    agents = doc.get("agent", {}).get("id") or []
    return [(a, exe, path) for a in ([agents] if isinstance(agents, str) else agents)]


def _raw(doc: dict[str, Any], field: str, text: Optional[str]) -> Optional[bytes]:
    raw = (doc.get("rarewrite", {}).get("raw_base64") or {}).get(field)
    if raw:
        return base64.b64decode(raw)
    return None if text is None else text.encode("utf-8", "surrogateescape")


def action_for_agent(a: Action) -> dict[str, Any]:
    """A pending action as the JSON answer to an agent's batch carries it."""
    return {
        "id": a.id,
        "type": "quarantine",
        "alert": a.alert_id,
        "rule": a.rule_id,
        "exe_b64": None if a.exe is None else base64.b64encode(a.exe).decode(),
        "path_b64": None if a.path is None else base64.b64encode(a.path).decode(),
    }


def after_notes(
    store: Store, agent: AgentRecord, notes: Sequence[tuple[Any, ...]], now_ms: int
) -> list[dict[str, Any]]:
    """The documents a stored batch's notes make: a follow-up for each alert
    a ``req`` note's event is in (none yet: the alert will carry it), and
    one per ``act`` report."""
    docs: list[dict[str, Any]] = []
    for ts, exe, path, kind, body in notes:
        item: NoteItem = (ts, exe, path, kind, msgpack.unpackb(body, raw=False))
        if kind == "act":
            docs.append(action_doc(agent.agent_id, agent.host_name, item, now_ms))
        else:
            about = store.alerts_about((exe, path), ts)
            alerts = [(a, r) for a, r, doc in about if _names(doc, agent.agent_id)]
            docs.extend(followup_docs(agent.agent_id, agent.host_name, item, alerts, now_ms))
    return docs


def _names(doc: str, agent_id: str) -> bool:
    """Whether an alert document names this agent (its events are its)."""
    agents = (json.loads(doc).get("agent") or {}).get("id") or []
    return agent_id in ([agents] if isinstance(agents, str) else agents)


def quarantine_rows(
    quarantining: Collection[str], alerts: Sequence[dict[str, Any]], now_ms: int
) -> list[ActionRow]:
    """The actions to queue for the alerts of rules with ``quarantine = yes``
    (``quarantining``: their ids): one per agent of each alert."""
    rows: list[ActionRow] = []
    for doc in alerts:
        rule_id = str((doc.get("rule") or {}).get("id"))
        if rule_id in quarantining:
            alert_id = str(doc["kibana"]["alert"]["uuid"])
            rows.extend((alert_id, rule_id, exe, path, now_ms, a) for a, exe, path in quarantine_targets(doc))
    return rows
