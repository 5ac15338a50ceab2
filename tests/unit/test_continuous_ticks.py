"""The continuous schedule working from what changed (agent.collector.continuous)
raises exactly the alerts of ticks that rank the whole window, tick after
tick, on both stores.

Two stores get the same batches at the same simulated times: late events
(an agent shipping its backlog), events stamped ahead of the collector's
clock, resends, several agents on one pair; events leave the window and
pass the settle time between ticks; an exception expires mid-run; the limit
cuts rows; suppression folds rows. One store ticks as the collector does;
the other is made to rank the whole window at every tick. The alerts each
tick raises (ids, rows cut) must be the same.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import pytest

from agent.collector import continuous
from agent.collector import evaluate as ev
from agent.collector.storage import open_store
from agent.collector.storage.base import Store
from agent.collector.storage.sqlite import CollectorStore
from agent.collector.storage.ticks import TickState
from agent.shared import wire
from agent.shared.exceptions import RuleException
from agent.shared.rule import Rule

T0 = 1_790_000_000_000
WINDOW = 60_000
SETTLE = 4_000
TICK = 1_000
AGENTS = [("agent-a", "web-a"), ("agent-b", "web-b"), ("agent-c", "web-c")]
EXE = b"/usr/sbin/php-fpm8.2"


def rules() -> list[Rule]:
    base = replace(Rule(), window_ms=WINDOW, count_below=4)
    expiring = RuleException("cache", (("file.path", ("*/cache/*",)),), expires_ms=T0 + 50 * TICK)
    return [
        base,
        replace(base, rule_id="cut", limit=2),
        replace(base, rule_id="two-agents", agent_count=2, count_below=5),
        replace(base, rule_id="excepted", exceptions=(expiring,)),
        replace(base, rule_id="by-user", exceptions=(RuleException("bob", (("user.name", ("bob",)),)),)),
        replace(base, rule_id="suppressed", suppress_by=("file.extension",), suppress_for_ms=20_000),
    ]


class Shipper:
    """Batches for one store: one epoch per agent, sequence numbers in order."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.seq: dict[str, int] = {}
        for agent_id, host in AGENTS:
            store.enroll(agent_id, host, "k-" + agent_id, T0 - WINDOW)

    def ship(self, agent_id: str, host: str, events: list[tuple[bytes, int, str]], now: int) -> None:
        rec = self.store.agent_for_key("k-" + agent_id)
        assert rec is not None
        self.seq[agent_id] = self.seq.get(agent_id, 0) + 1
        records = tuple(
            wire.EventRecord(
                ts, "creation", EXE, path, {"pid": 7, "uname": user, "uid": "33", "pname": "php"}
            )
            for path, ts, user in events
        )
        batch = wire.Batch(
            os.urandom(16).hex(), "e" * 32, self.seq[agent_id], agent_id, host, now, records, ()
        )
        decoded = wire.decode_batch(wire.encode_batch(batch))
        assert self.store.ingest(rec, decoded, now) == "stored"


def arrivals(
    rng: random.Random, ticks: int
) -> dict[int, list[tuple[str, str, list[tuple[bytes, int, str]]]]]:
    """Per tick: the batches that arrive just before it."""
    paths = [b"/var/www/common/%d.php" % i for i in range(4)]
    out: dict[int, list[tuple[str, str, list[tuple[bytes, int, str]]]]] = {}
    fresh = 0
    for n in range(ticks):
        now = T0 + n * TICK
        for agent_id, host in AGENTS:
            if rng.random() < 0.5:
                continue
            events = []
            for _ in range(rng.randint(1, 4)):
                r = rng.random()
                if r < 0.35:
                    fresh += 1
                    kind = rng.choice([b"up", b"cache", b"x"])
                    path = b"/var/www/%s/%d.%s" % (kind, fresh, rng.choice([b"php", b"txt"]))
                    paths.append(path)
                else:
                    path = rng.choice(paths[-40:] if rng.random() < 0.7 else paths)
                lag = rng.random()
                if lag < 0.1:
                    ts = now - rng.randrange(SETTLE, WINDOW + 5_000)  # a backlog
                elif lag < 0.15:
                    ts = now + rng.randrange(1, 3_000)  # the agent's clock ahead
                else:
                    ts = now - rng.randrange(0, 1_500)
                events.append((path, ts, "bob" if rng.random() < 0.1 else "www-data"))
            out.setdefault(n, []).append((agent_id, host, events))
    return out


