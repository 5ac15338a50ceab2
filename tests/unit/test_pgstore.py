"""What only the PostgreSQL store has: replicas on one database, partitions,
migrations, URL redaction. (The shared behaviour is in test_collector_store.py,
run against both stores.)"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from agent.collector import evaluate as ev
from agent.collector.storage import migrate, open_store, postgres
from agent.collector.storage.base import AgentRecord, Store
from agent.shared import wire
from agent.shared.rule import Row, Rule
from agent.shared.text import is_postgres, redact

T = 1_790_000_000_000
H = 3_600_000
EXE = b"/usr/sbin/apache2"


@pytest.fixture
def stores(pg_url: str) -> Iterator[tuple[Store, Store]]:
    """Two stores on one database: two collectors."""
    a, b = open_store(pg_url), open_store(pg_url)
    yield a, b
    a.close()
    b.close()


def _agent(store: Store, agent_id: str) -> AgentRecord:
    store.enroll(agent_id, f"host-{agent_id}", f"hash-{agent_id}", T)
    rec = store.agent_for_key(f"hash-{agent_id}")
    assert rec is not None
    return rec


def _batch(a: AgentRecord, seq: int, *events: tuple[int, bytes], epoch: str = "e" * 32) -> wire.Batch:
    return wire.Batch(
        os.urandom(16).hex(),
        epoch,
        seq,
        a.agent_id,
        a.host_name,
        T,
        tuple(wire.EventRecord(ts, "creation", EXE, p, {"pid": 1}) for ts, p in events),
    )


def _tables(url: str) -> set[str]:
    import psycopg

    with psycopg.connect(url) as c:
        rows = c.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'events'::regclass"
        ).fetchall()
    return {str(r[0]) for r in rows}


def test_redact_and_scheme() -> None:
    assert redact("postgresql://rw:s3cret@db:5432/rw") == "postgresql://rw:***@db:5432/rw"
    assert redact("postgres://db/rw?password=s3cret&sslmode=require") == (
        "postgres://db/rw?password=***&sslmode=require"
    )
    assert redact("postgresql://rw@db/rw") == "postgresql://rw@db/rw"
    assert redact("/var/lib/x.db") == "/var/lib/x.db"
    assert is_postgres("postgres://x") and is_postgres("postgresql://x") and not is_postgres("/x.db")


def test_migrate_is_versioned_and_idempotent(pg_url: str) -> None:
    assert migrate(pg_url)["from"] == 0
    again = migrate(pg_url)
    assert (again["from"], again["to"]) == (postgres.SCHEMA_VERSION,) * 2
    password = pg_url.split("@", maxsplit=1)[0].rsplit(":", 1)[1]
    assert again["db"] == pg_url.replace(password, "***") and password not in again["db"]


def test_a_batch_on_two_collectors_at_once_is_stored_once(stores: tuple[Store, Store]) -> None:
    a, b = stores
    rec = _agent(a, "x")
    for seq in range(1, 31):
        batch = _batch(rec, seq, (T - seq, b"/p%d" % seq))
        got: list[str] = []

        def send(s: Store, batch: wire.Batch = batch, got: list[str] = got) -> None:
            got.append(s.ingest(rec, batch, T))

        threads = [threading.Thread(target=send, args=(s,)) for s in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(got) == ["duplicate", "stored"], seq
    assert len(b.rows(Rule(), T)) == 30
    assert {r.cc for r in a.rows(Rule(), T)} == {1}


def test_hourly_run_happens_once_across_replicas(stores: tuple[Store, Store]) -> None:
    a, b = stores
    rec = _agent(a, "x")
    a.ingest(rec, _batch(rec, 1, (T - 10, b"/shell.php")), T)
    rule = Rule()
    started, release = threading.Event(), threading.Event()
    result: list[list[dict[str, object]]] = []

    def slow_run() -> None:
        with a.schedule_run(rule.rule_id, "hourly", T) as mine:
            assert mine
            fresh, docs = ev._pick(a, rule, T, None, {})
            result.append(ev._record(a, rule, fresh, docs, T, {}))
            started.set()
            release.wait(10)

    th = threading.Thread(target=slow_run)
    th.start()
    assert started.wait(10)
    assert b.list_alerts(0) == []  # not committed yet: nothing half-written is visible
    timer = threading.Timer(0.5, release.set)
    timer.start()
    t0 = time.monotonic()
    assert ev.run_hourly(b, rule, T) == []  # waited for a's run, then found it done
    assert time.monotonic() - t0 >= 0.3
    th.join()
    assert len(result[0]) == 1
    assert len(b.list_alerts(0)) == 1


def test_a_replica_dying_mid_run_leaves_nothing_and_another_redoes_it(stores: tuple[Store, Store]) -> None:
    a, b = stores
    rec = _agent(a, "x")
    a.ingest(rec, _batch(rec, 1, (T - 10, b"/shell.php")), T)
    rule = Rule()
    with pytest.raises(RuntimeError), a.schedule_run(rule.rule_id, "hourly", T) as mine:
        assert mine
        fresh, docs = ev._pick(a, rule, T, None, {})
        assert ev._record(a, rule, fresh, docs, T, {})
        raise RuntimeError("killed mid-run")
    assert b.list_alerts(0) == []
    assert len(ev.run_hourly(b, rule, T)) == 1
    assert ev.run_hourly(a, rule, T) == []


def test_partitions_hourly_ahead_default_and_retention(stores: tuple[Store, Store]) -> None:
    a, b = stores
    rec = _agent(a, "x")
    far_past, far_future = T - 30 * 24 * H, T + 10 * 24 * H
    a.ingest(rec, _batch(rec, 1, (T - 2 * H, b"/old"), (T - 5, b"/new"), (far_past, b"/ancient")), T)
    parts = _tables(a.path)
    hour = T // H
    from agent.collector.storage.postgres import partition_name

    assert {partition_name(hour + i) for i in (-2, 0, 1, 2, 3)} <= parts  # the batch's hours + 3 ahead
    assert "events_default" in parts and partition_name(far_past // H) not in parts
    # A far-future event waits in DEFAULT; once its hour is near, it moves into a partition.
    b.ingest(rec, _batch(rec, 2, (far_future, b"/future")), T)
    assert b.rows(Rule(), far_future) == [Row(1, 1, ("host-x",), ("x",), EXE, b"/future")]
    a.ingest(rec, _batch(rec, 3, (far_future - 1, b"/future")), far_future)
    assert partition_name(far_future // H) in _tables(a.path)
    assert b.rows(Rule(), far_future) == [Row(2, 1, ("host-x",), ("x",), EXE, b"/future")]
    # Retention drops whole partitions (and old rows of DEFAULT), never the hour holding the cutoff.
    assert b.prune(T - H) == 2  # /old's partition and /ancient in DEFAULT
    left = _tables(a.path)
    assert partition_name(hour - 2) not in left and partition_name(hour) in left
    assert a.rows(Rule(), T) == [Row(1, 1, ("host-x",), ("x",), EXE, b"/new")]
    # The other replica's partition cache is stale now: it still ingests.
    assert a.ingest(rec, _batch(rec, 4, (T - 2 * H + 1, b"/late")), T) == "stored"


def test_a_version_1_database_is_migrated_with_its_data(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Schema 2 adds who wrote each event and the suppression columns to a
    database that already holds events and alerts: nothing of them is lost."""
    import psycopg

    monkeypatch.setattr(postgres, "MIGRATIONS", postgres.MIGRATIONS[:1])
    monkeypatch.setattr(postgres, "SCHEMA_VERSION", 1)
    assert migrate(pg_url)["to"] == 1
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("INSERT INTO hosts(name) VALUES ('web-01')")
        c.execute(
            "INSERT INTO agents(agent_id, host_ref, key_hash, enrolled_ms) VALUES ('a', 1, 'k', %s)", (T,)
        )
        c.execute(
            "INSERT INTO pairs(key, exe, path, last_ts) VALUES (%s, %s, %s, %s)",
            (wire.pair_key(b"/usr/sbin/nginx", b"/w/s.php"), b"/usr/sbin/nginx", b"/w/s.php", T - 5),
        )
        c.execute("INSERT INTO events(ts, pair, agent, host, detail) VALUES (%s, 1, 1, 1, NULL)", (T - 5,))
        c.execute("INSERT INTO alerts(alert_id, rule_id, exe, path, at_ms, first_ts, doc) "
                  "VALUES ('x', 'r', NULL, NULL, %s, %s, '{\"old\": 1}')", (T - 1, T - 5))  # fmt: skip
    monkeypatch.undo()
    first, again = migrate(pg_url), migrate(pg_url)
    assert (first["from"], first["to"], again["from"], again["to"]) == (
        1,
        postgres.SCHEMA_VERSION,
        postgres.SCHEMA_VERSION,
        postgres.SCHEMA_VERSION,
    )
    store = open_store(pg_url)
    try:
        [row] = store.rows(Rule(), T)
        assert (row.path, row.cc, row.host_names) == (b"/w/s.php", 1, ("web-01",))
        [e] = store.pair_events((b"/usr/sbin/nginx", b"/w/s.php"), T - 3_600_000, T, 5)
        assert e.actor == (None, None, None)
        assert store.list_alerts(0) == [{"old": 1}]
    finally:
        store.close()
