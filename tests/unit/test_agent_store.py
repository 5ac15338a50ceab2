"""The agent's store and shipper with a fake collector: detail vs counts,
leases that never change, acks, splits and quarantine, corrupt files."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Mapping
from pathlib import Path

import msgpack
import pytest

from agent.sensor.outbox import AgentStore
from agent.sensor.shipper import Identity, Shipper
from agent.sensor.transport import FakeTransport, Response
from agent.shared import wire
from agent.shared.backoff import retry_after
from agent.shared.clock import FakeClock
from agent.shared.errors import EnrollError
from agent.shared.events import FileEvent, ProcessInfo, UserInfo
from agent.shared.rule import Rule

T0 = 1_795_780_800_000


def ev(path: bytes = b"/var/www/a.php", ts: int = T0, exe: bytes = b"/usr/sbin/nginx") -> FileEvent:
    return FileEvent(
        ts, "creation", path, ProcessInfo(42, "nginx", exe, 1, "nginx -g x"), UserInfo("33", "www-data")
    )


@pytest.fixture
def store(tmp_path: Path) -> AgentStore:
    return AgentStore(str(tmp_path / "agent.db"), Rule(), FakeClock(T0))


def test_detail_while_locally_rare_then_counts(store: AgentStore) -> None:
    detailed = store.record([ev(ts=T0 + i) for i in range(7)])
    assert detailed == 4  # events 1-4 are rare in the agent's hour; 5th onward are counts
    lease = store.lease("a1", "h1", 100)
    assert lease is not None
    batch = wire.decode_batch(lease.body)
    assert len(batch.events) == 4 and [len(c.times) for c in batch.counts] == [3]
    assert batch.size() == 7 and lease.n == 7
    assert batch.events[0].detail["pid"] == 42 and batch.events[0].detail["cmd"] == "nginx -g x"


def test_count_times_carry_who_wrote_them(store: AgentStore) -> None:
    """Bare times keep their actor (process name, user), grouped per actor:
    the collector's exceptions on process.name and user.* apply to them."""
    php = FileEvent(
        T0 + 9,
        "creation",
        b"/var/www/a.php",
        ProcessInfo(7, "php-fpm8.2", b"/usr/sbin/nginx"),
        UserInfo("33", None),
    )
    store.record([ev(ts=T0 + i) for i in range(6)] + [php])
    lease = store.lease("a1", "h1", 100)
    assert lease is not None
    batch = wire.decode_batch(lease.body)
    assert {(c.actor, c.times) for c in batch.counts} == {
        (("nginx", "www-data", "33"), (T0 + 4, T0 + 5)),
        (("php-fpm8.2", None, "33"), (T0 + 9,)),
    }
    assert batch.size() == 7


def test_a_pair_becomes_rare_again_after_an_hour(store: AgentStore) -> None:
    store.record([ev(ts=T0 + i) for i in range(5)])
    assert store.record([ev(ts=T0 + 3_600_000 + 10)]) == 1


def test_lease_bytes_never_change_until_acked(store: AgentStore) -> None:
    store.record([ev(path=f"/p{i}".encode(), ts=T0 + i) for i in range(10)])
    first = store.lease("a", "h", 4)
    store.record([ev(path=b"/later")])
    again = store.lease("a", "h", 100)
    assert first == again and first is not None and first.seq == 1
    store.ack(first)
    nxt = store.lease("a", "h", 100)
    assert nxt is not None and nxt.seq == 2 and nxt.n == 7
    store.ack(nxt)
    assert store.depth() == 0 and store.lease("a", "h", 100) is None


def test_lease_survives_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.db")
    s1 = AgentStore(path, Rule(), FakeClock(T0))
    s1.record([ev()])
    lease = s1.lease("a", "h", 10)
    s1.close()
    s2 = AgentStore(path, Rule(), FakeClock(T0 + 5000))
    assert s2.lease("a", "h", 10) == lease and s2.epoch == s1.epoch


