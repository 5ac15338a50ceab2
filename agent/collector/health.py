"""Sensor-health alerts: an agent gone silent, an agent reporting loss, an
agent enrolled, its key replaced, a re-enrollment refused.

They are alerts of their own rule (``rarewrite-sensor-health``), in the same
ECS shape as the detection rule's, through every output. Each one's id is
derived from what it is about (agent, kind, and the episode: the silence's
last heartbeat, the gap's hour, the enrollment's time), so a restart or a
second collector on the same database never raises it twice.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Optional

from agent.collector.evaluate import ECS_VERSION
from agent.collector.storage.base import ENROLL_NEW, ENROLL_REKEYED, ENROLL_TAKEN, AgentRecord, AlertItem
from agent.shared import wire
from agent.shared.text import iso

HEALTH_RULE_ID = "rarewrite-sensor-health"
HEALTH_RULE_NAME = "rarewrite sensor health"
HOUR_MS = 3_600_000
# Gaps that are routine, not loss: a filesystem the agent cannot mark is
# reported again and again; an event whose directory was deleted before the
# agent named it (a temp dir) has no file left to alert on. They stay on the
# rule's alerts (rarewrite.gaps); alerting them hourly would be noise.
NOT_LOSS = frozenset({"unmarked_filesystem", "unresolved_handle"})

# kind -> (severity, risk score, what it means)
KINDS: dict[str, tuple[str, int, str]] = {
    "agent_silent": ("high", 73, "sent no heartbeat or batch for {silent_s}s (killed, stopped, cut off?)"),
    "agent_loss": ("high", 73, "reported lost coverage: {reason} ({lost} events lost)"),
    "agent_enrolled": ("low", 21, "enrolled as a new agent from {peer}"),
    "agent_key_replaced": ("medium", 47, "was enrolled again from {peer}: its API key was replaced ({how})"),
    "agent_reenroll_refused": (
        "high",
        73,
        "re-enrollment from {peer} refused: the id is enrolled and the request had no proof (its current "
        "key, an admin's reset or a token bound to it)",
    ),
}


def rule_uuid() -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "rarewrite:rule:" + HEALTH_RULE_ID))


def health_alert(
    kind: str, agent_id: str, host_name: str, at_ms: int, episode: str, **detail: Any
) -> dict[str, Any]:
    """One health alert document; ``episode`` makes its id (see the module doc)."""
    severity, risk, what = KINDS[kind]
    alert_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"rarewrite:health:{kind}:{agent_id}:{episode}"))
    reason = f"agent {agent_id} on {host_name} " + what.format(**detail)
    rule = {"name": HEALTH_RULE_NAME, "rule_id": HEALTH_RULE_ID, "uuid": rule_uuid()}
    return {
        "@timestamp": iso(at_ms),
        "ecs": {"version": ECS_VERSION},
        "event": {
            "kind": "signal",
            "category": ["host"],
            "type": ["info"],
            "module": "rarewrite",
            "action": kind,
            "risk_score": risk,
        },
        "message": reason,
        "kibana": {
            "alert": {
                "uuid": alert_uuid,
                "status": "active",
                "workflow_status": "open",
                "original_time": iso(at_ms),
                "reason": reason,
                "severity": severity,
                "risk_score": risk,
                "rule": rule,
            }
        },
        "rule": {"name": HEALTH_RULE_NAME, "id": HEALTH_RULE_ID, "uuid": rule["uuid"]},
        "host": {"name": [host_name]},
        "agent": {"id": [agent_id]},
        "rarewrite": {"health": {"kind": kind, "at_ms": at_ms, **detail}},
    }


def items(docs: Iterable[dict[str, Any]]) -> list[AlertItem]:
    """Store.record_alerts items of health alerts (no pair: (None, None))."""
    out: list[AlertItem] = []
    for doc in docs:
        at = int(doc["rarewrite"]["health"].get("at_ms", 0))
        out.append((doc["kibana"]["alert"]["uuid"], (None, None), at, at, json.dumps(doc), None))
    return out


def silent(
    agents: Sequence[AgentRecord], now_ms: int, started_ms: int, silent_after_ms: int
) -> list[dict[str, Any]]:
    """An alert for each agent not heard from for ``silent_after_ms``. An
    agent is heard from by a heartbeat or a batch; the collector's own start
    counts as one (it could not hear anything while it was down). One alert
    per silence: its episode is the agent's last heartbeat."""
    out = []
    for a in agents:
        if a.revoked:
            continue
        last = a.last_seen_ms if a.last_seen_ms is not None else a.enrolled_ms
        if now_ms - max(last, started_ms) < silent_after_ms:
            continue
        out.append(
            health_alert(
                "agent_silent",
                a.agent_id,
                a.host_name,
                now_ms,
                f"last:{last}",
                last_seen=iso(last),
                silent_s=(now_ms - last) // 1000,
            )
        )
    return out


