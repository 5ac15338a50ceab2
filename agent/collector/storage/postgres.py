"""The collector's store on PostgreSQL (psycopg 3): what several collectors share.

Select it with ``--db postgresql://USER@HOST:PORT/DB`` (or ``postgres://``,
or ``[collector] db``). The password comes from the URL or from libpq's own
``PGPASSWORD`` / ``PGPASSFILE``; it never reaches a log line (see
:func:`agent.shared.text.redact`).

Same data and answers as the SQLite store (the tests run one body over both),
built for many ``collector serve`` processes on one database:

- **Ingest** is one transaction per batch. The batch's name goes in first,
  ``INSERT ... ON CONFLICT DO NOTHING`` on ``(agent, epoch, seq)`` and
  ``(agent, batch_id)``: a batch resent to another collector while the first
  one still holds it waits for that transaction, then counts as a duplicate
  (or is stored, if the first one rolled back). Events go in with one
  ``INSERT ... SELECT FROM unnest(...)`` of array parameters. The statements
  run in pipeline mode: two round trips a batch (name, epoch, pairs, actors;
  then events and COMMIT). Deadlocks and serialization failures retry the
  whole transaction.
- **Events** are partitioned by range on ``ts``, one partition an hour
  (``events_pYYYYMMDD_HH``), created ahead of time by whichever collector
  ingests first, plus a DEFAULT partition for timestamps far from now.
  Retention drops whole partitions (no row-by-row DELETE, no bloat).
- **Evaluation** is one SQL statement (one snapshot), served by the index
  ``(ts, pair, agent, host)`` on each partition: a range on ts, then a hash
  aggregate by pair.
- **Schedules** run once across replicas: a scheduled run is one
  transaction holding an advisory lock on (rule, schedule); the hourly run
  also writes a lease row ``schedule_runs(rule_id, kind, at_ms)``, so the
  replicas that waited on the lock skip a run already committed, and redo
  one whose collector died (its transaction, alerts included, rolled back).
- **Migrations** are numbered steps applied in one transaction under an
  advisory lock (:func:`migrate`), by ``rarewrite collector migrate`` or when
  ``serve`` opens the database.
- **Connections**: one per thread (``threading.local``), opened on first
  use, reopened after a broken one; the server's threads (one writer, four
  readers) make five per collector process. No pool package needed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import socket
import threading
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import Any, Optional

import msgpack

from agent.collector.storage import notes, ticks
from agent.collector.storage.base import (
    ENROLL_BAD_TOKEN,
    ENROLL_NEW,
    ENROLL_REKEYED,
    ENROLL_TAKEN,
    HIT_INSERT_SQL,
    RESET_PREFIX,
    TERM_SELECT_SQL,
    TERM_UPSERT_SQL,
    TOKENS_SQL,
    AgentRecord,
    AlertItem,
    EnrollStatus,
    EnrollToken,
    GapRow,
    Pair,
    PairRef,
    RankedRow,
    StoredEvent,
    TermHit,
    WindowEvent,
    actor_keys,
    actor_of_key,
    can_have_rows,
    enroll_decision,
    hit_of,
    hits_query,
    is_replayed,
    newest_per_pair,
    order_key,
    possible_loss,
    term_writes,
    token_usable,
)
from agent.collector.terms import Candidate, Run
from agent.shared import wire
from agent.shared.errors import StoreError
from agent.shared.events import Actor
from agent.shared.exceptions import NO_ACTOR
from agent.shared.migrations import Migration, pending
from agent.shared.rule import Row, Rule
from agent.shared.text import redact
from agent.shared.wire.format import pair_key


def _b(v: Any) -> Optional[bytes]:
    return None if v is None else bytes(v)


log = logging.getLogger("rarewrite.collector.pgstore")


try:
    import psycopg
    from psycopg import errors as pg_errors
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "PostgreSQL needs psycopg 3: pip install 'rarewrite[postgres]' (or apt install python3-psycopg)"
    ) from e


SCHEMA_VERSION = 6
_EPOCH_SQL = (
    "INSERT INTO epochs(agent_ref, epoch, last_seq, last_sent_at) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (agent_ref, epoch) DO UPDATE SET last_seq = excluded.last_seq, "
    "last_sent_at = excluded.last_sent_at"
)
_CHANGES_SQL = "INSERT INTO pair_changes(received_ms, pairs) VALUES (%s, %s::int8[])"
_TERM_SELECT_SQL = (
    TERM_SELECT_SQL.replace("IN ({marks})", "= ANY(?)").replace("?", "%s") + " ORDER BY pair FOR UPDATE"
)
HOUR_MS = 3_600_000
AHEAD_HOURS = 3  # partitions kept ready past the current hour
BAND_BACK_HOURS = 7 * 24  # older timestamps go to the DEFAULT partition
BAND_AHEAD_HOURS = 48  # and so do timestamps this far in the future
# pairs.last_ts is only raised when it is this far behind (fewer row locks on
# hot pairs); pruning keeps a pair until last_ts is this much older than the cutoff.
LAST_TS_LAG_MS = 600_000
RETRIES = 5
EVAL_WORK_MEM = "256MB"
LOCK_CLASS = 0x52570000  # advisory lock class id ("RW")
LOCK_MIGRATE = 1
LOCK_PARTITIONS = 2
LOCK_SCHEDULE = 3
SCHEDULE_WAIT = "120s"  # how long an hourly run waits for another replica's

_V1 = """
CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE schema_migrations (
    version integer PRIMARY KEY,
    description text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE hosts (ref bigserial PRIMARY KEY, name text NOT NULL UNIQUE);
CREATE TABLE agents (
    ref bigserial PRIMARY KEY,
    agent_id text NOT NULL UNIQUE,
    host_ref bigint NOT NULL REFERENCES hosts(ref),
    key_hash text NOT NULL UNIQUE,
    revoked boolean NOT NULL DEFAULT false,
    enrolled_ms bigint NOT NULL,
    last_seen_ms bigint
);
CREATE TABLE pairs (
    ref bigserial PRIMARY KEY,
    key bytea NOT NULL UNIQUE,
    exe bytea,
    path bytea,
    last_ts bigint NOT NULL
);
CREATE INDEX pairs_last_ts ON pairs (last_ts);
CREATE TABLE epochs (
    agent_ref bigint NOT NULL,
    epoch text NOT NULL,
    last_seq bigint NOT NULL,
    last_sent_at bigint NOT NULL,
    PRIMARY KEY (agent_ref, epoch)
);
CREATE TABLE batches (
    agent_ref bigint NOT NULL,
    epoch text NOT NULL,
    seq bigint NOT NULL,
    batch_id text NOT NULL,
    received_ms bigint NOT NULL,
    records integer NOT NULL,
    PRIMARY KEY (agent_ref, epoch, seq),
    UNIQUE (agent_ref, batch_id)
);
CREATE INDEX batches_received ON batches (received_ms);
CREATE SEQUENCE events_id_seq CACHE 1000;
CREATE TABLE events (
    id bigint NOT NULL DEFAULT nextval('events_id_seq'),
    ts bigint NOT NULL,
    pair bigint NOT NULL,
    agent bigint NOT NULL,
    host bigint NOT NULL,
    detail bytea
) PARTITION BY RANGE (ts);
CREATE INDEX events_window ON events (ts, pair, agent, host);
CREATE INDEX events_pair ON events (pair, ts);
CREATE TABLE events_default PARTITION OF events DEFAULT;
CREATE TABLE gaps (
    id bigserial PRIMARY KEY,
    agent_ref bigint NOT NULL,
    start_ms bigint NOT NULL,
    end_ms bigint NOT NULL,
    lost bigint NOT NULL,
    reason text NOT NULL,
    received_ms bigint NOT NULL
);
CREATE INDEX gaps_end ON gaps (end_ms);
CREATE TABLE alerts (
    alert_id text PRIMARY KEY,
    rule_id text NOT NULL,
    exe bytea,
    path bytea,
    at_ms bigint NOT NULL,
    first_ts bigint NOT NULL,
    doc text NOT NULL
);
CREATE INDEX alerts_at ON alerts (at_ms);
CREATE INDEX alerts_rule_at ON alerts (rule_id, at_ms);
CREATE TABLE schedule_runs (
    rule_id text NOT NULL,
    kind text NOT NULL,
    at_ms bigint NOT NULL,
    owner text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (rule_id, kind, at_ms)
);
"""


def _v1(conn: psycopg.Connection[Any]) -> None:
    conn.execute(_V1.encode())


_V2 = """
CREATE TABLE actors (ref bigserial PRIMARY KEY, key bytea NOT NULL UNIQUE);
ALTER TABLE events ADD COLUMN actor bigint;
ALTER TABLE alerts ADD COLUMN skey bytea, ADD COLUMN folded_into text,
    ADD COLUMN dirty boolean NOT NULL DEFAULT false, ADD COLUMN emitted_ms bigint;
CREATE INDEX alerts_skey ON alerts (rule_id, skey, at_ms);
"""


def _v2(conn: psycopg.Connection[Any]) -> None:
    conn.execute(_V2.encode())


_V3 = """
ALTER TABLE agents ADD COLUMN health text;
CREATE TABLE enroll_tokens (
    token_hash text PRIMARY KEY,
    token_id text NOT NULL UNIQUE,
    agent_id text,
    uses_left integer NOT NULL,
    expires_ms bigint NOT NULL,
    created_ms bigint NOT NULL,
    comment text NOT NULL DEFAULT ''
);
"""


def _v3(conn: psycopg.Connection[Any]) -> None:
    conn.execute(_V3.encode())


_V4 = """
CREATE TABLE terms (
    rule_id text NOT NULL,
    agent_ref bigint NOT NULL,
    pair bytea NOT NULL,
    first_ts bigint NOT NULL,
    last_ts bigint NOT NULL,
    PRIMARY KEY (rule_id, agent_ref, pair)
);
CREATE INDEX terms_last ON terms (rule_id, last_ts);
CREATE TABLE term_hits (
    id bigserial PRIMARY KEY,
    rule_id text NOT NULL,
    ts bigint NOT NULL,
    received_ms bigint NOT NULL,
    agent_ref bigint NOT NULL,
    host_id text NOT NULL,
    exe bytea,
    path bytea,
    detail bytea,
    actor bytea
);
CREATE INDEX term_hits_ts ON term_hits (rule_id, ts);
CREATE INDEX term_hits_received ON term_hits (rule_id, received_ms);
"""


def _v4(conn: psycopg.Connection[Any]) -> None:
    conn.execute(_V4.encode())


def _v5(conn: psycopg.Connection[Any]) -> None:
    conn.execute(notes.NOTES_SCHEMA.format(**notes.PG_TYPES).encode())


# pairs.okey is order_key(exe, path): bytea compares as memcmp then length,
# so it sorts as ORDER BY exe, path. A btree entry holds at most ~2.7 kB and a
# path may be 16 KiB: the index holds a prefix, ties sort on the whole key.
ORDER_PREFIX = "substring(okey FROM 1 FOR 1024)"
# alerts by pair: exe and path are never b"" (the wire refuses empty names)
ALERT_PAIR_HASH = "sha256(coalesce(exe, '\\x'::bytea) || '\\x00'::bytea || coalesce(path, '\\x'::bytea))"
_V6 = f"""
CREATE INDEX pairs_order ON pairs ({ORDER_PREFIX});
CREATE TABLE pair_changes (
    id bigserial PRIMARY KEY,
    xid bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    received_ms bigint NOT NULL,
    pairs bigint[] NOT NULL
);
CREATE INDEX pair_changes_xid ON pair_changes (xid);
CREATE INDEX pair_changes_received ON pair_changes (received_ms);
CREATE INDEX alerts_pair ON alerts (rule_id, {ALERT_PAIR_HASH}, at_ms);
"""


# one index probe a pair (the planner's estimate for the range on at_ms alone
# can be far off while a window's alerts are fresh)
_ALERTED_SQL = f"""
SELECT a.exe, a.path FROM unnest(%s::bytea[]) AS h(x) CROSS JOIN LATERAL (
    SELECT exe, path FROM alerts WHERE rule_id = %s AND {ALERT_PAIR_HASH} = h.x AND at_ms > %s LIMIT 1
) AS a
"""  # noqa: S608 - constants only


def alert_pair_hash(pair: Pair) -> bytes:
    """ALERT_PAIR_HASH of a pair, computed here."""
    return hashlib.sha256((pair[0] or b"") + b"\x00" + (pair[1] or b"")).digest()


def _v6(conn: psycopg.Connection[Any]) -> None:
    conn.execute("ALTER TABLE pairs ADD COLUMN okey bytea")
    last = 0
    while True:
        got = conn.execute(
            "SELECT ref, exe, path FROM pairs WHERE ref > %s ORDER BY ref LIMIT 10000", (last,)
        ).fetchall()
        if not got:
            break
        conn.execute(
            "UPDATE pairs AS p SET okey = u.k FROM unnest(%s::int8[], %s::bytea[]) AS u(r, k) "
            "WHERE p.ref = u.r",
            ([int(r) for r, _, _ in got], [order_key(_b(e), _b(p)) for _, e, p in got]),
        )
        last = int(got[-1][0])
    conn.execute("ALTER TABLE pairs ALTER COLUMN okey SET NOT NULL")
    conn.execute((_V6 + ticks.TICKS_SCHEMA.format(int="bigint")).encode())


MIGRATIONS: tuple[Migration[psycopg.Connection[Any]], ...] = (
    Migration(1, "initial schema, events partitioned by hour", _v1),
    Migration(2, "who wrote each event (actors) for exceptions; alert suppression", _v2),
    Migration(3, "agents' health from heartbeats; per-host enrollment tokens", _v3),
    Migration(4, "several rules: the new-terms history and its new events", _v4),
    Migration(5, "what came after an alert's events: agents' notes, response actions", _v5),
    Migration(6, "pairs in (exe, path) order; the continuous schedule's memory", _v6),
)

# One statement, one snapshot. The window is a range on ts (partition pruning,
# then events_window); one hash aggregate by pair. With agent_count == 1 no
# DISTINCT is needed (min(agent) = max(agent)); only a row whose agent changed
# host names looks its hosts up again, through events_pair.
_ROWS_ONE_AGENT_SQL = """
WITH g AS (
    SELECT pair, count(*) AS cc, min(agent) AS a1, min(host) AS h1, max(host) AS h2, min(ts) AS first_ts
    FROM events
    WHERE ts > %(lo)s AND ts <= %(hi)s
    GROUP BY pair
    HAVING count(*) < %(below)s AND min(agent) = max(agent)
)
SELECT g.cc, 1, ARRAY[g.a1],
       CASE WHEN g.h1 = g.h2 THEN ARRAY[g.h1]
            ELSE (SELECT array_agg(DISTINCT e.host) FROM events e
                  WHERE e.pair = g.pair AND e.ts > %(lo)s AND e.ts <= %(hi)s) END,
       p.exe, p.path, g.first_ts
FROM g JOIN pairs AS p ON p.ref = g.pair
WHERE NOT (g.pair = ANY(%(skip)s::bigint[]))
ORDER BY g.cc, p.exe NULLS FIRST, p.path NULLS FIRST
LIMIT %(limit)s
"""
_ROWS_SQL = """
SELECT g.cc, g.ac, g.agents, g.hosts, p.exe, p.path, g.first_ts
FROM (
    SELECT pair, count(*) AS cc, count(DISTINCT agent) AS ac,
           array_agg(DISTINCT agent) AS agents, array_agg(DISTINCT host) AS hosts, min(ts) AS first_ts
    FROM events
    WHERE ts > %(lo)s AND ts <= %(hi)s
    GROUP BY pair
    HAVING count(*) < %(below)s AND count(DISTINCT agent) = %(agents)s
) AS g
JOIN pairs AS p ON p.ref = g.pair
WHERE NOT (g.pair = ANY(%(skip)s::bigint[]))
ORDER BY g.cc, p.exe NULLS FIRST, p.path NULLS FIRST
LIMIT %(limit)s
"""


# The ordered walk (as SQLite's _WALK_SQL): pairs in (exe, path) order through
# pairs_order, each one's events counted up to count_below through
# events_pair, v = 2 * cc + (agents ok); stop at the limit once that many
# pairs have the fewest events a row can have (v = vmin). v is computed per
# pair as the walk reaches it (a subquery in the target list is evaluated
# after the sort and limit). _COUNT: a tick's pairs, each one's newest
# count_below events in the window counted (see ticks.BusyPairs).
_V_PG = """(SELECT count(*) * 2 + ({ok})::int FROM (
        SELECT e.agent AS a FROM events AS e
        WHERE e.pair = p.ref AND e.ts > %(lo)s AND e.ts <= %(hi)s LIMIT %(below)s) AS s)"""
_OK_ONE, _OK_ANY = "min(a) = max(a)", "count(DISTINCT a) = %(agents)s"
_P_ORDER_PREFIX = ORDER_PREFIX.replace("okey", "p.okey")
_WALK_PG = """
SELECT ref FROM (
    SELECT p.ref, {v} AS v FROM pairs AS p
    WHERE NOT (p.ref = ANY(%(skip)s::bigint[]))
    ORDER BY {order}, p.okey LIMIT %(budget)s
) AS w WHERE v = %(vmin)s LIMIT %(limit)s
"""
_COUNT_PG = """
SELECT c.ref, x.cc, x.ok, x.oldest FROM unnest(%(refs)s::bigint[]) AS c(ref) CROSS JOIN LATERAL (
    SELECT count(*) AS cc, coalesce({ok}, false) AS ok, min(s.ts) AS oldest FROM (
        SELECT e.agent AS a, e.ts FROM events AS e
        WHERE e.pair = c.ref AND e.ts > %(lo)s AND e.ts <= %(hi)s ORDER BY e.ts DESC LIMIT %(below)s
    ) AS s
) AS x WHERE x.cc > 0
"""
_RANKED_PG = {
    (mode, one): sql.format(v=_V_PG.format(ok=_OK_ONE if one else _OK_ANY), order=_P_ORDER_PREFIX,
                            ok=_OK_ONE if one else _OK_ANY)
    for mode, sql in (("walk", _WALK_PG), ("count", _COUNT_PG))
    for one in (True, False)
}  # fmt: skip
# the rows of the pairs the walk chose (each has fewer than count_below events)
_DETAIL_PG = """
SELECT d.cc, d.ac, d.agents, d.hosts, p.exe, p.path, d.first_ts
FROM unnest(%(refs)s::bigint[]) AS r(ref) JOIN pairs AS p ON p.ref = r.ref
CROSS JOIN LATERAL (
    SELECT count(*) AS cc, count(DISTINCT e.agent) AS ac, array_agg(DISTINCT e.agent) AS agents,
           array_agg(DISTINCT e.host) AS hosts, min(e.ts) AS first_ts
    FROM events AS e WHERE e.pair = r.ref AND e.ts > %(lo)s AND e.ts <= %(hi)s
) AS d
WHERE d.cc > 0
"""
# For statements that look up a few events of each of many pairs: the
# estimate (every pair, a subquery each) would start the JIT compiler (~20 ms
# for a walk that stops after a few hundred pairs), and a bitmap scan's set-up
# costs more than the plain index scan of count_below entries (~1/3 of a tick).
_PER_PAIR_SETTINGS = "SET LOCAL jit = off; SET LOCAL enable_bitmapscan = off"
WALK_PAIRS = 100_000  # as SQLite's: walk for limits up to this, through max(WALK_PAIRS, 10 * limit) pairs
# A batch's pairs in one statement: the known ones read without a lock (their
# last_ts raised only when stale), the new ones inserted. Rows: (key, ref,
# stale) of each pair, then (NULL, ref, NULL) of each stale pair raised; a
# stale pair not raised was deleted meanwhile by a prune (see _interned).
_INTERN_SQL = """
WITH w(k, e, p, t, o) AS (
    SELECT * FROM unnest(%b::bytea[], %b::bytea[], %b::bytea[], %s::int8[], %b::bytea[])
),
old AS (
    SELECT pairs.ref, w.k, w.t, pairs.last_ts < w.t - %s::int8 AS stale
    FROM w JOIN pairs ON pairs.key = w.k
),
raised AS (
    UPDATE pairs SET last_ts = greatest(pairs.last_ts, old.t) FROM old
    WHERE pairs.ref = old.ref AND old.stale RETURNING pairs.ref
),
added AS (
    INSERT INTO pairs(key, exe, path, last_ts, okey)
    SELECT k, e, p, t, o FROM w WHERE NOT EXISTS (SELECT FROM old WHERE old.k = w.k) ORDER BY k
    ON CONFLICT (key) DO UPDATE SET last_ts = greatest(pairs.last_ts, excluded.last_ts)
    RETURNING key, ref
)
SELECT k, ref, stale FROM old
UNION ALL SELECT key, ref, false FROM added
UNION ALL SELECT NULL, ref, NULL FROM raised
"""
# A batch's rows of the events table, in the order of event_rows: its events
# (with their details), then each count time. Integer columns travel as array
# literals, cheaper to build than a list psycopg dumps value by value (see
# _event_arrays); bytea arrays as binary (%b: in text each value is escaped).
_EVENTS_SQL = """
INSERT INTO events (ts, pair, agent, host, detail, actor)
SELECT e.ts, e.pair, %s::int8, %s::int8, e.detail, e.actor
FROM unnest(%s::int8[], %s::int8[], %b::bytea[], %s::int8[]) AS e(ts, pair, detail, actor)
UNION ALL
SELECT c.ts, c.pair, %s::int8, %s::int8, NULL::bytea, c.actor
FROM unnest(%s::int8[], %s::int8[], %s::int8[]) AS c(ts, pair, actor)
"""


def _interned(cur: Optional[psycopg.Cursor[Any]]) -> dict[bytes, int]:
    """Pair key -> ref from :data:`_INTERN_SQL`'s rows; _Retry when a stale
    pair vanished under a concurrent prune."""
    refs: dict[bytes, int] = {}
    stale = raised = 0
    for key, ref, was_stale in cur.fetchall() if cur is not None else ():
        if key is None:
            raised += 1
            continue
        refs[bytes(key)] = int(ref)
        stale += bool(was_stale)
    if raised != stale:
        raise _Retry()
    return refs


def _array(items: Iterable[str]) -> str:
    return "{" + ",".join(items) + "}"


def _event_arrays(
    batch: wire.RowBatch, refs: dict[bytes, int], agent: AgentRecord, actors: dict[bytes, int]
) -> tuple[Any, ...]:
    """The parameters of :data:`_EVENTS_SQL` for ``batch``."""
    ev = batch.events
    who: dict[Optional[bytes], str] = {None: "NULL"}
    who.update((k, str(r)) for k, r in actors.items())
    c_ts, c_pair, c_actor = [], [], []
    for key, _, _, times, actor in batch.counts:
        if times:
            n = len(times)
            c_ts.append(",".join(map(str, times)))
            c_pair.append(",".join([str(refs[key])] * n))
            c_actor.append(",".join([who[actor]] * n))
    return (
        *(agent.ref, agent.host_ref),
        _array(str(e[0]) for e in ev),
        _array(str(refs[e[1]]) for e in ev),
        [e[4] for e in ev],
        _array(who[e[5]] for e in ev),
        *(agent.ref, agent.host_ref),
        _array(c_ts),
        _array(c_pair),
        _array(c_actor),
    )


class _Retry(Exception):
    """A pair vanished under a concurrent prune: run the ingest again."""


def partition_name(hour: int) -> str:
    t = dt.datetime.fromtimestamp(hour * 3600, dt.timezone.utc)
    return t.strftime("events_p%Y%m%d_%H")


def partition_hour(name: str) -> Optional[int]:
    try:
        t = dt.datetime.strptime(name, "events_p%Y%m%d_%H").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return None
    return int(t.timestamp()) // 3600


@contextlib.contextmanager
def _db_errors(what: str, db: str) -> Iterator[None]:
    try:
        yield
    except psycopg.Error as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StoreError(f"collector database {redact(db)}: {what} failed: {msg}") from e


def _connect(url: str, readonly: bool) -> psycopg.Connection[Any]:
    kw: dict[str, Any] = {"autocommit": True, "application_name": "rarewrite-collector"}
    if readonly:
        kw["options"] = "-c default_transaction_read_only=on"
    if "connect_timeout" not in url:
        kw["connect_timeout"] = 10
    return psycopg.connect(url, **kw)


def _version(conn: psycopg.Connection[Any]) -> int:
    if conn.execute("SELECT to_regclass('meta')").fetchone() == (None,):
        return 0
    got = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(got[0]) if got else 0


def _migrate(conn: psycopg.Connection[Any], db: str) -> tuple[int, int]:
    """Apply the missing steps in one transaction, under an advisory lock."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, LOCK_MIGRATE))
        before = _version(conn)
        if before > SCHEMA_VERSION:
            raise StoreError(
                f"{redact(db)} has schema version {before}, newer than this rarewrite supports "
                f"({SCHEMA_VERSION}); upgrade rarewrite or use another database"
            )
        for m in pending(MIGRATIONS, before):
            m.step(conn)
            conn.execute(
                "INSERT INTO schema_migrations(version, description) VALUES (%s, %s)",
                (m.version, m.description),
            )
            conn.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', %s) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(m.version),),
            )
            log.info("event=migrated db=%s version=%d description=%r", redact(db), m.version, m.description)
    return before, SCHEMA_VERSION