def test_split_then_quarantine_the_poison_record(store: AgentStore) -> None:
    store.record([ev(path=f"/p{i}".encode(), ts=T0 + i) for i in range(4)])
    lease = store.lease("a", "h", 100)
    assert lease is not None
    store.split(lease, "HTTP 400")
    half = store.lease("a", "h", store.next_batch_limit(100))
    assert half is not None and half.n == 2 and half.seq == lease.seq
    store.split(half, "HTTP 400")
    one = store.lease("a", "h", store.next_batch_limit(100))
    assert one is not None and one.n == 1
    store.split(one, "HTTP 400: bad path")
    # kept on disk, and the event goes on without its detail: cc stays exact
    assert store.quarantined() == 1 and store.counters["quarantined"] == 1 and store.depth() == 4
    again = store.lease("a", "h", 1)
    assert again is not None
    batch = wire.decode_batch(again.body)
    assert batch.events == () and [c.path for c in batch.counts] == [b"/p0"]
    store.split(again, "HTTP 400: still refused")  # a refused time becomes a gap
    rest = store.lease("a", "h", 100)
    assert rest is not None
    rest_batch = wire.decode_batch(rest.body)
    assert [(g.reason, g.lost) for g in rest_batch.gaps] == [("quarantined", 1)]
    assert len(rest_batch.events) == 3 and store.quarantined() == 2


def _reset_gap(s: AgentStore) -> wire.GapRecord:
    lease = s.lease("a", "h", 100)
    assert lease is not None
    [gap] = wire.decode_batch(lease.body).gaps
    return gap


