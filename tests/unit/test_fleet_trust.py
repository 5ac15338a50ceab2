"""Enrollment that a stolen fleet secret cannot abuse, heartbeats, and the
sensor-health alerts, against the real app on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from agent.collector import health
from agent.collector.admin import agents_cli
from agent.collector.auth import TokenBuckets, key_hash, new_enroll_token
from agent.collector.server import COLLECTOR
from agent.collector.storage.base import AgentRecord, EnrollToken
from agent.collector.storage.sqlite import CollectorStore
from agent.shared import wire
from tests.unit.test_collector_server import NOW, SECRET, Server, cfg_for, doc, pack

H = 3_600_000


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Server]:
    store = CollectorStore(str(tmp_path / "c.db"))
    s = Server(cfg_for(tmp_path), store)
    yield s
    s.stop()
    store.close()


def enroll(
    s: Server, agent_id: str, secret: str = SECRET, proof: Optional[str] = None, host: str = "h"
) -> tuple[int, Any]:
    body = json.dumps({"enrollment_secret": secret, "agent_id": agent_id, "host_name": host}).encode()
    headers = {"Authorization": f"Bearer {proof}"} if proof else {}
    st, _, got = s.request("POST", "/api/v1/enroll", body, headers)
    return st, json.loads(got)


def health_kinds(s: Server) -> list[tuple[str, str]]:
    return [
        (d["rarewrite"]["health"]["kind"], d["agent"]["id"][0])
        for d in s.store.list_alerts(0)
        if d["rule"]["id"] == health.HEALTH_RULE_ID
    ]


def test_a_stolen_fleet_secret_cannot_take_over_an_enrolled_id(
    fleet: Server, caplog: pytest.LogCaptureFixture
) -> None:
    st, got = enroll(fleet, "web-1")
    assert st == 200
    key = got["api_key"]
    # the attacker has the secret, not the key: refused, the agent keeps shipping
    st, got = enroll(fleet, "web-1", host="evil")
    assert st == 409 and "agents reset web-1" in got["error"]
    st, _ = enroll(fleet, "web-1", proof="x" * 43)
    assert st == 409
    assert fleet.post_batch(key, pack(doc("web-1")))[0] == 200
    assert "event=reenroll_refused agent_id='web-1'" in caplog.text
    # the agent itself (its current key as proof) may re-key, e.g. after a rename
    st, got = enroll(fleet, "web-1", proof=key, host="web-1-renamed")
    assert st == 200
    assert fleet.post_batch(key, pack(doc("web-1", seq=2)))[0] == 401  # the old key is dead
    new_key = got["api_key"]
    # an admin's reset lets the secret alone enroll it, once
    assert agents_cli(fleet.store.path, "reset", "web-1")[0]["agent_id"] == "web-1"
    assert fleet.post_batch(new_key, pack(doc("web-1", seq=2)))[0] == 401
    assert enroll(fleet, "web-1")[0] == 200
    assert enroll(fleet, "web-1")[0] == 409
    assert health_kinds(fleet) == [
        ("agent_enrolled", "web-1"),
        ("agent_reenroll_refused", "web-1"),  # once an hour per id, however often tried
        ("agent_key_replaced", "web-1"),
        ("agent_key_replaced", "web-1"),
    ]
    assert "event=agent_key_replaced agent_id='web-1'" in caplog.text


def test_per_host_tokens_enroll_once_and_can_be_the_only_way(tmp_path: Path) -> None:
    store = CollectorStore(str(tmp_path / "c.db"))
    s = Server(cfg_for(tmp_path, enroll_with_secret=False), store)
    try:
        assert enroll(s, "web-1")[0] == 401  # the fleet secret is off
        token_id, token = new_enroll_token()
        store.add_token(key_hash(token), EnrollToken(token_id, None, 1, NOW + H, NOW))
        bound_id, bound = new_enroll_token()
        store.add_token(key_hash(bound), EnrollToken(bound_id, "web-1", 1, NOW + H, NOW))
        assert enroll(s, "web-1", secret=token)[0] == 200
        assert enroll(s, "web-2", secret=token)[0] == 401  # used up
        # a token an admin bound to web-1 re-keys it (a reinstalled host)
        st, got = enroll(s, "web-1", secret=bound)
        assert st == 200 and s.post_batch(got["api_key"], pack(doc("web-1")))[0] == 200
        assert [t.uses_left for t in store.list_tokens()] == [0, 0]
        forged = token[:-4] + "AAAA"
        assert enroll(s, "web-3", secret=forged)[0] == 401
    finally:
        s.stop()
        store.close()


def test_heartbeats_are_authenticated_checked_and_kept(fleet: Server) -> None:
    key = enroll(fleet, "web-1")[1]["api_key"]

    def beat(body: Any, key: Optional[str] = key) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return fleet.request("POST", "/api/v1/heartbeat", data, headers)[0]

    collector = fleet.app[COLLECTOR]
    collector.beat_rates = TokenBuckets(1000.0, 1000)  # the checks first; the rate limit below
    good = {"sent_at": NOW, "status": "degraded", "version": "1.2", "counters": {"seen": 5, "overflows": 1}}
    assert beat(good, key=None) == 401
    assert beat(good, key="y" * 43) == 401
    for bad in (
        b"{",
        [],
        {**good, "status": "fine"},
        {**good, "sent_at": "now"},
        {**good, "counters": {"Seen": 1}},
        {**good, "counters": {"seen": -1}},
        {**good, "counters": {f"c{i}": 1 for i in range(101)}},
        b"{" + b'"x": 1,' * 5000 + b'"y": 2}',  # over 16 KiB
    ):
        assert beat(bad) in (400, 413), bad
    assert beat(good) == 200
    # the collector stores heartbeats in batches (every few seconds): do it now
    asyncio.run_coroutine_threadsafe(collector.store_heartbeats(), fleet.loop).result(10)
    (row,) = agents_cli(fleet.store.path, "list")
    assert row["health"]["status"] == "degraded" and row["health"]["counters"] == {"overflows": 1, "seen": 5}
    assert row["last_seen_ms"] is not None
    collector.beat_rates = TokenBuckets(1.0, 5)  # as served
    codes = [beat(good) for _ in range(8)]
    assert 429 in codes  # a bucket of 5, one a second


def test_reported_loss_raises_one_alert_per_reason_and_hour(fleet: Server) -> None:
    key = enroll(fleet, "web-1")[1]["api_key"]
    gaps = [
        {"start": NOW - 5000, "end": NOW - 4000, "lost": 7, "reason": "overflow"},
        {"start": NOW - 3000, "end": NOW - 2000, "lost": 3, "reason": "overflow"},
        {"start": NOW - 3000, "end": NOW - 3000, "lost": 0, "reason": "unmarked_filesystem"},
    ]
    assert fleet.post_batch(key, pack(doc("web-1", gaps=gaps)))[0] == 200
    assert fleet.post_batch(key, pack(doc("web-1", seq=2, gaps=gaps[:1])))[0] == 200
    loss = [
        d for d in fleet.store.list_alerts(0) if d["rarewrite"].get("health", {}).get("kind") == "agent_loss"
    ]
    hour = (NOW - 5000) // H == (NOW - 3000) // H
    assert len(loss) == (1 if hour else 2)
    assert loss[0]["rarewrite"]["health"]["reason"] == "overflow"
    assert loss[0]["kibana"]["alert"]["severity"] == "high"


def _agent(agent_id: str, last: Optional[int], revoked: bool = False) -> AgentRecord:
    return AgentRecord(agent_id, "h-" + agent_id, revoked, enrolled_ms=NOW - 10 * H, last_seen_ms=last)


def test_silent_agents_are_alerted_once_per_silence() -> None:
    start, after = NOW - H, 120_000
    agents = [
        _agent("quiet", NOW - 200_000),
        _agent("fresh", NOW - 30_000),
        _agent("gone", NOW - 5 * H, revoked=True),
        _agent("never", None),
    ]
    got = health.silent(agents, NOW, start, after)
    assert [d["agent"]["id"][0] for d in got] == ["quiet", "never"]
    assert got[0]["rarewrite"]["health"]["silent_s"] == 200
    # the same silence a minute later (or after a restart) is the same alert
    later = health.silent(agents, NOW + 60_000, NOW - 1000 - after, after)
    assert [d["kibana"]["alert"]["uuid"] for d in later] == [d["kibana"]["alert"]["uuid"] for d in got]
    # right after the collector started, nobody is silent yet: it could not hear them
    assert health.silent(agents, NOW, NOW - 60_000, after) == []


def test_health_alerts_look_like_the_rules_alerts() -> None:
    gap = wire.GapRecord(NOW - 1, NOW, 3, "state_reset")
    (loss,) = health.losses(_agent("a", NOW), [gap], NOW)
    enrolled = health.enrollment("new", "a", "h", NOW, "10.0.0.1")
    assert enrolled is not None and health.enrollment("revoked", "a", "h", NOW, "x") is None
    for d in (loss, enrolled):
        assert d["event"]["kind"] == "signal"
        assert d["kibana"]["alert"]["rule"]["rule_id"] == d["rule"]["id"] == "rarewrite-sensor-health"
        assert d["host"]["name"] and d["agent"]["id"] and d["message"]
    ((_, pair, at, _, text, skey),) = health.items([loss])
    assert (pair, at, skey) == ((None, None), NOW, None) and json.loads(text) == loss


def test_collector_alerts_filters_by_rule(fleet: Server, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.collector.admin import alerts

    enroll(fleet, "web-1")
    enroll(fleet, "web-1")  # refused: a second health alert
    assert alerts(fleet.store.path, None, True, health.HEALTH_RULE_ID) == 0
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["rarewrite"]["health"]["kind"] for d in docs] == ["agent_enrolled", "agent_reenroll_refused"]
    assert alerts(fleet.store.path, None, True, "no-such-rule") == 0
    assert capsys.readouterr().out == ""
