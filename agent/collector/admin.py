"""``rarewrite collector agents|tokens|alerts``: the collector's data, for people."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Optional

from agent.collector.auth import key_hash, new_enroll_token
from agent.collector.outputs.stdout import StdoutOutput
from agent.collector.storage import open_store
from agent.collector.storage.base import EnrollToken
from agent.shared import wire
from agent.shared.config.converters import duration_ms
from agent.shared.errors import RarewriteError, StoreError
from agent.shared.text import is_postgres, iso


def agents_cli(db: str, action: str, agent_id: str = "") -> list[dict[str, Any]]:
    """``rarewrite collector agents list|revoke|reset``: plain data for the CLI to print.

    ``list`` returns every agent with its last heartbeat's health; ``revoke``
    and ``reset`` (``restore``, its old name) return that agent or raise
    StoreError when no agent has that id. A reset agent may enroll again
    with the secret alone; its old key is dead.
    """
    if not is_postgres(db) and not os.path.exists(db):
        raise StoreError(f"no collector database at {db!r}")
    store = open_store(db)
    try:
        if action in ("revoke", "reset", "restore"):
            if not (store.revoke(agent_id) if action == "revoke" else store.restore(agent_id)):
                raise StoreError(f"no agent with id {agent_id!r}")
        elif action != "list":
            raise StoreError(f"unknown agents action {action!r} (list, revoke or reset)")
        return [
            {
                "agent_id": a.agent_id,
                "host_name": a.host_name,
                "revoked": a.revoked,
                "enrolled_ms": a.enrolled_ms,
                "last_seen_ms": a.last_seen_ms,
                "last_seen": iso(a.last_seen_ms) if a.last_seen_ms is not None else None,
                "health": json.loads(a.health) if a.health else None,
            }
            for a in store.list_agents()
            if action == "list" or a.agent_id == agent_id
        ]
    finally:
        store.close()


def agents(db: str, action: str, agent_id: Optional[str]) -> int:
    if action in ("revoke", "reset", "restore") and not agent_id:
        raise RarewriteError(f"collector agents {action}: name the agent id")
    for doc in agents_cli(db, action, agent_id or ""):
        sys.stdout.write(json.dumps(doc, sort_keys=True) + "\n")
    return 0


def _token_doc(t: EnrollToken) -> dict[str, Any]:
    return {
        "token_id": t.token_id,
        "agent_id": t.agent_id,
        "uses_left": t.uses_left,
        "expires": iso(t.expires_ms),
        "created": iso(t.created_ms),
        "comment": t.comment,
    }


def tokens(db: str, args: argparse.Namespace) -> int:
    """``collector tokens create|list|revoke``. ``create`` prints the token
    once (only its hash is kept): hand it to one host's enrollment secret file."""
    if not is_postgres(db) and not os.path.exists(db):
        raise StoreError(f"no collector database at {db!r}")
    if args.action == "revoke" and not args.token_id:
        raise RarewriteError("collector tokens revoke: name the token id")
    if args.action == "create":
        if not 1 <= args.uses <= 1_000_000:
            raise RarewriteError("--uses: must be between 1 and 1000000")
        try:
            ttl = duration_ms(args.expires)
        except ValueError as e:
            raise RarewriteError(f"--expires: {e}") from None
        if args.agent_id is not None and not wire.valid_agent_id(args.agent_id):
            raise RarewriteError("--agent-id: must be 1-128 of A-Z a-z 0-9 . _ : @ -")
    store = open_store(db)
    try:
        if args.action == "create":
            token_id, token = new_enroll_token()
            now = int(time.time() * 1000)
            t = EnrollToken(token_id, args.agent_id, args.uses, now + ttl, now, args.comment)
            store.add_token(key_hash(token), t)
            sys.stdout.write(json.dumps({**_token_doc(t), "token": token}, sort_keys=True) + "\n")
            return 0
        if args.action == "revoke" and not store.revoke_token(args.token_id):
            raise StoreError(f"no token with id {args.token_id!r}")
        for t in store.list_tokens():
            if args.action == "list" or t.token_id == args.token_id:
                sys.stdout.write(json.dumps(_token_doc(t), sort_keys=True) + "\n")
        return 0
    finally:
        store.close()


def alerts(db: str, since: Optional[str], full: bool, rule_id: Optional[str] = None) -> int:
    """``collector alerts``: stored alerts, the rule's and the sensor-health
    ones (``rule.id`` rarewrite-sensor-health) alike, or one rule's."""
    from agent.shared.text import parse_timestamp

    if not is_postgres(db) and not os.path.exists(db):
        raise StoreError(f"no collector database at {db!r}")
    since_ms = parse_timestamp(since) - 1 if since else 0
    store = open_store(db, readonly=True)
    try:
        docs = store.list_alerts(since_ms)
    finally:
        store.close()
    if rule_id is not None:
        docs = [d for d in docs if (d.get("rule") or {}).get("id") == rule_id]
    if full:
        sys.stdout.writelines(json.dumps(doc) + "\n" for doc in docs)
    else:
        StdoutOutput(sys.stdout).emit(docs)  # the same escaped one-liner as serve's stdout
    return 0