def test_corrupt_state_file_is_moved_aside_and_the_collector_told(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    path.write_bytes(b"SQLite format 3\x00" + os.urandom(4000))
    s = AgentStore(str(path), Rule(), FakeClock(T0))
    s.record([ev()])
    assert s.depth() == 2  # the event and the state_reset gap
    assert any(p.name.startswith("agent.db.corrupt-") for p in tmp_path.iterdir())
    gap = _reset_gap(s)
    assert gap.reason == "state_reset" and gap.end == T0 and gap.start <= T0 - 3_600_000


@pytest.mark.parametrize(
    "schema",
    [
        "CREATE TABLE outbox (x TEXT); CREATE TABLE meta (k TEXT PRIMARY KEY, v)",  # our names, not our columns
        "CREATE TABLE accounts (id INTEGER, name TEXT)",  # someone else's database
        "CREATE TABLE meta (k TEXT PRIMARY KEY, v)",  # ours in shape, never initialised
    ],
)
def test_a_foreign_state_file_is_moved_aside_not_a_crash_loop(tmp_path: Path, schema: str) -> None:
    import sqlite3

    path = tmp_path / "agent.db"
    with sqlite3.connect(path) as db:
        db.executescript(schema)
    db.close()
    s = AgentStore(str(path), Rule(), FakeClock(T0))  # today: "table outbox has no column named kind"
    s.record([ev()])
    assert any(p.name.startswith("agent.db.foreign-") for p in tmp_path.iterdir())
    assert _reset_gap(s).reason == "state_reset"
    s.close()
    again = AgentStore(str(path), Rule(), FakeClock(T0 + 1000))  # the new file is ours: kept
    assert again.depth() == 2
    assert sum(p.name.startswith("agent.db.foreign-") for p in tmp_path.iterdir()) == 1


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.db")
    s = AgentStore(path, Rule(), FakeClock(T0))
    s._db().execute("UPDATE meta SET v=99 WHERE k='schema_version'")
    s.close()
    with pytest.raises(Exception, match="newer"):
        AgentStore(path, Rule(), FakeClock(T0))


# The schema of version 1, as the first agents wrote it.
V1_SCHEMA = """
CREATE TABLE meta(k TEXT PRIMARY KEY, v);
CREATE TABLE win(pair BLOB NOT NULL, ts INTEGER NOT NULL);
CREATE INDEX win_pair_ts ON win(pair, ts);
CREATE INDEX win_ts ON win(ts);
CREATE TABLE outbox(id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind INTEGER NOT NULL, ts INTEGER NOT NULL, body BLOB NOT NULL);
CREATE TABLE lease(seq INTEGER PRIMARY KEY, batch_id TEXT NOT NULL,
    hi INTEGER NOT NULL, n INTEGER NOT NULL, body BLOB NOT NULL);
CREATE TABLE quarantine(id INTEGER PRIMARY KEY, at INTEGER NOT NULL,
    reason TEXT NOT NULL, kind INTEGER NOT NULL, body BLOB NOT NULL);
"""


def test_a_version_1_state_file_is_migrated_in_place(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.db")
    key = msgpack.packb([b"/usr/sbin/nginx", b"/var/www/a.php"], use_bin_type=True)
    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA)
    db.executemany(
        "INSERT INTO meta VALUES (?, ?)", [("schema_version", 1), ("epoch", "e" * 32), ("next_seq", 3)]
    )
    db.executemany("INSERT INTO win VALUES (?, ?)", [(key, T0 + i) for i in range(4)])
    db.executemany("INSERT INTO outbox(kind, ts, body) VALUES (1, ?, ?)", [(T0 + i, key) for i in range(4)])
    db.commit()
    db.close()
    s = AgentStore(path, Rule(), FakeClock(T0))
    db = s._db()
    assert db.execute("SELECT v FROM meta WHERE k='schema_version'").fetchone()[0] == 3
    indexes = {
        r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index' AND tbl_name='win'")
    }
    assert indexes == {"win_pair_ts"}
    assert s.epoch == "e" * 32 and s.depth() == 4
    assert s.record([ev(ts=T0 + 10)]) == 0  # the hour the old file holds still counts: a 5th event is a time
    lease = s.lease("a", "h", 100)
    assert lease is not None and lease.seq == 3 and lease.n == 5
    # rows of the old file were the first rule's alone; so is record() without masks
    batch = wire.decode_batch(lease.body)
    assert batch.rules == (Rule().rule_id,) and set(batch.count_rules) == {1}


def test_outbox_bound_drops_detail_first_then_oldest_times(tmp_path: Path) -> None:
    s = AgentStore(str(tmp_path / "a.db"), Rule(), FakeClock(T0), outbox_max=10)
    s.record([ev(path=f"/p{i}".encode(), ts=T0 + i) for i in range(15)])
    s.maintain()
    lease = s.lease("a", "h", 1000)
    assert lease is not None
    batch = wire.decode_batch(lease.body)
    assert s.counters["dropped"] == 5
    assert [g.reason for g in batch.gaps] == ["outbox_full"] and batch.gaps[0].lost == 5
    assert batch.size() == 11  # ten times + the gap


def _collector(
    status: int = 200, body: bytes = b'{"status": "stored"}', headers: Mapping[str, str] | None = None
) -> FakeTransport:
    def handler(url: str, data: bytes, hdrs: Mapping[str, str]) -> Response:
        if url.endswith("/enroll"):
            doc = json.loads(data)
            if doc["enrollment_secret"] != "s3cret":
                return Response(401, {}, b"{}")
            return Response(200, {}, b'{"api_key": "k-1"}')
        return Response(status, headers or {}, body)

    return FakeTransport(handler)


def build_shipper(
    store: AgentStore, transport: FakeTransport, tmp_path: Path, secret: str = "s3cret"
) -> Shipper:
    clock = store.clock
    return Shipper(store, transport, "http://c", str(tmp_path), Identity("a1", "h1"), secret, clock)


def test_enroll_once_keep_key_private_and_ship(store: AgentStore, tmp_path: Path) -> None:
    store.record([ev()])
    t = _collector()
    sh = build_shipper(store, t, tmp_path)
    assert sh.ship_once()
    assert [u.rsplit("/", 1)[1] for u, _, _ in t.sent] == ["enroll", "batches"]
    assert t.sent[1][2]["Authorization"] == "Bearer k-1"
    assert (os.stat(tmp_path / "api_key").st_mode & 0o777) == 0o600
    assert store.depth() == 0
    store.record([ev(path=b"/b")])
    assert build_shipper(store, t, tmp_path).ship_once()
    assert [u.rsplit("/", 1)[1] for u, _, _ in t.sent] == ["enroll", "batches", "batches"]


def test_a_409_starts_a_new_epoch_and_sends_the_same_rows_again(store: AgentStore, tmp_path: Path) -> None:
    """The collector already holds this epoch's seq from another batch (a
    restored snapshot or state dir): nothing was stored, nothing is acked."""
    store.record([ev(path=b"/p%d" % i, ts=T0 + i) for i in range(3)])
    answers = [
        Response(409, {}, b'{"error": "seq 1 ... start a new epoch"}'),
        Response(200, {}, b'{"status": "stored"}'),
    ]

    def handler(url: str, data: bytes, hdrs: Mapping[str, str]) -> Response:
        return Response(200, {}, b'{"api_key": "k-1"}') if url.endswith("/enroll") else answers.pop(0)

    t = FakeTransport(handler)
    sh = build_shipper(store, t, tmp_path)
    old_epoch = store.epoch
    assert not sh.ship_once()
    assert store.depth() == 3 and store.epoch != old_epoch and sh.counters["epoch_resets"] == 1
    assert sh.ship_once()
    refused, sent = (wire.decode_batch(b) for _, b, _ in t.sent[1:])
    assert (refused.epoch, refused.seq) == (old_epoch, 1) and (sent.epoch, sent.seq) == (store.epoch, 1)
    assert [e.path for e in sent.events] == [e.path for e in refused.events]
    assert store.depth() == 0


def test_enrolling_again_shows_the_current_key_and_a_refusal_is_fatal(
    store: AgentStore, tmp_path: Path
) -> None:
    """A renamed host, or a key the collector stopped knowing, enrolls again
    with its last key as proof; without one the collector answers 409 (the id
    is another key's), which stops the agent with what the admin must do."""
    answers = [Response(200, {}, b'{"api_key": "k-2"}'), Response(409, {}, b'{"error": "taken"}')]

    def handler(url: str, data: bytes, hdrs: Mapping[str, str]) -> Response:
        return answers.pop(0) if url.endswith("/enroll") else Response(200, {}, b'{"status": "stored"}')

    (tmp_path / "api_key").write_text(
        json.dumps({"agent_id": "a1", "host_name": "old-name", "api_key": "k-1"})
    )
    t = FakeTransport(handler)
    sh = build_shipper(store, t, tmp_path)
    assert sh.api_key() == "k-2"
    assert t.sent[0][2]["Authorization"] == "Bearer k-1"
    os.unlink(tmp_path / "api_key")
    with pytest.raises(EnrollError, match=r"409.*agents reset a1"):
        build_shipper(store, t, tmp_path).api_key()
    assert "Authorization" not in t.sent[1][2]  # a fresh state dir has nothing to prove


def test_heartbeats_go_out_on_their_interval_even_idle(store: AgentStore, tmp_path: Path) -> None:
    t = _collector()
    sh = build_shipper(store, t, tmp_path)
    sh.health = lambda: {"status": "ok", "counters": {"seen": 3}}
    sh.heartbeat_s = 30.0
    clock = store.clock

    def tick(n: int) -> None:  # one pass of the shipper loop per simulated 10 s
        for _ in range(n):
            sh._maybe_beat()
            clock.advance(10.0)  # type: ignore[attr-defined]

    sh.api_key()
    tick(7)  # 0, 30 and 60 s
    beats = [json.loads(b) for u, b, _ in t.sent if u.endswith("/heartbeat")]
    assert len(beats) == 3 and beats[0]["counters"] == {"seen": 3} and "sent_at" in beats[0]
    assert sh.counters["heartbeats"] == 3


def test_wrong_secret_is_fatal(store: AgentStore, tmp_path: Path) -> None:
    store.record([ev()])
    with pytest.raises(EnrollError, match="secret"):
        build_shipper(store, _collector(), tmp_path, secret="wrong").ship_once()
    assert store.depth() == 1


@pytest.mark.parametrize("status", [500, 503, 429, 502])
def test_server_errors_keep_the_batch_and_back_off(store: AgentStore, tmp_path: Path, status: int) -> None:
    store.record([ev()])
    sh = build_shipper(store, _collector(status, headers={"Retry-After": "7"}), tmp_path)
    assert not sh.ship_once()
    assert store.depth() == 1 and sh.not_before - store.clock.monotonic() == pytest.approx(7.0)
    assert not sh.ship_once()  # still backing off: nothing sent
    assert len(sh.transport.sent) == 2  # type: ignore[attr-defined]


def test_backoff_grows_with_jitter(store: AgentStore, tmp_path: Path) -> None:
    store.record([ev()])
    sh = build_shipper(store, _collector(500), tmp_path)
    delays = []
    for _ in range(8):
        sh.ship_once()
        delays.append(sh.not_before - store.clock.monotonic())
        store.clock.advance(delays[-1])  # type: ignore[attr-defined]
    assert max(delays) > 4 * min(delays) and all(d <= 300 for d in delays)


def test_a_400_splits_and_never_retries_poison_forever(store: AgentStore, tmp_path: Path) -> None:
    store.record([ev(path=b"/good1"), ev(path=b"/poison"), ev(path=b"/good2")])

    def handler(url: str, data: bytes, hdrs: Mapping[str, str]) -> Response:
        if url.endswith("/enroll"):
            return Response(200, {}, b'{"api_key": "k"}')
        doc = msgpack.unpackb(data, raw=False)
        if any(e["path"] == b"/poison" for e in doc["events"]):
            return Response(400, {}, b'{"error": "events[0].path: poison"}')
        return Response(200, {}, b'{"status": "stored"}')

    sh = build_shipper(store, FakeTransport(handler), tmp_path)
    for _ in range(10):
        sh.ship_once()
    assert store.depth() == 0 and store.quarantined() == 1


def test_retry_after_forms() -> None:
    assert retry_after({"Retry-After": "5"}, 0) == 5
    assert retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}, 1445412480) == 10
    assert retry_after({"Retry-After": "soon"}, 0) is None
    assert retry_after({}, 0) is None