def losses(agent: AgentRecord, gaps: Sequence[wire.GapRecord], now_ms: int) -> list[dict[str, Any]]:
    """An alert per loss reason and hour that a batch's gaps report."""
    grouped: dict[tuple[str, int], list[wire.GapRecord]] = {}
    for g in gaps:
        if g.reason not in NOT_LOSS:
            grouped.setdefault((g.reason, g.start // HOUR_MS), []).append(g)
    out = []
    for (reason, hour), got in sorted(grouped.items()):
        out.append(
            health_alert(
                "agent_loss",
                agent.agent_id,
                agent.host_name,
                now_ms,
                f"{reason}:{hour}",
                reason=reason,
                lost=sum(g.lost for g in got),
                gap_start=iso(min(g.start for g in got)),
                gap_end=iso(max(g.end for g in got)),
            )
        )
    return out


def enrollment(
    status: str, agent_id: str, host_name: str, now_ms: int, peer: str, how: Optional[str] = None
) -> Optional[dict[str, Any]]:
    """The alert of an enrollment answer, or None for one that says nothing new."""
    kinds = {
        ENROLL_NEW: "agent_enrolled",
        ENROLL_REKEYED: "agent_key_replaced",
        ENROLL_TAKEN: "agent_reenroll_refused",
    }
    kind = kinds.get(status)
    if kind is None:
        return None
    # refusals: one alert an hour per id, however often it is tried
    episode = f"h:{now_ms // HOUR_MS}" if kind == "agent_reenroll_refused" else f"t:{now_ms}"
    extra = {"how": how or "-"} if kind == "agent_key_replaced" else {}
    return health_alert(kind, agent_id, host_name, now_ms, episode, peer=peer, **extra)


HEARTBEAT_MAX_BODY = 16 << 10
MAX_COUNTERS = 100
_COUNTER = re.compile(r"[a-z][a-z0-9_]{0,63}\Z")
STATUSES = ("ok", "degraded")


def heartbeat_health(doc: Any, now_ms: int) -> dict[str, Any]:
    """What a heartbeat body says, checked: ValueError naming the field if
    anything is off. Kept as the agent's health (``collector agents list``)."""
    if not isinstance(doc, dict):
        raise ValueError("body must be a JSON object")
    status = doc.get("status", "ok")
    if status not in STATUSES:
        raise ValueError(f"status: must be one of {', '.join(STATUSES)}")
    sent_at = doc.get("sent_at")
    if isinstance(sent_at, bool) or not isinstance(sent_at, int) or not 0 <= sent_at < 1 << 53:
        raise ValueError("sent_at: must be milliseconds since the epoch")
    counters = doc.get("counters", {})
    if not isinstance(counters, dict) or len(counters) > MAX_COUNTERS:
        raise ValueError(f"counters: must be an object of at most {MAX_COUNTERS} names")
    for name, value in counters.items():
        if not _COUNTER.match(name):
            raise ValueError(f"counters: {name[:70]!r} is not a counter name (a-z 0-9 _)")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 63:
            raise ValueError(f"counters.{name}: must be a non-negative integer")
    version = doc.get("version", "")
    if not isinstance(version, str) or len(version) > 64 or not version.isprintable():
        raise ValueError("version: must be at most 64 printable characters")
    return {
        "status": status,
        "sent_at": iso(sent_at),
        "received_at": iso(now_ms),
        "version": version,
        "counters": dict(sorted(counters.items())),
    }