def _ids(alerts: list[dict[str, Any]]) -> list[tuple[str, Optional[int]]]:
    return sorted((a["kibana"]["alert"]["uuid"], a["rarewrite"].get("rows_cut")) for a in alerts)


def _run(inc: Store, ref: Store, seed: int, ticks: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    plan = arrivals(rng, ticks)
    shippers = [Shipper(inc), Shipper(ref)]
    used = {"changed": 0}
    real = continuous.changed_fresh

    def counted(*a: Any, **k: Any) -> Any:
        used["changed"] += 1
        return real(*a, **k)

    monkeypatch.setattr(continuous, "changed_fresh", counted)
    raised = 0
    for n in range(ticks):
        at = T0 + n * TICK
        for agent_id, host, events in plan.get(n, []):
            for s in shippers:
                s.ship(agent_id, host, events, at)
        if n % 37 == 36:
            continue  # a tick missed: the next one covers two seconds
        for rule in rules():
            ref.save_tick(rule.rule_id, TickState(0, 0, "", cut=True))  # rank the whole window
            want = ev.run_continuous(ref, rule, at, SETTLE)
            got = ev.run_continuous(inc, rule, at, SETTLE)
            assert _ids(got) == _ids(want), (seed, n, rule.rule_id)
            raised += len(got)
    assert raised > 20, "too few alerts: the comparison proved little"
    assert used["changed"] > ticks * 3, "the ticks did not work from the changes"


@pytest.fixture
def two_sqlite(tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    a, b = CollectorStore(str(tmp_path / "inc.db")), CollectorStore(str(tmp_path / "ref.db"))
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("seed", range(4))
def test_ticks_from_changes_raise_what_whole_window_ticks_raise(
    two_sqlite: tuple[Store, Store], seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run(*two_sqlite, seed=seed, ticks=150, monkeypatch=monkeypatch)


def test_ticks_from_changes_on_postgresql(
    pg_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [pg_server.create_db(), pg_server.create_db()]
    inc, ref = (open_store(pg_server.url(n)) for n in names)
    try:
        _run(inc, ref, seed=99, ticks=120, monkeypatch=monkeypatch)
    finally:
        inc.close()
        ref.close()
        for n in names:
            pg_server.drop_db(n)


def test_a_tick_after_a_cut_or_a_change_of_rule_ranks_the_whole_window(tmp_path: Path) -> None:
    store = CollectorStore(str(tmp_path / "c.db"))
    try:
        rule = replace(Rule(), window_ms=WINDOW, limit=1)
        s = Shipper(store)
        s.ship("agent-a", "web-a", [(b"/var/www/a.php", T0 - 10_000, "www-data")], T0)
        s.ship("agent-a", "web-a", [(b"/var/www/b.php", T0 - 10_000, "www-data")], T0)
        assert len(ev.run_continuous(store, rule, T0, SETTLE)) == 1
        state = store.tick_state(rule.rule_id)
        assert state is not None and state.cut  # b.php waits in the window, not in the changes
        second = ev.run_continuous(store, rule, T0 + TICK, SETTLE)
        assert [a["file"]["path"] for a in second] == ["/var/www/b.php"]
        state = store.tick_state(rule.rule_id)
        assert state is not None and not state.cut
        other = replace(rule, count_below=3)
        assert store.tick_state(other.rule_id) == state  # same id: the fingerprint tells them apart
        assert ev.run_continuous(store, other, T0 + 2 * TICK, SETTLE) == []
        changed = store.tick_state(rule.rule_id)
        assert changed is not None and changed.fingerprint != state.fingerprint
    finally:
        store.close()