def migrate_url(url: str) -> tuple[int, int]:
    """``rarewrite collector migrate`` on PostgreSQL: (version before, version after)."""
    with _db_errors("migrating", url):
        conn = _connect(url, readonly=False)
        try:
            return _migrate(conn, url)
        finally:
            conn.close()


class PgStore:
    """The PostgreSQL implementation of :class:`agent.collector.storage.base.Store`."""

    def __init__(self, url: str, readonly: bool = False) -> None:
        self.path = url
        self.readonly = readonly
        self._local = threading.local()
        self._all: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._agent_names: dict[int, str] = {}
        self._host_names: dict[int, str] = {}
        self._actor_by_ref: dict[int, Actor] = {}
        self._actor_cache: dict[bytes, int] = {}  # actor key -> ref, committed ones only
        self._parts: Optional[set[int]] = None
        self._parts_lock = threading.Lock()
        self._owner = f"{socket.gethostname()}:{os.getpid()}"
        self.walk_pairs = WALK_PAIRS  # see _WALK_PG; tests lower it to cut the walk short
        self._busy = ticks.BusyPairs()  # see ranked_among
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        url, conn = self.path, self._conn()
        with self._errors("opening the schema"):
            if self.readonly:
                version = _version(conn)
                if version == 0:
                    raise StoreError(f"{redact(url)} is not a rarewrite collector database")
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"{redact(url)} has schema version {version}, newer than this rarewrite supports "
                        f"({SCHEMA_VERSION}); upgrade rarewrite or use another database"
                    )
            else:
                _migrate(conn, url)

    # ------------------------------------------------------------ plumbing

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            with _db_errors(what, self.path):
                yield
        except StoreError:
            conn = getattr(self._local, "conn", None)
            if conn is not None and (conn.closed or conn.broken):
                self._local.conn = None  # reconnect on the next call
            raise

    def _conn(self) -> psycopg.Connection[Any]:
        conn: Optional[psycopg.Connection[Any]] = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        with self._errors("connecting"):
            conn = _connect(self.path, self.readonly)
        with self._lock:
            self._all.append(conn)
        self._local.conn = conn
        return conn

    @staticmethod
    def _in_tx(conn: psycopg.Connection[Any]) -> bool:
        return conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    @contextlib.contextmanager
    def _write(self, what: str) -> Iterator[psycopg.Connection[Any]]:
        """One write transaction (a savepoint inside a scheduled run)."""
        if self.readonly:
            raise StoreError("the collector database is open read-only")
        conn = self._conn()
        with self._errors(what), conn.transaction():
            yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        """Run the block in one REPEATABLE READ transaction: one snapshot."""
        conn = self._conn()
        if self._in_tx(conn):
            yield
            return
        with self._errors("reading"), conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield

    @contextlib.contextmanager
    def schedule_run(self, rule_id: str, kind: str, at_ms: int) -> Iterator[bool]:
        """One scheduled run as one transaction; yields False when another
        replica has it (continuous: is running it now; hourly: committed it).

        Everything written inside (the alerts) commits at the end or not at all."""
        if self.readonly:
            raise StoreError("the collector database is open read-only")
        conn = self._conn()
        with self._errors("scheduled run"), conn.transaction():
            name = f"{rule_id}/{kind}"
            if kind == "hourly":
                conn.execute(f"SET LOCAL lock_timeout = '{SCHEDULE_WAIT}'")
                conn.execute(
                    "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_CLASS + LOCK_SCHEDULE, name)
                )
                conn.execute("SET LOCAL lock_timeout = 0")
                mine = conn.execute(
                    "INSERT INTO schedule_runs(rule_id, kind, at_ms, owner) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT DO NOTHING RETURNING 1",
                    (rule_id, kind, at_ms, self._owner),
                ).fetchone()
                yield mine is not None
                return
            got = conn.execute(
                "SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))", (LOCK_CLASS + LOCK_SCHEDULE, name)
            ).fetchone()
            yield bool(got and got[0])

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(psycopg.Error):
                conn.close()
        self._local = threading.local()

    def check(self) -> None:
        with self._errors("health check"):
            self._conn().execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()

    # ------------------------------------------------------------ partitions

    def _known_parts(self, conn: psycopg.Connection[Any]) -> set[int]:
        if self._parts is None:
            rows = conn.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'events'::regclass"
            ).fetchall()
            self._parts = {h for (n,) in rows if (h := partition_hour(str(n))) is not None}
        return self._parts

    def ensure_partitions(self, hours: set[int]) -> None:
        """Create the hourly partitions of ``hours`` that do not exist yet, in
        one transaction. Rows of those hours already in the DEFAULT partition
        move into the new partition before it is attached."""
        conn = self._conn()
        with self._parts_lock:
            parts = self._known_parts(conn)
            missing = sorted(hours - parts)
            if not missing:
                return
            with self._errors("creating partitions"), conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, LOCK_PARTITIONS))
                made = []
                for h in missing:
                    name = partition_name(h)
                    if conn.execute("SELECT to_regclass(%s)", (name,)).fetchone() != (None,):
                        continue
                    lo, hi = h * HOUR_MS, (h + 1) * HOUR_MS
                    conn.execute(f"CREATE TABLE {name} (LIKE events INCLUDING DEFAULTS)")
                    conn.execute(
                        f"WITH moved AS (DELETE FROM events_default WHERE ts >= %s AND ts < %s "  # noqa: S608
                        "RETURNING id, ts, pair, agent, host, detail) "
                        f"INSERT INTO {name} (id, ts, pair, agent, host, detail) SELECT * FROM moved",
                        (lo, hi),
                    )
                    conn.execute(
                        f"ALTER TABLE events ATTACH PARTITION {name} FOR VALUES FROM ({lo}) TO ({hi})"
                    )
                    made.append(name)
            parts.update(missing)
            if made:
                log.info("event=partitions_created db=%s partitions=%s", redact(self.path), ",".join(made))

    def _hours_for(self, times: list[int], now_ms: int) -> set[int]:
        now_h = now_ms // HOUR_MS
        lo, hi = now_h - BAND_BACK_HOURS, now_h + BAND_AHEAD_HOURS
        hours = {now_h + i for i in range(AHEAD_HOURS + 1)}
        hours.update(h for h in {t // HOUR_MS for t in times} if lo <= h <= hi)
        return hours

    # ------------------------------------------------------------ agents

    def enroll(
        self,
        agent_id: str,
        host_name: str,
        key_hash: str,
        now_ms: int,
        proof_hash: Optional[str] = None,
        token_hash: Optional[str] = None,
    ) -> EnrollStatus:
        """As the SQLite store's: the id's row and the token are locked for the decision."""
        with self._write("enroll") as conn:
            token = None
            if token_hash is not None:
                r = conn.execute(TOKENS_SQL + " WHERE token_hash = %s FOR UPDATE", (token_hash,)).fetchone()
                token = None if r is None else EnrollToken(*r)
                if not token_usable(token, agent_id, now_ms):
                    return ENROLL_BAD_TOKEN
            got = conn.execute(
                "SELECT key_hash, revoked FROM agents WHERE agent_id = %s FOR UPDATE", (agent_id,)
            ).fetchone()
            current = None if got is None else (str(got[0]), bool(got[1]))
            status = enroll_decision(current, proof_hash, token.agent_id if token else None, agent_id)
            if status not in (ENROLL_NEW, ENROLL_REKEYED):
                return status
            host = self._host_ref(conn, host_name)
            if status == ENROLL_NEW:  # another collector may enroll the same id this moment
                cur = conn.execute(
                    "INSERT INTO agents(agent_id, host_ref, key_hash, revoked, enrolled_ms) "
                    "VALUES (%s, %s, %s, false, %s) ON CONFLICT (agent_id) DO NOTHING",
                    (agent_id, host, key_hash, now_ms),
                )
                if not cur.rowcount:
                    return ENROLL_TAKEN
            else:
                conn.execute(
                    "UPDATE agents SET host_ref = %s, key_hash = %s, enrolled_ms = %s WHERE agent_id = %s",
                    (host, key_hash, now_ms, agent_id),
                )
            if token_hash is not None:
                conn.execute(
                    "UPDATE enroll_tokens SET uses_left = uses_left - 1 WHERE token_hash = %s", (token_hash,)
                )
            return status

    def add_token(self, token_hash: str, token: EnrollToken) -> None:
        with self._write("adding a token") as conn:
            conn.execute(
                "INSERT INTO enroll_tokens(token_hash, token_id, agent_id, uses_left, expires_ms, "
                "created_ms, comment) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (token_hash, token.token_id, token.agent_id, token.uses_left, token.expires_ms,
                 token.created_ms, token.comment),
            )  # fmt: skip

    def list_tokens(self) -> list[EnrollToken]:
        with self._errors("listing tokens"):
            rows = self._conn().execute(TOKENS_SQL + " ORDER BY created_ms, token_id").fetchall()
        return [EnrollToken(*r) for r in rows]

    def revoke_token(self, token_id: str) -> bool:
        with self._write("revoking a token") as conn:
            cur = conn.execute("UPDATE enroll_tokens SET uses_left = 0 WHERE token_id = %s", (token_id,))
            return cur.rowcount > 0

    def heartbeats(self, beats: Sequence[tuple[int, int, str]]) -> None:
        with self._write("heartbeats") as conn, conn.cursor() as cur:
            cur.executemany(
                "UPDATE agents SET last_seen_ms = greatest(coalesce(last_seen_ms, 0), %s), health = %s "
                "WHERE ref = %s",
                [(t, h, ref) for ref, t, h in beats],
            )

    @staticmethod
    def _host_ref(conn: psycopg.Connection[Any], name: str) -> int:
        conn.execute("INSERT INTO hosts(name) VALUES (%s) ON CONFLICT (name) DO NOTHING", (name,))
        row = conn.execute("SELECT ref FROM hosts WHERE name = %s", (name,)).fetchone()
        assert row is not None  # noqa: S101 - inserted just above, hosts are never deleted
        return int(row[0])

    _AGENT_SQL = (
        "SELECT a.agent_id, h.name, a.revoked, a.ref, a.host_ref, a.enrolled_ms, a.last_seen_ms, a.health "
        "FROM agents a JOIN hosts h ON h.ref = a.host_ref"
    )

    @staticmethod
    def _agent(r: Sequence[Any]) -> AgentRecord:
        return AgentRecord(str(r[0]), str(r[1]), bool(r[2]), int(r[3]), int(r[4]), int(r[5]), r[6], r[7])

    def agent_for_key(self, key_hash: str) -> Optional[AgentRecord]:
        with self._errors("key lookup"):
            r = self._conn().execute(self._AGENT_SQL + " WHERE a.key_hash = %s", (key_hash,)).fetchone()
        return self._agent(r) if r else None

    def revoke(self, agent_id: str) -> bool:
        with self._write("revoke") as conn:
            return (
                conn.execute("UPDATE agents SET revoked = true WHERE agent_id = %s", (agent_id,)).rowcount > 0
            )

    def restore(self, agent_id: str) -> bool:
        with self._write("restore") as conn:
            cur = conn.execute(
                "UPDATE agents SET revoked = false, key_hash = %s || agent_id WHERE agent_id = %s",
                (RESET_PREFIX, agent_id),
            )
            return cur.rowcount > 0

    def list_agents(self) -> list[AgentRecord]:
        with self._errors("listing agents"):
            rows = self._conn().execute(self._AGENT_SQL + " ORDER BY a.agent_id").fetchall()
        return [self._agent(r) for r in rows]

    # ------------------------------------------------------------ ingest

    def ingest(
        self,
        agent: AgentRecord,
        batch: wire.Batch | wire.RowBatch,
        now_ms: int,
        terms: Sequence[Candidate] = (),
    ) -> str:
        """Store one batch in one transaction: "stored" or "duplicate" (see the
        SQLite store for the rules; they are the same).

        Two round trips in pipeline mode: the batch's name, its epoch, its pairs
        and new actors go out together, then (once the name is ours and the
        seq is new) its events, the agent's last-seen time and the COMMIT."""
        if self.readonly:
            raise StoreError("the collector database is open read-only")
        batch = wire.rows_of(batch)
        times = batch.times()
        self.ensure_partitions(self._hours_for(times, now_ms))
        conn = self._conn()
        for attempt in range(RETRIES):
            fresh: dict[bytes, int] = {}
            try:
                with self._errors("ingest"):
                    status = "stored"
                    try:
                        with conn.pipeline(), conn.transaction():
                            status = self._ingest_tx(conn, agent, batch, now_ms, terms, fresh)
                            if status != "stored":
                                raise psycopg.Rollback()
                    except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure, _Retry):
                        if attempt == RETRIES - 1:
                            raise
                        continue
                    if status == "stored":  # committed: the new actors' refs are true from now on
                        self._actor_cache.update(fresh)
                    return status
            except _Retry:
                raise StoreError("collector database: ingest kept racing a prune; retry later") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _ingest_tx(
        self,
        conn: psycopg.Connection[Any],
        agent: AgentRecord,
        batch: wire.RowBatch,
        now_ms: int,
        terms: Sequence[Candidate],
        fresh: dict[bytes, int],
    ) -> str:
        """ "stored", "duplicate" (its batch id was stored) or "conflict" (a new
        batch id with a used seq); only "stored" may commit. Runs in a pipeline:
        statements queue until a result is read."""
        # The name first: a concurrent copy of this batch (another collector)
        # waits here for ours, then finds the conflict.
        named = conn.execute(
            "INSERT INTO batches(agent_ref, epoch, seq, batch_id, received_ms, records) "
            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1",
            (agent.ref, batch.epoch, batch.seq, batch.batch_id, now_ms, batch.size()),
        )
        ep_cur = conn.execute(
            "SELECT last_seq, last_sent_at FROM epochs WHERE agent_ref = %s AND epoch = %s FOR UPDATE",
            (agent.ref, batch.epoch),
        )
        # Sent before the seq is checked: rolled back with the rest if it is not new.
        conn.execute(_EPOCH_SQL, (agent.ref, batch.epoch, batch.seq, batch.sent_at))
        want = newest_per_pair(batch)
        pairs_cur = self._intern(conn, want) if want else None
        actors_cur = self._actor_refs(conn, actor_keys(batch))
        if named.fetchone() is None:  # the first read: the pipeline's first round trip
            same = conn.execute(
                "SELECT 1 FROM batches WHERE agent_ref = %s AND batch_id = %s", (agent.ref, batch.batch_id)
            ).fetchone()
            return "duplicate" if same else "conflict"
        ep = ep_cur.fetchone()
        if is_replayed(ep, batch.seq):
            return "conflict"
        gap = possible_loss(agent, ep, batch)
        if gap is not None:
            conn.execute(
                "INSERT INTO gaps(agent_ref, start_ms, end_ms, lost, reason, received_ms) "
                "VALUES (%s, %s, %s, 0, 'possible_loss', %s)",
                (agent.ref, *gap, now_ms),
            )
        refs = _interned(pairs_cur)
        if actors_cur is not None:
            fresh.update((bytes(k), int(r)) for k, r in actors_cur.fetchall())
        actors = {**self._actor_cache, **fresh} if fresh else self._actor_cache
        if batch.events or batch.counts:
            conn.execute(_EVENTS_SQL, _event_arrays(batch, refs, agent, actors))
        if refs:  # for the continuous schedule (agent.collector.storage.ticks)
            conn.execute(_CHANGES_SQL, (now_ms, _array(str(r) for r in sorted(set(refs.values())))))
        self._ingest_rest(conn, agent, batch, now_ms, terms)
        return "stored"

    def _ingest_rest(
        self,
        conn: psycopg.Connection[Any],
        agent: AgentRecord,
        batch: wire.RowBatch,
        now_ms: int,
        terms: Sequence[Candidate],
    ) -> None:
        """The batch's gaps, new-terms writes, notes and the agent's last-seen time."""
        if batch.gaps:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO gaps(agent_ref, start_ms, end_ms, lost, reason, received_ms) "
                    "VALUES (%s, %s, %s, %s, %s, %s)",
                    [(agent.ref, g.start, g.end, g.lost, g.reason, now_ms) for g in batch.gaps],
                )
        if terms:
            self._terms(conn, agent, batch.host_id, terms, now_ms)
        if batch.notes:
            _store_notes(conn, agent, batch, now_ms)
        conn.execute("UPDATE agents SET last_seen_ms = %s WHERE ref = %s", (now_ms, agent.ref))

    @staticmethod
    def _terms(
        conn: psycopg.Connection[Any],
        agent: AgentRecord,
        host_id: str,
        cands: Sequence[Candidate],
        now_ms: int,
    ) -> None:
        """The new-terms history in the batch's transaction. A row is locked as
        it is read, so a copy of this agent's next batch on another collector
        waits for this one's decision (an agent has one batch in flight)."""

        def lookup(rule_id: str, pairs: Sequence[bytes]) -> dict[bytes, Run]:
            got = conn.execute(_TERM_SELECT_SQL, (rule_id, agent.ref, list(pairs))).fetchall()
            return {bytes(p): (int(first), int(last)) for p, first, last in got}

        upserts, inserts = term_writes(lookup, agent, host_id, cands, now_ms)
        with conn.cursor() as cur:
            if upserts:
                cur.executemany(TERM_UPSERT_SQL.replace("?", "%s"), upserts)
            if inserts:
                cur.executemany(HIT_INSERT_SQL.replace("?", "%s"), inserts)

    def term_hits(
        self, rule_id: str, lo_ms: int, hi_ms: int, by_received: bool = False, on_hosts: int = 0
    ) -> list[TermHit]:
        """The new events of ``rule_id`` with lo < ts <= hi (or received in
        it), in that order; ``on_hosts``: only pairs new on that many agents in it."""
        sql, args = hits_query(rule_id, lo_ms, hi_ms, by_received, on_hosts)
        with self._errors("reading new terms"):
            got = self._conn().execute(sql.replace("?", "%s"), args).fetchall()
        return [hit_of(r) for r in got]

    def prune_terms(self, rule_id: str, before_ms: int) -> int:
        """Forget combinations of ``rule_id`` last seen before ``before_ms``."""
        if self.readonly:
            raise StoreError("the collector database is open read-only")
        conn = self._conn()
        with self._errors("pruning new terms"), conn.transaction():
            cur = conn.execute("DELETE FROM terms WHERE rule_id = %s AND last_ts < %s", (rule_id, before_ms))
            return int(cur.rowcount)

    @staticmethod
    def _intern(
        conn: psycopg.Connection[Any], want: dict[bytes, tuple[Optional[bytes], Optional[bytes], int]]
    ) -> psycopg.Cursor[Any]:
        """Pair refs for ``want`` (key -> exe, path, newest ts), creating new
        pairs, in one statement (read with :func:`_interned`).

        Known pairs are read without a lock; last_ts is raised (a row lock, held
        to commit) only when it lags by more than LAST_TS_LAG_MS, so a pair that
        every agent writes is not a queue. Keys are sorted: no lock-order deadlock.
        Planned each time (prepare=False): a plan cached while ``pairs`` was
        small (no ANALYZE yet) scans the whole table."""
        keys = sorted(want)
        args = (
            keys,
            [want[k][0] for k in keys],
            [want[k][1] for k in keys],
            _array(str(want[k][2]) for k in keys),
            [order_key(want[k][0], want[k][1]) for k in keys],
        )
        return conn.execute(_INTERN_SQL, (*args, LAST_TS_LAG_MS), prepare=False)

    def _actor_refs(self, conn: psycopg.Connection[Any], keys: set[bytes]) -> Optional[psycopg.Cursor[Any]]:
        """The (key, ref) of the actors not cached yet, creating them (a host
        has a handful; actors are never deleted, so a cached ref stays true)."""
        want = sorted(keys - self._actor_cache.keys())
        if not want:
            return None
        conn.execute(
            "INSERT INTO actors(key) SELECT k FROM unnest(%b::bytea[]) AS u(k) ORDER BY k "
            "ON CONFLICT (key) DO NOTHING",
            (want,),
        )
        return conn.execute("SELECT key, ref FROM actors WHERE key = ANY(%b)", (want,), prepare=False)

    def _actor_names(self, conn: psycopg.Connection[Any], refs: set[int]) -> dict[int, Actor]:
        if not refs <= self._actor_by_ref.keys():
            self._actor_by_ref.update(
                (int(r), actor_of_key(bytes(k)))
                for r, k in conn.execute("SELECT ref, key FROM actors").fetchall()
            )
        return self._actor_by_ref

    def pairs_since(self, lo_ms: int) -> list[PairRef]:
        # last_ts may lag a pair's newest event by up to LAST_TS_LAG_MS (see _intern)
        with self._errors("reading pairs"):
            sql = "SELECT ref, exe, path FROM pairs WHERE last_ts > %s"
            got = self._conn().execute(sql, (lo_ms - LAST_TS_LAG_MS,)).fetchall()
        return [(int(r), _b(e), _b(p)) for r, e, p in got]

    def window_events(self, refs: Sequence[int], lo_ms: int, hi_ms: int) -> list[WindowEvent]:
        conn = self._conn()
        with self.read(), self._errors("reading events"):
            got = conn.execute(
                "SELECT pair, ts, agent, host, actor FROM events "
                "WHERE pair = ANY(%s) AND ts > %s AND ts <= %s",
                (list(refs), lo_ms, hi_ms),
            ).fetchall()
            agents = self._names(conn, {int(r[2]) for r in got}, "agents")
            hosts = self._names(conn, {int(r[3]) for r in got}, "hosts")
            who = self._actor_names(conn, {int(r[4]) for r in got if r[4] is not None})
        return [
            WindowEvent(int(p), int(t), agents[int(a)], hosts[int(h)], NO_ACTOR if w is None else who[int(w)])
            for p, t, a, h, w in got
        ]

    # ------------------------------------------------------------ evaluation

    def _names(self, conn: psycopg.Connection[Any], refs: set[int], table: str) -> dict[int, str]:
        cache = self._agent_names if table == "agents" else self._host_names
        if not refs <= cache.keys():
            sql = "SELECT ref, agent_id FROM agents" if table == "agents" else "SELECT ref, name FROM hosts"
            cache.update((int(r), str(n)) for r, n in conn.execute(sql).fetchall())
        return cache

    def ranked_rows(self, rule: Rule, at_ms: int, skip: Collection[int] = ()) -> list[RankedRow]:
        """The rule's rows at T, each with its first event time; pairs in
        ``skip`` (refs) left out (exceptions count those themselves)."""
        if not can_have_rows(rule):
            return []
        conn = self._conn()
        params = self._row_args(rule, at_ms)
        params["skip"] = list(skip)
        with self.read(), self._errors("evaluating"):
            got: list[Any] = []
            if rule.limit <= WALK_PAIRS:
                conn.execute(_PER_PAIR_SETTINGS)
                walked = conn.execute(_RANKED_PG["walk", rule.agent_count == 1], params).fetchall()
                if len(walked) >= rule.limit:
                    got = conn.execute(_DETAIL_PG, {**params, "refs": [r for (r,) in walked]}).fetchall()
                conn.execute("SET LOCAL enable_bitmapscan = on")
            if not got:  # too few rows with the fewest events: rank them all
                conn.execute(f"SET LOCAL work_mem = '{EVAL_WORK_MEM}'")
                sql = _ROWS_ONE_AGENT_SQL if rule.agent_count == 1 else _ROWS_SQL
                got = conn.execute(sql, params).fetchall()
            return self._ranked(conn, got)

    def ranked_among(self, rule: Rule, at_ms: int, refs: Collection[int]) -> list[RankedRow]:
        """Every row at T among the pairs ``refs``, in the rule's order (no limit)."""
        if not can_have_rows(rule) or not refs:
            return []
        conn = self._conn()
        params = self._row_args(rule, at_ms)
        params["refs"] = self._busy.to_count(rule, at_ms, refs)
        with self.read(), self._errors("evaluating"):
            conn.execute(_PER_PAIR_SETTINGS)
            got = conn.execute(_RANKED_PG["count", rule.agent_count == 1], params).fetchall()
            counts = [(int(r), int(cc), bool(ok), int(oldest)) for r, cc, ok, oldest in got]
            chosen = self._busy.rows(rule, at_ms, counts)
            if not chosen:
                return []
            return self._ranked(conn, conn.execute(_DETAIL_PG, {**params, "refs": chosen}).fetchall())

    def _row_args(self, rule: Rule, at_ms: int) -> dict[str, Any]:
        return {
            "lo": at_ms - rule.window_ms,
            "hi": at_ms,
            "below": rule.count_below,
            "agents": rule.agent_count,
            "limit": min(rule.limit, (1 << 63) - 1),
            "vmin": 2 * max(1, rule.agent_count) + 1,
            "budget": max(self.walk_pairs, 10 * rule.limit),
            "skip": [],
        }

    def _ranked(self, conn: psycopg.Connection[Any], got: list[Any]) -> list[RankedRow]:
        """RankedRows of (cc, agent count, agent refs, host refs, exe, path, first ts), sorted."""
        agent_names = self._names(conn, {int(x) for r in got for x in r[2]}, "agents")
        host_names = self._names(conn, {int(x) for r in got for x in r[3]}, "hosts")
        out = []
        for cc, ac, agents, hosts, exe, path, first in got:
            row = Row(
                cc=int(cc),
                agent_count=int(ac),
                host_names=tuple(sorted({host_names[int(x)] for x in hosts})),
                agent_ids=tuple(sorted({agent_names[int(x)] for x in agents})),
                executable=_b(exe),
                path=_b(path),
            )
            out.append(RankedRow(row, int(first)))
        out.sort(key=lambda r: (r.row.cc, order_key(r.row.executable, r.row.path)))
        return out

    # ------------------------------------------------------------ continuous ticks

    def change_mark(self) -> int:
        """The oldest transaction still running: every batch committed later has an id at least this."""
        with self._errors("reading changes"):
            got = (
                self._conn()
                .execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
                .fetchone()
            )
        return int(got[0]) if got else 0

    def tick_candidates(self, rule_id: str, state: ticks.TickState, at_ms: int, window_ms: int,
                        settle_ms: int) -> set[int]:  # fmt: skip
        """As CollectorStore.tick_candidates; a batch whose transaction id is
        at least the last tick's mark may not have been visible to it."""
        conn = self._conn()
        refs: set[int] = set()
        with self._errors("reading changes"):
            got = conn.execute(
                "SELECT DISTINCT unnest(pairs) FROM pair_changes WHERE xid >= %s", (state.mark,)
            )
            refs.update(int(r) for (r,) in got.fetchall())
            for lo, hi in ticks.edges(state.at_ms, at_ms, window_ms, settle_ms):
                refs.update(
                    int(r) for (r,) in conn.execute(_pg(ticks.PAIRS_BETWEEN_SQL), (lo, hi)).fetchall()
                )
            lo, hi = state.at_ms - window_ms, at_ms - window_ms
            gone = conn.execute(_pg(ticks.ALERTS_BETWEEN_SQL), (rule_id, lo, hi)).fetchall()
            if gone:
                keys = [pair_key(_b(e), _b(p)) for e, p in gone]
                got = conn.execute("SELECT ref FROM pairs WHERE key = ANY(%s)", (keys,))
                refs.update(int(r) for (r,) in got.fetchall())
        return refs

    def pair_refs(self, refs: Collection[int]) -> list[PairRef]:
        with self._errors("reading pairs"):
            got = (
                self._conn()
                .execute("SELECT ref, exe, path FROM pairs WHERE ref = ANY(%s)", (list(refs),))
                .fetchall()
            )
        return [(int(r), _b(e), _b(p)) for r, e, p in got]

    def alerted_among(self, rule_id: str, since_ms: int, pairs: Collection[Pair]) -> set[Pair]:
        if not pairs:
            return set()
        with self._errors("reading alerts"):
            args = ([alert_pair_hash(p) for p in pairs], rule_id, since_ms)
            got = self._conn().execute(_ALERTED_SQL, args).fetchall()
        return {(_b(e), _b(p)) for e, p in got} & set(pairs)

    def tick_state(self, rule_id: str) -> Optional[ticks.TickState]:
        with self._errors("reading the last tick"):
            got = self._conn().execute(_pg(ticks.TICK_SQL), (rule_id,)).fetchone()
        return None if got is None else ticks.TickState(int(got[0]), int(got[1]), str(got[2]), bool(got[3]))

    def save_tick(self, rule_id: str, state: ticks.TickState) -> None:
        with self._write("saving the tick") as conn:
            args = (rule_id, state.at_ms, state.mark, state.fingerprint, int(state.cut))
            conn.execute(_pg(ticks.TICK_SAVE_SQL), args)

    def rows(self, rule: Rule, at_ms: int) -> list[Row]:
        return [r.row for r in self.ranked_rows(rule, at_ms)]

    def pair_events(self, pair: Pair, lo_ms: int, hi_ms: int, limit: int) -> list[StoredEvent]:
        conn = self._conn()
        with self._errors("reading events"):
            got = conn.execute(
                "SELECT e.ts, a.agent_id, h.name, e.detail, e.actor FROM pairs p "
                "JOIN events e ON e.pair = p.ref "
                "JOIN agents a ON a.ref = e.agent JOIN hosts h ON h.ref = e.host "
                "WHERE p.key = %s AND e.ts > %s AND e.ts <= %s ORDER BY e.ts, e.id LIMIT %s",
                (pair_key(*pair), lo_ms, hi_ms, limit),
            ).fetchall()
            who = self._actor_names(conn, {int(r[4]) for r in got if r[4] is not None})
        out = []
        for ts, agent_id, host, detail, actor in got:
            d = None if detail is None else msgpack.unpackb(bytes(detail), raw=False, strict_map_key=True)
            w = NO_ACTOR if actor is None else who[int(actor)]
            out.append(StoredEvent(int(ts), str(agent_id), str(host), d, w))
        return out

    def notes_for(self, pair: Pair, lo_ms: int, hi_ms: int) -> list[notes.Note]:
        """The notes about the pair's events with lo <= ts <= hi, in arrival order."""
        with self._errors("reading notes"):
            got = self._conn().execute(_pg(notes.NOTES_FOR_SQL), (notes.note_pkey(*pair), lo_ms, hi_ms))
            return [notes.note_of(r) for r in got.fetchall()]

    def alerts_about(self, pair: Pair, event_ts: int) -> list[tuple[str, str, str]]:
        """(alert id, rule id, document) of the alerts whose window holds the pair's event at ``event_ts``."""
        with self._errors("reading alerts"):
            got = self._conn().execute(
                "SELECT alert_id, rule_id, doc FROM alerts WHERE at_ms >= %s AND first_ts <= %s "
                "AND exe IS NOT DISTINCT FROM %s AND path IS NOT DISTINCT FROM %s "
                "AND folded_into IS NULL ORDER BY at_ms",
                (event_ts, event_ts, *pair),
            )
            return [(str(a), str(r), str(d)) for a, r, d in got.fetchall()]

    def queue_actions(self, rows: Sequence[notes.ActionRow]) -> None:
        """(alert id, rule id, exe, path, now, agent id): ask that agent to act once (again: nothing)."""
        with self._write("queueing actions") as conn, conn.cursor() as cur:
            cur.executemany(_pg(notes.ACTION_INSERT_SQL), rows)

    def pending_actions(self, agent_ref: int) -> list[notes.Action]:
        with self._errors("reading actions"):
            got = self._conn().execute(_pg(notes.PENDING_SQL), (agent_ref, notes.MAX_PENDING))
            return [notes.action_of(r) for r in got.fetchall()]

    def gaps_overlapping(self, start_ms: int, end_ms: int) -> list[GapRow]:
        with self._errors("reading gaps"):
            got = (
                self._conn()
                .execute(
                    "SELECT a.agent_id, g.start_ms, g.end_ms, g.lost, g.reason FROM gaps g "
                    "JOIN agents a ON a.ref = g.agent_ref "
                    "WHERE g.end_ms > %s AND g.start_ms <= %s ORDER BY g.id",
                    (start_ms, end_ms),
                )
                .fetchall()
            )
        return [GapRow(str(a), int(s), int(e), int(n), str(r)) for a, s, e, n, r in got]

    # ------------------------------------------------------------ alerts

    def record_alerts(self, rule_id: str, alerts: Sequence[AlertItem]) -> list[str]:
        new = []
        with self._write("recording alerts") as conn:
            for alert_id, (exe, path), at_ms, first_ts, doc, skey in alerts:
                got = conn.execute(
                    "INSERT INTO alerts(alert_id, rule_id, exe, path, at_ms, first_ts, doc, skey, "
                    "emitted_ms) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (alert_id) DO NOTHING RETURNING 1",
                    (alert_id, rule_id, exe, path, at_ms, first_ts, doc, skey, at_ms),
                ).fetchone()
                if got is not None:
                    new.append(alert_id)
        return new

    def suppression_parent(self, rule_id: str, skey: bytes, since_ms: int) -> Optional[tuple[str, str]]:
        with self._errors("reading alerts"):
            got = (
                self._conn()
                .execute(
                    "SELECT alert_id, doc FROM alerts WHERE rule_id = %s AND skey = %s "
                    "AND folded_into IS NULL AND at_ms > %s ORDER BY at_ms DESC LIMIT 1",
                    (rule_id, skey, since_ms),
                )
                .fetchone()
            )
        return None if got is None else (str(got[0]), str(got[1]))

    def fold_alert(self, rule_id: str, item: AlertItem, parent_id: str, parent_doc: str) -> bool:
        alert_id, (exe, path), at_ms, first_ts, doc, skey = item
        with self._write("folding an alert") as conn:
            got = conn.execute(
                "INSERT INTO alerts(alert_id, rule_id, exe, path, at_ms, first_ts, doc, skey, folded_into) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (alert_id) DO NOTHING RETURNING 1",
                (alert_id, rule_id, exe, path, at_ms, first_ts, doc, skey, parent_id),
            ).fetchone()
            if got is None:
                return False
            conn.execute(
                "UPDATE alerts SET doc = %s, dirty = true WHERE alert_id = %s", (parent_doc, parent_id)
            )
        return True

    def suppressed_due(self, rule_id: str, before_ms: int) -> list[tuple[str, str]]:
        with self._errors("reading alerts"):
            got = (
                self._conn()
                .execute(
                    "SELECT alert_id, doc FROM alerts WHERE rule_id = %s AND dirty "
                    "AND coalesce(emitted_ms, 0) <= %s ORDER BY at_ms, alert_id",
                    (rule_id, before_ms),
                )
                .fetchall()
            )
        return [(str(a), str(d)) for a, d in got]

    def mark_emitted(self, alert_ids: Sequence[str], now_ms: int) -> None:
        with self._write("marking alerts sent") as conn, conn.cursor() as cur:
            cur.executemany(
                "UPDATE alerts SET dirty = false, emitted_ms = %s WHERE alert_id = %s",
                [(now_ms, a) for a in alert_ids],
            )

    def alerted_pairs(self, rule_id: str, since_ms: int) -> set[Pair]:
        with self._errors("reading alerts"):
            got = (
                self._conn()
                .execute(
                    "SELECT exe, path FROM alerts WHERE rule_id = %s AND at_ms > %s", (rule_id, since_ms)
                )
                .fetchall()
            )
        return {(None if e is None else bytes(e), None if p is None else bytes(p)) for e, p in got}

    def list_alerts(self, since_ms: int) -> list[dict[str, Any]]:
        with self._errors("reading alerts"):
            got = (
                self._conn()
                .execute(
                    "SELECT doc FROM alerts WHERE at_ms > %s AND folded_into IS NULL "
                    "ORDER BY at_ms, alert_id",
                    (since_ms,),
                )
                .fetchall()
            )
        return [json.loads(d) for (d,) in got]

    # ------------------------------------------------------------ upkeep

    def prune(self, before_ms: int, max_chunks: Optional[int] = None) -> int:
        """Drop the hourly partitions wholly older than ``before_ms``, delete
        DEFAULT-partition events, gaps and batch names older than it; return
        the events removed. Events of the partition that holds ``before_ms``
        stay until that whole hour is past (retention is a floor)."""
        if self.readonly:
            raise StoreError("the collector database is open read-only")
        conn = self._conn()
        total = 0
        with self._parts_lock, self._errors("pruning"), conn.transaction():
            # Never queue behind a long reader: DROP waits for ACCESS EXCLUSIVE
            # and would hold every ingest behind it. Try again next time.
            conn.execute("SET LOCAL lock_timeout = '2s'")
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, LOCK_PARTITIONS))
            self._parts = None
            parts = self._known_parts(conn)
            dropped = []
            for h in sorted(parts):
                if (h + 1) * HOUR_MS > before_ms:
                    continue
                name = partition_name(h)
                got = conn.execute(f"SELECT count(*) FROM {name}").fetchone()  # noqa: S608
                total += int(got[0]) if got else 0
                conn.execute(f"DROP TABLE {name}")
                dropped.append(h)
            total += conn.execute("DELETE FROM events_default WHERE ts < %s", (before_ms,)).rowcount
            conn.execute("DELETE FROM gaps WHERE end_ms < %s", (before_ms,))
            conn.execute("DELETE FROM term_hits WHERE ts < %s AND received_ms < %s", (before_ms, before_ms))
            conn.execute("DELETE FROM batches WHERE received_ms < %s", (before_ms,))
            conn.execute("DELETE FROM pair_changes WHERE received_ms < %s", (before_ms,))
            conn.execute("DELETE FROM alerts WHERE at_ms < %s", (before_ms - 7 * 86_400_000,))
            conn.execute(_pg(notes.PRUNE_NOTES_SQL), (before_ms,))
            conn.execute(_pg(notes.PRUNE_ACTIONS_SQL), (before_ms - 7 * 86_400_000,))
            conn.execute(
                "DELETE FROM schedule_runs WHERE started_at < now() - interval '7 days'",
            )
            # Every event of a pair is at most LAST_TS_LAG_MS past its last_ts,
            # so this cutoff leaves no event of a deleted pair in a kept partition.
            cutoff = (before_ms // HOUR_MS) * HOUR_MS - LAST_TS_LAG_MS
            conn.execute("DELETE FROM pairs WHERE last_ts < %s", (cutoff,))
            parts.difference_update(dropped)
        if dropped:
            log.info(
                "event=partitions_dropped db=%s partitions=%s",
                redact(self.path),
                ",".join(partition_name(h) for h in dropped),
            )
        return total

    def counts(self) -> dict[str, Any]:
        conn = self._conn()
        with self._errors("counting"):
            agents = conn.execute("SELECT count(*) FROM agents WHERE NOT revoked").fetchone()
            gaps = conn.execute("SELECT reason, count(*) FROM gaps GROUP BY reason").fetchall()
            alerts = conn.execute("SELECT count(*) FROM alerts WHERE folded_into IS NULL").fetchone()
        return {
            "agents": int(agents[0]) if agents else 0,
            "gaps": {str(k): int(v) for k, v in gaps},
            "alerts": int(alerts[0]) if alerts else 0,
        }


def _pg(sql: str) -> str:
    """A shared statement (``?`` placeholders) in psycopg's style."""
    return sql.replace("?", "%s")


def _store_notes(conn: psycopg.Connection[Any], agent: AgentRecord, batch: wire.RowBatch, now: int) -> None:
    """The batch's notes, and the actions its reports finish, in its transaction."""
    with conn.cursor() as cur:
        cur.executemany(_pg(notes.NOTE_INSERT_SQL), notes.note_rows(agent.ref, batch.notes, now))
        cur.executemany(_pg(notes.ACTION_DONE_SQL), notes.action_reports(agent.ref, batch.notes, now))
