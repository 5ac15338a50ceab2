"""The collector's store: idempotent ingest and the rule's rows, on hand-made
batches. Every test runs against both implementations: SQLite and PostgreSQL
(a throwaway server, see tests/support/pg.py)."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.collector import evaluate as ev
from agent.collector.admin import agents_cli
from agent.collector.storage import open_store
from agent.collector.storage.base import AgentRecord, EnrollToken, Store
from agent.collector.storage.sqlite import SCHEMA_VERSION, CollectorStore, order_key
from agent.shared import wire
from agent.shared.errors import StoreError
from agent.shared.rule import Row, Rule

T = 1_790_000_000_000
H = 3_600_000
EXE = b"/usr/sbin/apache2"


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s: Store = CollectorStore(str(tmp_path / "c.db"))
    else:
        s = open_store(request.getfixturevalue("pg_url"))
    yield s
    s.close()


def agent(store: Store, agent_id: str, host: str = "") -> AgentRecord:
    # enrolling again (a new host name) proves itself with the current key
    store.enroll(agent_id, host or f"host-{agent_id}", f"hash-{agent_id}", T, proof_hash=f"hash-{agent_id}")
    rec = store.agent_for_key(f"hash-{agent_id}")
    assert rec is not None
    return rec


class Seq:
    def __init__(self) -> None:
        self.n = 0

    def batch(
        self,
        a: AgentRecord,
        events: tuple[wire.EventRecord, ...] = (),
        counts: tuple[wire.CountRecord, ...] = (),
        gaps: tuple[wire.GapRecord, ...] = (),
        seq: int = 0,
        batch_id: str = "",
    ) -> wire.Batch:
        self.n += 1
        return wire.Batch(
            batch_id or os.urandom(16).hex(),
            "e" * 32,
            seq or self.n,
            a.agent_id,
            a.host_name,
            T,
            events,
            counts,
            gaps,
        )


def ev_(ts: int, path: bytes, exe: bytes | None = EXE, **detail: object) -> wire.EventRecord:
    return wire.EventRecord(ts, "creation", exe, path, dict(detail))


def test_ingest_and_rows(store: Store) -> None:
    a, b = agent(store, "a"), agent(store, "b")
    s = Seq()
    assert store.ingest(a, s.batch(a, (ev_(T - 10, b"/x", pid=5), ev_(T - 5, b"/y"))), T) == "stored"
    sb = Seq()
    assert store.ingest(b, sb.batch(b, (ev_(T - 7, b"/y"),)), T) == "stored"
    rows = store.rows(Rule(), T)
    assert rows == [Row(1, 1, ("host-a",), ("a",), EXE, b"/x")]
    two = store.rows(replace(Rule(), agent_count=2), T)
    assert two == [Row(2, 2, ("host-a", "host-b"), ("a", "b"), EXE, b"/y")]


def test_duplicate_batch_changes_nothing(store: Store) -> None:
    a = agent(store, "a")
    s = Seq()
    b1 = s.batch(a, (ev_(T - 10, b"/x"),))
    assert store.ingest(a, b1, T) == "stored"
    assert store.ingest(a, b1, T) == "duplicate"  # same name, same id
    # a new batch with a used seq (a restored snapshot): not stored, and not called a duplicate
    other = replace(b1, batch_id="f" * 32, events=(ev_(T - 9, b"/other"),))
    assert store.ingest(a, other, T) == "conflict"
    assert store.ingest(a, replace(b1, seq=9), T) == "duplicate"  # batch id seen
    assert store.rows(Rule(), T) == [Row(1, 1, ("host-a",), ("a",), EXE, b"/x")]
    assert store.gaps_overlapping(0, T + H) == []


def test_a_restored_agent_starts_a_new_epoch_and_loses_nothing(store: Store) -> None:
    a = agent(store, "a")
    first = Seq()
    for i in range(3):
        assert store.ingest(a, first.batch(a, (ev_(T - 100 + i, b"/before-%d" % i),)), T) == "stored"
    restored = Seq()  # the snapshot numbered from 1 again, same epoch
    again = restored.batch(a, (ev_(T - 50, b"/after"),))
    assert store.ingest(a, again, T) == "conflict"
    assert b"/after" not in {r.path for r in store.rows(Rule(), T)}
    assert store.ingest(a, replace(again, epoch="1" * 32, seq=1), T) == "stored"  # what the agent does then
    assert b"/after" in {r.path for r in store.rows(Rule(), T)}


def test_seq_gap_recorded(store: Store) -> None:
    a = agent(store, "a")
    s = Seq()
    store.ingest(a, s.batch(a, (ev_(T - 10, b"/x"),), seq=1), T)
    assert store.ingest(a, s.batch(a, (ev_(T - 9, b"/x"),), seq=4), T) == "stored"
    gaps = store.gaps_overlapping(T - H, T)
    assert [(g.agent_id, g.reason) for g in gaps] == [("a", "possible_loss")]
    assert store.counts()["gaps"] == {"possible_loss": 1}


def test_gaps_from_batch(store: Store) -> None:
    a = agent(store, "a")
    store.ingest(a, Seq().batch(a, gaps=(wire.GapRecord(T - 100, T - 50, 3, "overflow"),)), T)
    assert [(g.lost, g.reason) for g in store.gaps_overlapping(T - H, T)] == [(3, "overflow")]
    assert store.gaps_overlapping(T - 40, T) == []


def test_window_edges(store: Store) -> None:
    a = agent(store, "a")
    s = Seq()
    evs = (ev_(T - H, b"/out-low"), ev_(T - H + 1, b"/in-low"), ev_(T, b"/in-high"), ev_(T + 1, b"/out-high"))
    store.ingest(a, s.batch(a, evs), T)
    assert sorted(r.path or b"" for r in store.rows(Rule(), T)) == [b"/in-high", b"/in-low"]


@pytest.mark.parametrize(("n", "rare"), [(4, True), (5, False), (6, False)])
def test_count_edges(store: Store, n: int, rare: bool) -> None:
    a = agent(store, "a")
    store.ingest(a, Seq().batch(a, tuple(ev_(T - i, b"/p") for i in range(n))), T)
    assert bool(store.rows(Rule(), T)) is rare


def test_none_exe_and_path_and_counts(store: Store) -> None:
    a = agent(store, "a")
    s = Seq()
    store.ingest(
        a, s.batch(a, (ev_(T - 3, None, exe=None),), (wire.CountRecord(None, None, (T - 2, T - 1)),)), T
    )
    store.ingest(a, s.batch(a, counts=(wire.CountRecord(EXE, None, (T - 2,)),)), T)
    rows = store.rows(Rule(), T)
    assert rows == [Row(1, 1, ("host-a",), ("a",), EXE, None), Row(3, 1, ("host-a",), ("a",), None, None)]


def test_counts_count_like_events(store: Store) -> None:
    a = agent(store, "a")
    s = Seq()
    store.ingest(a, s.batch(a, (ev_(T - 10, b"/p"),)), T)
    store.ingest(a, s.batch(a, counts=(wire.CountRecord(EXE, b"/p", (T - 9, T - 9, T - 8)),)), T)
    assert store.rows(Rule(), T) == [Row(4, 1, ("host-a",), ("a",), EXE, b"/p")]
    store.ingest(a, s.batch(a, counts=(wire.CountRecord(EXE, b"/p", (T - 1,)),)), T)
    assert store.rows(Rule(), T) == []


def test_identity_host_from_enrollment(store: Store) -> None:
    a = agent(store, "a", "real-host")
    store.ingest(a, replace(Seq().batch(a, (ev_(T - 1, b"/p"),)), host_name="liar"), T)
    assert store.rows(Rule(), T)[0].host_names == ("real-host",)


def test_one_agent_under_two_host_names_is_one_row_with_both(store: Store) -> None:
    a = agent(store, "a", "web-old")
    s = Seq()
    store.ingest(a, s.batch(a, (ev_(T - 20, b"/p"), ev_(T - 19, b"/q"))), T)
    a = agent(store, "a", "web-new")  # re-enrolled under a new host name
    store.ingest(a, s.batch(a, (ev_(T - 10, b"/p"),)), T)
    assert store.rows(Rule(), T) == [
        Row(1, 1, ("web-old",), ("a",), EXE, b"/q"),
        Row(2, 1, ("web-new", "web-old"), ("a",), EXE, b"/p"),
    ]
    assert store.ranked_rows(Rule(), T)[1].first_ts == T - 20


def test_enroll_revoke_restore_reenroll(store: Store) -> None:
    agent(store, "a")
    # the fleet secret alone cannot replace an enrolled agent's key ...
    assert store.enroll("a", "h1", "stolen", T) == "taken"
    assert store.enroll("a", "h1", "stolen", T, proof_hash="a wrong key's hash") == "taken"
    assert store.agent_for_key("stolen") is None and store.agent_for_key("hash-a") is not None
    # ... its current key can
    assert store.enroll("a", "h1", "hash-a2", T, proof_hash="hash-a") == "rekeyed"
    assert store.agent_for_key("hash-a") is None
    assert store.revoke("a") and not store.revoke("nobody")
    rec = store.agent_for_key("hash-a2")
    assert rec is not None and rec.revoked
    assert store.enroll("a", "h2", "new-hash", T, proof_hash="hash-a2") == "revoked"  # stays out
    assert store.agent_for_key("new-hash") is None
    assert store.restore("a") and not store.restore("nobody")  # an admin's reset
    assert store.agent_for_key("hash-a2") is None  # the old key stays dead
    assert store.enroll("a", "h2", "new-hash", T) == "rekeyed"  # the secret alone, once
    rec = store.agent_for_key("new-hash")
    assert rec is not None and not rec.revoked and rec.host_name == "h2"
    assert store.enroll("a", "h3", "again", T) == "taken"
    assert [x.agent_id for x in store.list_agents()] == ["a"]
    assert store.enroll("b", "hb", "hash-b", T) == "new"


def test_enrollment_tokens_are_spent_only_on_success(store: Store) -> None:
    agent(store, "taken")
    store.add_token("tok-any", EnrollToken("t1", None, 2, T + H, T, "two hosts"))
    store.add_token("tok-bound", EnrollToken("t2", "taken", 1, T + H, T))
    store.add_token("tok-old", EnrollToken("t3", None, 5, T - 1, T - H))
    assert store.enroll("x", "hx", "k-x", T, token_hash="nope") == "bad_token"
    assert store.enroll("x", "hx", "k-x", T, token_hash="tok-old") == "bad_token"  # expired
    assert store.enroll("y", "hy", "k-y", T, token_hash="tok-bound") == "bad_token"  # another id's
    assert store.enroll("taken", "h", "k-t", T, token_hash="tok-any") == "taken"  # not spent
    assert store.enroll("x", "hx", "k-x", T, token_hash="tok-any") == "new"
    assert store.enroll("z", "hz", "k-z", T, token_hash="tok-any") == "new"
    assert store.enroll("w", "hw", "k-w", T, token_hash="tok-any") == "bad_token"  # used up
    # a token an admin bound to an id re-keys it (it is the admin's action), once
    assert store.enroll("taken", "h", "k-t", T, token_hash="tok-bound") == "rekeyed"
    assert store.agent_for_key("k-t") is not None and store.agent_for_key("hash-taken") is None
    assert store.enroll("taken", "h", "k-t2", T, token_hash="tok-bound") == "bad_token"
    assert [(t.token_id, t.uses_left) for t in store.list_tokens()] == [("t3", 5), ("t1", 0), ("t2", 0)]
    assert store.revoke_token("t3") and not store.revoke_token("t9")
    assert store.enroll("v", "hv", "k-v", T - 2 * H, token_hash="tok-old") == "bad_token"  # revoked


def test_heartbeats_keep_health_and_never_move_last_seen_back(store: Store) -> None:
    a = agent(store, "a")
    store.heartbeats([(a.ref, T, '{"status": "ok"}')])
    store.heartbeats([(a.ref, T - 5000, '{"status": "degraded"}')])
    (got,) = store.list_agents()
    assert (got.last_seen_ms, got.health) == (T, '{"status": "degraded"}')


def test_prune(store: Store) -> None:
    a = agent(store, "a")
    s = Seq()
    store.ingest(a, s.batch(a, tuple(ev_(T - 2 * H - i, b"/old%d" % i) for i in range(7))), T)
    store.ingest(
        a, s.batch(a, (ev_(T - 5, b"/new"),), gaps=(wire.GapRecord(T - 3 * H, T - 3 * H, 0, "x"),)), T
    )
    assert store.prune(T - H) == 7
    assert store.rows(replace(Rule(), window_ms=4 * H), T) == [Row(1, 1, ("host-a",), ("a",), EXE, b"/new")]
    assert store.gaps_overlapping(0, T) == []


def test_alerts_hourly_once_per_overlapping_window(store: Store) -> None:
    a, b = agent(store, "a"), agent(store, "b")
    s = Seq()
    store.ingest(
        a, s.batch(a, (ev_(T - 10, b"/shell.php", pid=42, cmd="php -r x\x1b[31m\n", uname="www-data"),)), T
    )
    store.ingest(b, Seq().batch(b, gaps=(wire.GapRecord(T - 100, T - 90, 0, "overflow"),)), T)
    rule = Rule()
    alerts = ev.run_hourly(store, rule, T)
    assert len(alerts) == 1
    doc = alerts[0]
    assert doc["event"]["kind"] == "signal" and doc["rarewrite"]["gap_on_other_agents"] is True
    assert doc["threat"][0]["tactic"]["reference"] == "https://attack.mitre.org/tactics/TA0003/"
    assert doc["rarewrite"]["events"][0]["process.pid"] == 42
    text = ev.dumps(doc)
    assert "\x1b" not in text and "\n" not in text and "\\u001b" in text
    assert ev.run_hourly(store, rule, T) == []  # same run again: nothing new
    assert ev.run_hourly(store, rule, T + H // 2) == []  # overlapping window
    again = ev.run_hourly(store, rule, T + H + 20)  # the event left the window
    assert again == []
    assert len(store.list_alerts(0)) == 1
    assert json.loads(text)["kibana"]["alert"]["uuid"] == store.list_alerts(0)[0]["kibana"]["alert"]["uuid"]


def test_continuous_settle(store: Store) -> None:
    a = agent(store, "a")
    store.ingest(a, Seq().batch(a, (ev_(T - 10_000, b"/p"),)), T)
    assert ev.run_continuous(store, Rule(), T, settle_ms=30_000) == []
    assert len(ev.run_continuous(store, Rule(), T + 20_000, settle_ms=30_000)) == 1
    assert ev.run_continuous(store, Rule(), T + 21_000, settle_ms=30_000) == []


def test_continuous_keeps_alerting_new_pairs_past_the_limit_of_old_ones(store: Store) -> None:
    a = agent(store, "a")
    s = Seq()
    store.ingest(a, s.batch(a, tuple(ev_(T - 60_000, f"/old/{i}".encode()) for i in range(5))), T)
    rule = replace(Rule(), limit=3)
    first = ev.run_continuous(store, rule, T, settle_ms=1000)
    assert len(first) == 3  # the limit caps one run
    assert len(ev.run_continuous(store, rule, T + 1000, settle_ms=1000)) == 2  # then the rest
    store.ingest(a, s.batch(a, (ev_(T + 2000, b"/new/shell.php"),)), T + 2000)
    new = ev.run_continuous(store, rule, T + 4000, settle_ms=1000)
    assert [d["file"]["path"] for d in new] == ["/new/shell.php"]


def test_continuous_skips_unsettled_rows_that_fill_the_first_limit(store: Store) -> None:
    # The first rows by (cc, exe, path) are too fresh to alert: the run must
    # look past them (it asks the store for more rows until it has enough).
    a = agent(store, "a")
    s = Seq()
    store.ingest(a, s.batch(a, tuple(ev_(T - 500, f"/a/{i:02d}".encode()) for i in range(10))), T)
    store.ingest(a, s.batch(a, tuple(ev_(T - 60_000, f"/b/{i:02d}".encode()) for i in range(10))), T)
    rule = replace(Rule(), limit=3)
    paths = [
        [d["file"]["path"] for d in ev.run_continuous(store, rule, T + k, settle_ms=1000)] for k in (0, 1)
    ]
    assert paths == [["/b/00", "/b/01", "/b/02"], ["/b/03", "/b/04", "/b/05"]]
    assert len(ev.run_continuous(store, replace(rule, limit=100), T + 600, settle_ms=1000)) == 14


def test_hostile_bytes_rendered(store: Store) -> None:
    a = agent(store, "a")
    path = b"/var/www/\xff\xfe\n\x1b[2J" + b"a" * 4000
    store.ingest(a, Seq().batch(a, (ev_(T - 1, path, orig=b"/tmp/\x00x"),)), T)
    alerts = ev.run_hourly(store, Rule(), T)
    text = ev.dumps(alerts[0])
    assert text.isascii() and "\n" not in text and "\x1b" not in text


def test_evaluate_db_readonly_and_missing(tmp_path: Path, store: Store) -> None:
    a = agent(store, "a")
    store.ingest(a, Seq().batch(a, (ev_(T - 1, b"/p"),)), T)
    assert ev.evaluate_db(store.path, Rule(), T) == store.rows(Rule(), T)
    with pytest.raises(StoreError, match="no collector database"):
        ev.evaluate_db(str(tmp_path / "missing.db"), Rule(), T)
    assert not (tmp_path / "missing.db").exists()


def test_evaluate_on_an_empty_postgres_database_is_refused(pg_url: str) -> None:
    with pytest.raises(StoreError, match="not a rarewrite collector database"):
        ev.evaluate_db(pg_url, Rule(), T)


def test_newer_postgres_schema_refused(pg_url: str) -> None:
    open_store(pg_url).close()
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(StoreError, match="newer"):
        open_store(pg_url)


def test_newer_schema_refused(tmp_path: Path) -> None:
    p = str(tmp_path / "n.db")
    CollectorStore(p).close()
    with contextlib.closing(sqlite3.connect(p)) as c, c:
        c.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(StoreError, match="newer"):
        CollectorStore(p)


def test_store_error_on_readonly_write(store: Store) -> None:
    ro = open_store(store.path, readonly=True)
    try:
        with pytest.raises(StoreError):
            ro.enroll("x", "h", "k", T)
    finally:
        ro.close()


def test_agents_cli(store: Store) -> None:
    agent(store, "a")
    assert [x["agent_id"] for x in agents_cli(store.path, "list")] == ["a"]
    assert agents_cli(store.path, "revoke", "a")[0]["revoked"] is True
    with pytest.raises(StoreError):
        agents_cli(store.path, "revoke", "zz")


def test_migrate_sqlite(tmp_path: Path) -> None:
    from agent.collector.storage import migrate

    p = str(tmp_path / "m.db")
    assert migrate(p) == {"backend": "sqlite", "db": p, "from": 0, "to": SCHEMA_VERSION}
    assert migrate(p)["from"] == SCHEMA_VERSION


NAMES = st.one_of(st.none(), st.binary(min_size=1, max_size=6).map(lambda b: b.replace(b"\x02", b"\xff")))


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.tuples(NAMES, NAMES), max_size=30))
def test_order_key_sorts_like_order_by_exe_path(pairs: list[tuple[bytes | None, bytes | None]]) -> None:
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        db.execute("CREATE TABLE p (exe BLOB, path BLOB)")
        db.executemany("INSERT INTO p VALUES (?, ?)", pairs)
        want = db.execute("SELECT exe, path FROM p ORDER BY exe, path").fetchall()
    assert sorted(pairs, key=lambda p: order_key(*p)) == want
    assert len({order_key(*p) for p in pairs}) == len(set(pairs))


def _as_version_3(c: sqlite3.Connection) -> None:
    """Undo schema 4: no agent health, no enrollment tokens."""
    c.execute("ALTER TABLE agents DROP COLUMN health")
    c.execute("DROP TABLE enroll_tokens")
    c.execute("UPDATE meta SET value='3' WHERE key='schema_version'")


def _as_version_2(c: sqlite3.Connection) -> None:
    """Undo schema 3: no actors, no suppression columns."""
    _as_version_3(c)
    c.execute("DROP INDEX alerts_skey")
    for column in ("skey", "folded_into", "dirty", "emitted_ms"):
        c.execute(f"ALTER TABLE alerts DROP COLUMN {column}")
    c.execute("ALTER TABLE events DROP COLUMN actor")
    c.execute("DROP TABLE actors")
    c.execute("UPDATE meta SET value='2' WHERE key='schema_version'")


def _as_version_1(path: str) -> None:
    """Turn a new collector file into what schema version 1 looked like:
    pairs keyed by msgpack([exe, path]), events indexed by (ts, pair, agent, host)."""
    with contextlib.closing(sqlite3.connect(path)) as c, c:
        _as_version_2(c)
        c.create_function("v1_key", 2, wire.pair_key)
        c.execute("DROP INDEX events_pair")
        c.execute("DROP INDEX events_ts")
        c.execute("CREATE INDEX events_window ON events(ts, pair, agent, host)")
        c.execute("UPDATE pairs SET key = v1_key(exe, path)")
        c.execute("UPDATE meta SET value='1' WHERE key='schema_version'")


def test_version_1_file_is_migrated_in_place(tmp_path: Path) -> None:
    from agent.collector.storage import migrate

    p = str(tmp_path / "v1.db")
    store = CollectorStore(p)
    a = agent(store, "a")
    s = Seq()
    store.ingest(a, s.batch(a, (ev_(T - 9, b"/x", pid=9), ev_(T - 8, None, None), ev_(T - 7, b"/y"))), T)
    store.ingest(a, s.batch(a, counts=(wire.CountRecord(EXE, b"/y", (T - 6,)),)), T)
    before = store.rows(Rule(), T)
    store.close()
    _as_version_1(p)
    with pytest.raises(StoreError, match=r"older than this rarewrite.s.*collector migrate"):
        ev.evaluate_db(p, Rule(), T)
    assert migrate(p) == {"backend": "sqlite", "db": p, "from": 1, "to": SCHEMA_VERSION}
    assert ev.evaluate_db(p, Rule(), T) == before
    store = CollectorStore(p)
    try:
        assert [(e.detail or {}).get("pid") for e in store.pair_events((EXE, b"/x"), T - H, T, 5)] == [9]
        # A pair seen again keeps its row: the new key finds the old pair.
        store.ingest(a, s.batch(a, (ev_(T - 1, b"/x"),)), T)
        assert [(r.path, r.cc) for r in store.rows(Rule(), T)] == [(None, 1), (b"/x", 2), (b"/y", 2)]
        with contextlib.closing(sqlite3.connect(p)) as c:
            assert c.execute("SELECT count(*) FROM pairs").fetchone() == (3,)
    finally:
        store.close()


def test_version_1_file_is_migrated_by_a_writer_that_opens_it(tmp_path: Path) -> None:
    p = str(tmp_path / "v1.db")
    store = CollectorStore(p)
    a = agent(store, "a")
    store.ingest(a, Seq().batch(a, (ev_(T - 9, b"/x"),)), T)
    store.close()
    _as_version_1(p)
    store = CollectorStore(p)
    try:
        assert [r.path for r in store.rows(Rule(), T)] == [b"/x"]
    finally:
        store.close()
    with contextlib.closing(sqlite3.connect(p)) as c:
        assert c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (
            str(SCHEMA_VERSION),
        )
        indexes = {n for (n,) in c.execute("SELECT name FROM sqlite_master WHERE tbl_name='events'")}
        assert indexes == {"events", "events_pair", "events_ts"}
