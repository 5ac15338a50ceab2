"""``rarewrite collector agents|alerts``: the collector's data, for people."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

from agent.collector.outputs.stdout import StdoutOutput
from agent.collector.storage import open_store
from agent.shared.errors import RarewriteError, StoreError
from agent.shared.text import is_postgres


def agents_cli(db: str, action: str, agent_id: str = "") -> list[dict[str, Any]]:
    """``rarewrite collector agents list|revoke``: plain data for the CLI to print.

    ``list`` returns every agent; ``revoke`` returns the revoked agent or raises
    StoreError when no agent has that id.
    """
    if not is_postgres(db) and not os.path.exists(db):
        raise StoreError(f"no collector database at {db!r}")
    store = open_store(db)
    try:
        if action in ("revoke", "restore"):
            if not (store.revoke(agent_id) if action == "revoke" else store.restore(agent_id)):
                raise StoreError(f"no agent with id {agent_id!r}")
        elif action != "list":
            raise StoreError(f"unknown agents action {action!r} (list, revoke or restore)")
        return [
            {
                "agent_id": a.agent_id,
                "host_name": a.host_name,
                "revoked": a.revoked,
                "enrolled_ms": a.enrolled_ms,
                "last_seen_ms": a.last_seen_ms,
            }
            for a in store.list_agents()
            if action == "list" or a.agent_id == agent_id
        ]
    finally:
        store.close()


def agents(db: str, action: str, agent_id: Optional[str]) -> int:
    if action in ("revoke", "restore") and not agent_id:
        raise RarewriteError(f"collector agents {action}: name the agent id")
    for doc in agents_cli(db, action, agent_id or ""):
        sys.stdout.write(json.dumps(doc, sort_keys=True) + "\n")
    return 0


def alerts(db: str, since: Optional[str], full: bool) -> int:
    from agent.shared.text import parse_timestamp

    if not is_postgres(db) and not os.path.exists(db):
        raise StoreError(f"no collector database at {db!r}")
    since_ms = parse_timestamp(since) - 1 if since else 0
    store = open_store(db, readonly=True)
    try:
        docs = store.list_alerts(since_ms)
    finally:
        store.close()
    if full:
        sys.stdout.writelines(json.dumps(doc) + "\n" for doc in docs)
    else:
        StdoutOutput(sys.stdout).emit(docs)  # the same escaped one-liner as serve's stdout
    return 0
