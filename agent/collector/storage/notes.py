"""The tables of what comes after an alert's events, shared by both stores
(SQL with ``?`` placeholders; PostgreSQL swaps them for ``%s``):

- ``notes``: the agents' ``<note>`` records (agent.shared.wire.context),
  keyed by the event they are about (agent, pair, event time): requests
  for a new file after it was written, and the agents' reports of actions.
- ``actions``: the responses the collector asks of an agent for an alert
  (``quarantine``), until the agent reports what it did.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

import msgpack

from agent.shared import wire

NOTES_SCHEMA = """
CREATE TABLE IF NOT EXISTS notes (
    id {serial},
    agent_ref {int} NOT NULL,
    pkey {blob} NOT NULL,
    event_ts {int} NOT NULL,
    kind TEXT NOT NULL,
    received_ms {int} NOT NULL,
    body {blob} NOT NULL
);
CREATE INDEX IF NOT EXISTS notes_pair ON notes (pkey, event_ts);
CREATE INDEX IF NOT EXISTS notes_received ON notes (received_ms);
CREATE TABLE IF NOT EXISTS actions (
    id {serial},
    agent_ref {int} NOT NULL,
    alert_id TEXT NOT NULL,
    rule_id TEXT NOT NULL,
    exe {blob},
    path {blob},
    created_ms {int} NOT NULL,
    done_ms {int},
    result TEXT,
    UNIQUE (agent_ref, alert_id)
);
CREATE INDEX IF NOT EXISTS actions_pending ON actions (agent_ref, done_ms);
"""
SQLITE_TYPES = {"serial": "INTEGER PRIMARY KEY", "int": "INTEGER", "blob": "BLOB"}
PG_TYPES = {"serial": "bigserial PRIMARY KEY", "int": "bigint", "blob": "bytea"}

NOTE_INSERT_SQL = (
    "INSERT INTO notes(agent_ref, pkey, event_ts, kind, received_ms, body) VALUES (?, ?, ?, ?, ?, ?)"
)
ACTION_DONE_SQL = (
    "UPDATE actions SET done_ms = ?, result = ? WHERE id = ? AND agent_ref = ? AND done_ms IS NULL"
)
NOTES_FOR_SQL = """
SELECT a.agent_id, n.event_ts, n.kind, n.body FROM notes AS n JOIN agents AS a ON a.ref = n.agent_ref
WHERE n.pkey = ? AND n.event_ts >= ? AND n.event_ts <= ? ORDER BY n.id
"""
ACTION_INSERT_SQL = (
    "INSERT INTO actions(agent_ref, alert_id, rule_id, exe, path, created_ms) "
    "SELECT ref, ?, ?, ?, ?, ? FROM agents WHERE agent_id = ? "
    "ON CONFLICT (agent_ref, alert_id) DO NOTHING"
)
PENDING_SQL = (
    "SELECT id, alert_id, rule_id, exe, path FROM actions WHERE agent_ref = ? AND done_ms IS NULL "
    "ORDER BY id LIMIT ?"
)
PRUNE_NOTES_SQL = "DELETE FROM notes WHERE received_ms < ?"
PRUNE_ACTIONS_SQL = "DELETE FROM actions WHERE created_ms < ?"
MAX_PENDING = 20  # actions handed to an agent in one answer


def note_pkey(exe: Optional[bytes], path: Optional[bytes]) -> bytes:
    """The notes' pair key: fixed-size, so a btree takes a 16 KiB path too."""
    return hashlib.blake2b(wire.pair_key(exe, path), digest_size=16).digest()


def note_rows(agent_ref: int, notes: Sequence[tuple[Any, ...]], now_ms: int) -> list[tuple[Any, ...]]:
    return [(agent_ref, note_pkey(exe, path), ts, kind, now_ms, body) for ts, exe, path, kind, body in notes]


def action_reports(agent_ref: int, notes: Sequence[tuple[Any, ...]], now_ms: int) -> list[tuple[Any, ...]]:
    """ACTION_DONE_SQL rows of the batch's ``act`` notes."""
    out = []
    for _, _, _, kind, body in notes:
        if kind == "act":
            act = msgpack.unpackb(body, raw=False)["act"]
            out.append((now_ms, str(act.get("result", ""))[:32], act["id"], agent_ref))
    return out


class Note(NamedTuple):
    agent_id: str
    event_ts: int
    kind: str
    body: dict[str, Any]


def note_of(row: Sequence[Any]) -> Note:
    agent_id, ts, kind, body = row
    return Note(str(agent_id), int(ts), str(kind), msgpack.unpackb(bytes(body), raw=False))


class Action(NamedTuple):
    id: int
    alert_id: str
    rule_id: str
    exe: Optional[bytes]
    path: Optional[bytes]


def action_of(row: Sequence[Any]) -> Action:
    rid, alert_id, rule_id, exe, path = row
    return Action(int(rid), str(alert_id), str(rule_id), _bytes(exe), _bytes(path))


def _bytes(v: Any) -> Optional[bytes]:
    return None if v is None else bytes(v)


ActionRow = tuple[str, str, Optional[bytes], Optional[bytes], int, str]  # ACTION_INSERT_SQL's