def test_file_facts_are_read_after_the_writer_wrote_not_at_creation(tmp_path: Path) -> None:
    from agent.sensor.facts import FactsReader

    target = tmp_path / "shell.php"
    target.write_bytes(b"")  # FAN_CREATE comes when the file is still empty
    clock = FakeClock(T0)
    s = AgentStore(str(tmp_path / "a.db"), Rule(), clock, facts=FactsReader(clock))
    s.record([ev(path=os.fsencode(target), ts=T0)])
    assert s.lease("a", "h", 100) is None  # waiting for its facts: not shipped yet
    target.write_bytes(b"<?php system($_GET['c']); ?>")
    clock.advance(1.0)
    assert s.fill_facts() == 1
    lease = s.lease("a", "h", 100)
    assert lease is not None
    facts = wire.decode_batch(lease.body).events[0].detail["file"]
    assert (
        facts["size"] == len(target.read_bytes())
        and facts["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
    )
    assert facts["sample"].startswith(b"<?php")


def test_facts_of_a_file_gone_before_the_delay_say_so(tmp_path: Path) -> None:
    from agent.sensor.facts import FactsReader

    clock = FakeClock(T0)
    s = AgentStore(str(tmp_path / "a.db"), Rule(), clock, facts=FactsReader(clock))
    s.record([ev(path=os.fsencode(tmp_path / "gone.php"), ts=T0)])
    clock.advance(1.0)
    s.fill_facts()
    lease = s.lease("a", "h", 100)
    assert lease is not None and wire.decode_batch(lease.body).events[0].detail["file"] == {"gone": True}


def test_a_late_ack_of_an_acked_batch_does_not_move_the_sequence_back(store: AgentStore) -> None:
    store.record([ev(path=b"/a", ts=T0)])
    first = store.lease("a", "h", 100)
    assert first is not None
    store.ack(first)
    store.record([ev(path=b"/b", ts=T0 + 1)])
    second = store.lease("a", "h", 100)
    assert second is not None and second.seq == 2
    store.ack(second)
    store.ack(first)  # a slow answer for the first batch arrives after both were acked
    store.record([ev(path=b"/c", ts=T0 + 2)])
    third = store.lease("a", "h", 100)
    assert third is not None and third.seq == 3  # seq 2 again would be dropped as a duplicate


def test_an_unpackable_value_leaves_no_open_transaction(store: AgentStore) -> None:
    bad = FileEvent(
        T0, "creation", b"/x", ProcessInfo(1, "nginx", b"/usr/sbin/nginx"), UserInfo(object(), "w")
    )  # type: ignore[arg-type]
    with pytest.raises(AttributeError):  # a bug elsewhere must not wedge the store
        store.record([bad])
    assert not store._db().in_transaction
    store.record([ev(path=b"/after")])
    assert store.depth() == 1 and store.counters["not_stored"] == 0


def test_out_of_range_pids_are_not_put_on_the_wire(store: AgentStore) -> None:
    e = FileEvent(
        T0, "creation", b"/x", ProcessInfo(-1, "nginx", b"/usr/sbin/nginx", 1 << 40), UserInfo("33", "w")
    )
    store.record([e])
    lease = store.lease("a", "h", 10)
    assert lease is not None
    detail = wire.decode_batch(lease.body).events[0].detail  # the collector's own validation
    assert "pid" not in detail and "ppid" not in detail


def test_depth_kept_in_memory_equals_the_table(tmp_path: Path) -> None:
    import random

    from agent.shared.events import FileFacts

    rng = random.Random(3)
    clock = FakeClock(T0)
    path = str(tmp_path / "a.db")
    s = AgentStore(path, Rule(), clock, outbox_max=40, facts=lambda p: FileFacts(size=1))

    def count() -> int:
        return int(s._db().execute("SELECT count(*) FROM outbox").fetchone()[0])

    for step in range(300):
        op = rng.random()
        if op < 0.5:
            s.record(
                [
                    ev(path=b"/p%d" % rng.randint(0, 30), ts=T0 + step * 10 + i)
                    for i in range(rng.randint(0, 9))
                ]
            )
        elif op < 0.6:
            s.record_gap(T0, T0 + step, 3, "overflow")
        elif op < 0.75:
            lease = s.lease("a", "h", s.next_batch_limit(rng.randint(1, 20)))
            if lease is not None:
                s.ack(lease) if rng.random() < 0.7 else s.split(lease, "HTTP 400")
        elif op < 0.9:
            clock.advance(0.6)
            s.fill_facts()
        else:
            s.maintain()
        assert s.depth() == count(), step
    assert s.counters["dropped"] > 0 and s.quarantined() > 0  # the bound and quarantine ran
    s.close()
    assert AgentStore(path, Rule(), clock).depth() == count()


@pytest.mark.parametrize("full", [False, True])
def test_facts_go_into_the_stored_map_as_if_it_were_packed_again(tmp_path: Path, full: bool) -> None:
    from agent.shared.events import FileFacts

    facts = FileFacts(29, 0o100644, 33, 33, "ab" * 32, b"<?php \x00\xff")
    clock = FakeClock(T0)
    s = AgentStore(str(tmp_path / "a.db"), Rule(), clock, facts=lambda p: facts)
    proc = ProcessInfo(42, "nginx", b"/usr/sbin/nginx", 1, "nginx -g x", None, "systemd", b"/sbin/init")
    e = FileEvent(T0, "rename", b"/w/x.php", proc, UserInfo("33", "www-data"), ("change",), b"/w/.x")
    if not full:
        e = ev()
    s.record([e])
    doc = wire.event_map(e)
    assert len(doc) == (15 if full else 12)  # 15 keys: the header grows from a fixmap to a map16
    clock.advance(1.0)
    assert s.fill_facts() == 1
    (body,) = s._db().execute("SELECT body FROM outbox").fetchone()
    assert body == msgpack.packb({**doc, "file": wire.facts_map(facts)}, use_bin_type=True)


def test_a_disk_still_full_does_not_forget_what_it_lost_before(tmp_path: Path) -> None:
    s = AgentStore(str(tmp_path / "a.db"), Rule(), FakeClock(T0))
    s.record([ev(path=b"/first")])
    db = s._db()
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count={pages}")  # the file cannot grow: "database or disk is full"
    s.record([ev(path=b"/a%d" % i, ts=T0 + 10) for i in range(300)])
    s.record([ev(path=b"/b%d" % i, ts=T0 + 20) for i in range(200)])  # its gap write fails too
    assert s.counters["not_stored"] == 500
    db.execute("PRAGMA max_page_count=1000000")
    s.record([ev(path=b"/after", ts=T0 + 30)])
    gaps = [msgpack.unpackb(b, raw=False) for (b,) in db.execute("SELECT body FROM outbox WHERE kind=2")]
    assert gaps == [{"start": T0 + 10, "end": T0 + 20, "lost": 500, "reason": "disk_full"}]
    assert s.depth() == 3


def test_a_reload_that_raises_count_below_reads_the_times_again(store: AgentStore) -> None:
    store.rule = Rule(count_below=2)
    assert store.record([ev(ts=T0 + i) for i in range(7)]) == 1
    store.rule = Rule(count_below=5)  # what a SIGHUP reload does
    assert store.record([ev(ts=T0 + 7)]) == 0  # 8 events in the hour: still not rare


def test_no_lease_takes_an_event_while_its_facts_are_being_read(tmp_path: Path) -> None:
    from agent.shared.events import FileFacts

    clock = FakeClock(T0)
    leased: list[object] = []

    def facts(path: bytes) -> FileFacts:
        leased.append(s.lease("a", "h", 100))  # the shipper's thread, while the sensor reads the file
        return FileFacts(size=7)

    s = AgentStore(str(tmp_path / "a.db"), Rule(), clock, facts=facts)
    s.record([ev(path=b"/w/x.php")])
    clock.advance(1.0)
    assert s.fill_facts() == 1 and leased == [None]
    lease = s.lease("a", "h", 100)
    assert lease is not None and wire.decode_batch(lease.body).events[0].detail["file"]["size"] == 7


@pytest.mark.parametrize("answer", ["ack", "split"])
def test_a_failed_ack_or_split_leaves_no_open_transaction(store: AgentStore, answer: str) -> None:
    store.record([ev(path=b"/a"), ev(path=b"/b")])
    lease = store.lease("a", "h", 100)
    assert lease is not None
    db = store._db()
    db.execute(
        "CREATE TEMP TRIGGER boom BEFORE DELETE ON lease BEGIN SELECT RAISE(FAIL, 'disk I/O error'); END"
    )
    with pytest.raises(sqlite3.Error):
        store.ack(lease) if answer == "ack" else store.split(lease, "HTTP 400")
    assert not db.in_transaction  # else the write lock stays taken and every record() waits and fails
    db.execute("DROP TRIGGER boom")
    assert store.record([ev(path=b"/c")]) == 1 and store.depth() == 3
    assert store.lease("a", "h", 100) == lease  # still in flight, unchanged
    store.ack(lease)
    assert store.depth() == 1


def test_the_idle_release_closes_the_writers_connection_and_the_store_goes_on(store: AgentStore) -> None:
    assert store.record([ev(path=b"/var/www/%d.php" % i, ts=T0 + i) for i in range(600)]) == 600
    first = store._local.db
    store.release_memory()
    assert store._local.db is None  # its statements and page cache are gone with it
    # the hour it remembers is in the file: the same pair is counted across the reconnect
    assert store.record([ev(path=b"/var/www/1.php", ts=T0 + 700 + i) for i in range(4)]) == 3
    assert store._local.db is not None and store._local.db is not first
    assert store.depth() == 604
