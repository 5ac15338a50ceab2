"""``rarewrite collector agents|alerts``: the collector's data, for people."""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

from agent.collector.outputs import StdoutOutput
from agent.collector.store import agents_cli, is_postgres, open_store
from agent.config import Config
from agent.errors import RarewriteError, StoreError


def agents(cfg: Config, db: str, action: str, agent_id: Optional[str]) -> int:
    if action in ("revoke", "restore") and not agent_id:
        raise RarewriteError(f"collector agents {action}: name the agent id")
    for doc in agents_cli(db, action, agent_id or ""):
        sys.stdout.write(json.dumps(doc, sort_keys=True) + "\n")
    return 0


def alerts(cfg: Config, db: str, since: Optional[str], full: bool) -> int:
    from agent.sources.replay import parse_timestamp

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
