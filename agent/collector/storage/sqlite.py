"""The collector's store: agents, events, gaps and alerts in one SQLite file.

:class:`Store` is the interface; :class:`CollectorStore` (here) is SQLite, one
collector per file; :class:`agent.collector.storage.postgres.PgStore` is PostgreSQL,
shared by any number of collectors. :func:`open_store` picks one by ``db``.

Durability: the file runs in WAL mode with ``synchronous=FULL``, so a
``COMMIT`` has reached the disk (the WAL is fsynced) when it returns; the
server sends a 2xx for a batch only after :meth:`CollectorStore.ingest`
returned, i.e. after that durable commit.

Schema (version 6)::

    meta(key PK, value)                         schema_version
    agents(ref PK, agent_id UNIQUE, host_ref, key_hash UNIQUE, revoked,
           enrolled_ms, last_seen_ms, health)   health: the last heartbeat, JSON
    enroll_tokens(token_hash PK, token_id UNIQUE, agent_id, uses_left,
           expires_ms, created_ms, comment)     per-host enrollment tokens
    hosts(ref PK, name UNIQUE)                  interned host names
    pairs(ref PK, key UNIQUE, exe BLOB, path BLOB, last_ts)
                                                interned (exe, path); key is
                                                order_key(exe, path), so nil
                                                works and the key index walks
                                                pairs in ORDER BY exe, path order
    epochs(agent_ref, epoch, last_seq, last_sent_at)   PK (agent_ref, epoch)
    batches(agent_ref, epoch, seq, batch_id, received_ms, records)
                                                PK (agent_ref, epoch, seq),
                                                UNIQUE (agent_ref, batch_id)
    events(id PK, ts, pair, agent, host, detail BLOB)
                                                one row per event; detail is
                                                msgpack of the EventRecord
                                                detail (NULL for count times);
                                                indexes (pair, ts, agent, host)
                                                for the rule, (ts) for pruning
    gaps(id PK, agent_ref, start_ms, end_ms, lost, reason, received_ms)
    alerts(alert_id PK, rule_id, exe, path, at_ms, first_ts, doc, skey,
           folded_into, dirty, emitted_ms)
    actors(ref PK, key UNIQUE)                  who wrote an event (events.actor)
    terms(rule_id, agent_ref, pair, first_ts, last_ts)
                                                PK (rule_id, agent_ref, pair): the
                                                new-terms history, one run per
                                                combination (agent.collector.terms)
    term_hits(id PK, rule_id, ts, received_ms, agent_ref, host_id, exe, path,
              detail, actor)                    the new events of new-terms rules
    notes(id PK, agent_ref, pkey, event_ts, kind, received_ms, body)
    actions(id PK, agent_ref, alert_id, rule_id, exe, path, created_ms, done_ms, result)
                                                what came after an alert's events
                                                (agent.collector.storage.notes)

Versions: a file with a newer version is refused; an older one is migrated
in place, in one transaction, by any writer that opens it (``collector
serve``, ``collector migrate``; see :data:`MIGRATIONS`). A read-only opener
(``collector evaluate``) cannot migrate, so it refuses an older file and
says to run ``rarewrite collector migrate``. Version 1 keyed pairs by
msgpack([exe, path]) and indexed events by (ts, pair, agent, host) only.

Concurrency: every thread gets its own connection (``threading.local``);
writers take ``BEGIN IMMEDIATE`` and wait on ``busy_timeout``. WAL readers see
a snapshot, so pruning never changes what a running evaluation reads (an
evaluation runs in one read transaction, see :meth:`CollectorStore.read`).
Every ``sqlite3`` error surfaces as :class:`agent.shared.errors.StoreError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Collection, Iterator, Sequence
from typing import Any, Optional
from urllib.parse import quote

import msgpack

from agent.collector.storage import notes, ticks
from agent.collector.storage.base import (
    ENROLL_BAD_TOKEN,
    ENROLL_NEW,
    ENROLL_REKEYED,
    HIT_INSERT_SQL,
    PRUNE_CHUNK,
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
    event_rows,
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

log = logging.getLogger("rarewrite.collector.store")

SCHEMA_VERSION = 7
BUSY_TIMEOUT_MS = 5000
PAIR_CACHE_MAX = 65_536  # pair refs the writer keeps in memory (about 10 MB at most)
_TERMS_SCHEMA = """
CREATE TABLE IF NOT EXISTS terms (
    rule_id TEXT NOT NULL,
    agent_ref INTEGER NOT NULL,
    pair BLOB NOT NULL,
    first_ts INTEGER NOT NULL,
    last_ts INTEGER NOT NULL,
    PRIMARY KEY (rule_id, agent_ref, pair)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS terms_last ON terms(rule_id, last_ts);
CREATE TABLE IF NOT EXISTS term_hits (
    id INTEGER PRIMARY KEY,
    rule_id TEXT NOT NULL,
    ts INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    agent_ref INTEGER NOT NULL,
    host_id TEXT NOT NULL,
    exe BLOB,
    path BLOB,
    detail BLOB,
    actor BLOB
);
CREATE INDEX IF NOT EXISTS term_hits_ts ON term_hits(rule_id, ts);
CREATE INDEX IF NOT EXISTS term_hits_received ON term_hits(rule_id, received_ms);
"""
# The continuous schedule's memory (agent.collector.storage.ticks): the id
# orders pair_changes by commit (one writer at a time, never reused).
_TICKS_SCHEMA = """
CREATE TABLE IF NOT EXISTS pair_changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_ms INTEGER NOT NULL,
    pairs BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS pair_changes_received ON pair_changes(received_ms);
CREATE INDEX IF NOT EXISTS alerts_pair ON alerts(rule_id, exe, path, at_ms);
""" + ticks.TICKS_SCHEMA.format(int="INTEGER")
_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS hosts (ref INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS agents (
    ref INTEGER PRIMARY KEY,
    agent_id TEXT NOT NULL UNIQUE,
    host_ref INTEGER NOT NULL REFERENCES hosts(ref),
    key_hash TEXT NOT NULL UNIQUE,
    revoked INTEGER NOT NULL DEFAULT 0,
    enrolled_ms INTEGER NOT NULL,
    last_seen_ms INTEGER,
    health TEXT
);
CREATE TABLE IF NOT EXISTS enroll_tokens (
    token_hash TEXT PRIMARY KEY,
    token_id TEXT NOT NULL UNIQUE,
    agent_id TEXT,
    uses_left INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    comment TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS pairs (
    ref INTEGER PRIMARY KEY,
    key BLOB NOT NULL UNIQUE,
    exe BLOB,
    path BLOB,
    last_ts INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS pairs_last_ts ON pairs(last_ts);
CREATE TABLE IF NOT EXISTS epochs (
    agent_ref INTEGER NOT NULL,
    epoch TEXT NOT NULL,
    last_seq INTEGER NOT NULL,
    last_sent_at INTEGER NOT NULL,
    PRIMARY KEY (agent_ref, epoch)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches (
    agent_ref INTEGER NOT NULL,
    epoch TEXT NOT NULL,
    seq INTEGER NOT NULL,
    batch_id TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    records INTEGER NOT NULL,
    PRIMARY KEY (agent_ref, epoch, seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS batches_id ON batches(agent_ref, batch_id);
CREATE INDEX IF NOT EXISTS batches_received ON batches(received_ms);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    ts INTEGER NOT NULL,
    pair INTEGER NOT NULL,
    agent INTEGER NOT NULL,
    host INTEGER NOT NULL,
    detail BLOB,
    actor INTEGER
);
CREATE TABLE IF NOT EXISTS actors (ref INTEGER PRIMARY KEY, key BLOB NOT NULL UNIQUE);
CREATE INDEX IF NOT EXISTS events_ts ON events(ts);
CREATE INDEX IF NOT EXISTS events_pair ON events(pair, ts, agent, host);
CREATE TABLE IF NOT EXISTS gaps (
    id INTEGER PRIMARY KEY,
    agent_ref INTEGER NOT NULL,
    start_ms INTEGER NOT NULL,
    end_ms INTEGER NOT NULL,
    lost INTEGER NOT NULL,
    reason TEXT NOT NULL,
    received_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS gaps_end ON gaps(end_ms);
CREATE TABLE IF NOT EXISTS alerts (
    alert_id TEXT PRIMARY KEY,
    rule_id TEXT NOT NULL,
    exe BLOB,
    path BLOB,
    at_ms INTEGER NOT NULL,
    first_ts INTEGER NOT NULL,
    doc TEXT NOT NULL,
    skey BLOB,
    folded_into TEXT,
    dirty INTEGER NOT NULL DEFAULT 0,
    emitted_ms INTEGER
);
CREATE INDEX IF NOT EXISTS alerts_at ON alerts(at_ms);
CREATE INDEX IF NOT EXISTS alerts_skey ON alerts(rule_id, skey, at_ms);
"""
    + _TERMS_SCHEMA
    + notes.NOTES_SCHEMA.format(**notes.SQLITE_TYPES)
    + _TICKS_SCHEMA
)

_META_SQL = f"INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', '{SCHEMA_VERSION}');"  # noqa: S608

_PAIR_UPSERT_SQL = (
    "INSERT INTO pairs(key, exe, path, last_ts) VALUES (?, ?, ?, ?) "
    "ON CONFLICT(key) DO UPDATE SET last_ts=max(last_ts, excluded.last_ts) RETURNING ref"
)


def _migrate_v2(conn: sqlite3.Connection) -> None:
    conn.create_function("rarewrite_order_key", 2, order_key, deterministic=True)
    # Old keys are msgpack arrays (first byte 0x92), new ones start with 00 or
    # 01: no new key can meet an old one while the rows are rewritten.
    conn.execute("UPDATE pairs SET key = rarewrite_order_key(exe, path)")
    conn.execute("CREATE INDEX IF NOT EXISTS events_pair ON events(pair, ts, agent, host)")
    conn.execute("CREATE INDEX IF NOT EXISTS events_ts ON events(ts)")
    conn.execute("DROP INDEX IF EXISTS events_window")


def _migrate_v3(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE events ADD COLUMN actor INTEGER")
    conn.execute("CREATE TABLE IF NOT EXISTS actors (ref INTEGER PRIMARY KEY, key BLOB NOT NULL UNIQUE)")
    for column in ("skey BLOB", "folded_into TEXT", "dirty INTEGER NOT NULL DEFAULT 0", "emitted_ms INTEGER"):
        conn.execute(f"ALTER TABLE alerts ADD COLUMN {column}")
    conn.execute("CREATE INDEX IF NOT EXISTS alerts_skey ON alerts(rule_id, skey, at_ms)")


_TOKENS_SQL = (
    "CREATE TABLE IF NOT EXISTS enroll_tokens (token_hash TEXT PRIMARY KEY, token_id TEXT NOT NULL UNIQUE, "
    "agent_id TEXT, uses_left INTEGER NOT NULL, expires_ms INTEGER NOT NULL, created_ms INTEGER NOT NULL, "
    "comment TEXT NOT NULL DEFAULT '')"
)


def _migrate_v4(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE agents ADD COLUMN health TEXT")
    conn.execute(_TOKENS_SQL)


def _migrate_v5(conn: sqlite3.Connection) -> None:
    for stmt in _TERMS_SCHEMA.split(";"):
        if stmt.strip():
            conn.execute(stmt)


def _migrate_v6(conn: sqlite3.Connection) -> None:
    for stmt in notes.NOTES_SCHEMA.format(**notes.SQLITE_TYPES).split(";"):
        if stmt.strip():
            conn.execute(stmt)


def _migrate_v7(conn: sqlite3.Connection) -> None:
    for stmt in _TICKS_SCHEMA.split(";"):
        if stmt.strip():
            conn.execute(stmt)


MIGRATIONS: tuple[Migration[sqlite3.Connection], ...] = (
    Migration(2, "pairs keyed in (exe, path) order; events indexed by (pair, ts) and (ts)", _migrate_v2),
    Migration(3, "who wrote each event (actors) for exceptions; alert suppression", _migrate_v3),
    Migration(4, "agents' health from heartbeats; per-host enrollment tokens", _migrate_v4),
    Migration(5, "several rules: the new-terms history and its new events", _migrate_v5),
    Migration(6, "what came after an alert's events: agents' notes, response actions", _migrate_v6),
    Migration(7, "the continuous schedule's memory: pairs each batch changed, the last tick", _migrate_v7),
)

# The rule's rows at T in two statements, both ranking pairs by
#   v = 2 * cc + ok
# where cc counts the pair's events in the window, but only up to count_below
# (LIMIT: a pair with thousands of events costs count_below index steps, and
# cc < count_below is all the rule asks), and ok is 1 when the pair has
# exactly agent_count distinct agents in the window. A pair is a row when v
# is odd, v >= 3 (cc >= 1) and v < 2 * count_below; rows sort by v (= by cc),
# then by key (= by exe, path).
#
# _WALK: the rows have at least max(1, agent_count) events, and when there are
# enough rows with exactly that cc, they are the answer. So walk pairs in key
# order through the key index, counting each one's events through
# events_pair, and stop at the limit: with many rare pairs (every pair new in
# the hour) this reads limit pairs, not the window. The walk looks at no more
# than :budget pairs; when it finds fewer than limit rows,
# _FULL ranks every pair with an event in the window (pairs in rowid order, so
# the events_pair lookups go forward) and keeps the first limit by (v, key).
#
# Both feed _DETAIL, which adds cc, the agents, hosts and first event time of
# the chosen pairs only (each has fewer than count_below events).
_V_ONE = "(min(a) = max(a))"  # agent_count == 1; NULL without events
_V_ANY = "(count(DISTINCT a) = :agents)"
_V_SQL = """(
        SELECT count(*) * 2 + {ok} FROM (
            SELECT agent AS a FROM events INDEXED BY events_pair
            WHERE pair = p.ref AND ts > :lo AND ts <= :hi LIMIT :below
        )
    )"""
_WALK_SQL = """
SELECT v, ref, key FROM (
    SELECT p.ref, p.key, {v} AS v
    FROM pairs AS p INDEXED BY sqlite_autoindex_pairs_1 {skip_where} ORDER BY p.key LIMIT :budget
) WHERE v = :vmin AND v < 2 * :below LIMIT :limit
"""
_FULL_SQL = """
SELECT v, ref, key FROM (
    SELECT p.ref, p.key, {v} AS v
    FROM pairs AS p NOT INDEXED WHERE p.last_ts > :lo {skip_and} LIMIT -1
) WHERE v % 2 = 1 AND v >= 3 AND v < 2 * :below
ORDER BY v, key LIMIT :limit
"""
# Pairs an evaluation leaves to the exceptions (refs), one temp table per connection
_SKIP = "p.ref NOT IN (SELECT ref FROM temp.rw_skip)"
_DETAIL_SQL = """
WITH ranked(v, ref, key) AS MATERIALIZED ({ranked})
SELECT count(*), min(e.agent), max(e.agent), min(e.host), max(e.host), min(e.ts), p.exe, p.path, r.ref
FROM ranked AS r CROSS JOIN pairs AS p CROSS JOIN events AS e INDEXED BY events_pair
WHERE p.ref = r.ref AND e.pair = r.ref AND e.ts > :lo AND e.ts <= :hi
GROUP BY r.ref
ORDER BY r.v, r.key
"""
# _AMONG: the pairs of temp.rw_among, chosen as rows by CollectorStore.ranked_among
# (a continuous tick's, from the newest count_below events of each pair: _COUNT_SQL).
_AMONG_SQL = """
SELECT 0, c.ref, p.key FROM temp.rw_among AS c CROSS JOIN pairs AS p WHERE p.ref = c.ref{skip_and}
"""
_COUNT_SQL = (
    "SELECT agent, ts FROM events INDEXED BY events_pair WHERE pair = ? AND ts > ? AND ts <= ? "
    "ORDER BY ts DESC LIMIT ?"
)
_ROWS_SQL = {
    (mode, one, skip): _DETAIL_SQL.format(
        ranked={"walk": _WALK_SQL, "full": _FULL_SQL, "among": _AMONG_SQL}[mode].format(
            v=_V_SQL.format(ok=_V_ONE if one else _V_ANY),
            skip_where=f"WHERE {_SKIP}" if skip else "",
            skip_and=f"AND {_SKIP}" if skip else "",
        )
    )
    for mode in ("walk", "full", "among")
    for one in (True, False)
    for skip in (True, False)
}
WALK_PAIRS = 100_000  # walk for limits up to this, through at most max(WALK_PAIRS, 10 * limit) pairs


def sqlite_version(path: str) -> int:
    """The schema version of the SQLite file at ``path`` (0: none yet)."""
    if not os.path.exists(path):
        return 0
    with _db_errors(f"reading {path!r}"):
        conn = sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True)
        try:
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone():
                return 0
            got = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            return int(got[0]) if got else 0
        finally:
            conn.close()


@contextlib.contextmanager
def _db_errors(what: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as e:
        raise StoreError(f"collector database: {what} failed: {e}") from e


class CollectorStore:
    """The SQLite implementation of :class:`Store`; safe to call from any thread."""

    def __init__(self, path: str, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._agent_names: dict[int, str] = {}
        self._host_names: dict[int, str] = {}
        self._actor_by_ref: dict[int, Actor] = {}
        self.walk_pairs = WALK_PAIRS  # see _WALK_SQL; tests lower it to cut the walk short
        self._busy = ticks.BusyPairs()  # see ranked_among
        if readonly and not os.path.exists(path):
            raise StoreError(f"no collector database at {path!r}")
        try:
            with _db_errors("opening the schema"):
                self._init_schema(self._conn())
        except BaseException:
            self.close()  # a refused file leaves no connection open
            raise

    # ------------------------------------------------------------ plumbing

    def _connect(self) -> sqlite3.Connection:
        with _db_errors(f"opening {self.path!r}"):
            if self.readonly:
                conn = sqlite3.connect(
                    f"file:{quote(os.path.abspath(self.path))}?mode=ro", uri=True, isolation_level=None
                )
            else:
                conn = sqlite3.connect(self.path, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            if not self.readonly:
                conn.execute("PRAGMA journal_mode=WAL")
                # FULL: the WAL is fsynced at every commit, so a 2xx means durable.
                conn.execute("PRAGMA synchronous=FULL")
        with self._lock:
            self._all.append(conn)
        return conn

    def _conn(self) -> sqlite3.Connection:
        conn: Optional[sqlite3.Connection] = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    @staticmethod
    def _version(conn: sqlite3.Connection) -> Optional[int]:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone():
            return None
        got = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(got[0]) if got else None

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        version = self._version(conn)
        if version is not None and version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path!r} has schema version {version}, newer than this rarewrite supports "
                f"({SCHEMA_VERSION}); upgrade rarewrite or use another database"
            )
        if self.readonly:
            if version is None:
                raise StoreError(f"{self.path!r} is not a rarewrite collector database")
            if version < SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path!r} has schema version {version}, older than this rarewrite's "
                    f"({SCHEMA_VERSION}); run 'rarewrite collector migrate --db {self.path}' "
                    "(collector serve migrates it too when it starts)"
                )
            return
        if version is None:
            # One script, one transaction: a half-created schema never persists.
            try:
                conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA + _META_SQL + "COMMIT;")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        elif version < SCHEMA_VERSION:
            self._migrate(conn)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Apply the missing :data:`MIGRATIONS` in one write transaction."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            before = self._version(conn) or 0  # another process may have migrated meanwhile
            if before > SCHEMA_VERSION:
                raise StoreError(f"{self.path!r} was migrated to schema version {before} meanwhile")
            for m in pending(MIGRATIONS, before):
                m.step(conn)
                log.info(
                    "event=migrated db=%r version=%d description=%r", self.path, m.version, m.description
                )
            conn.execute(_META_SQL)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction; rolled back on any error."""
        if self.readonly:
            raise StoreError("the collector database is open read-only")
        conn = self._conn()
        with _db_errors(what):
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        """Run the block in one read transaction: one snapshot for all its reads."""
        conn = self._conn()
        if conn.in_transaction:
            yield
            return
        with _db_errors("reading"):
            conn.execute("BEGIN")
            try:
                yield
            finally:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("COMMIT")

    @contextlib.contextmanager
    def schedule_run(self, rule_id: str, kind: str, at_ms: int) -> Iterator[bool]:
        """One scheduled run: always this process's to do (one SQLite file has
        one collector); the run's alerts commit in one transaction of their own."""
        yield True

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()

    def check(self) -> None:
        """Raise StoreError unless the database answers."""
        with _db_errors("health check"):
            self._conn().execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()

    # ------------------------------------------------------------ agents

    @staticmethod
    def _host_ref(conn: sqlite3.Connection, name: str) -> int:
        conn.execute("INSERT OR IGNORE INTO hosts(name) VALUES (?)", (name,))
        return int(conn.execute("SELECT ref FROM hosts WHERE name=?", (name,)).fetchone()[0])

    def enroll(
        self,
        agent_id: str,
        host_name: str,
        key_hash: str,
        now_ms: int,
        proof_hash: Optional[str] = None,
        token_hash: Optional[str] = None,
    ) -> EnrollStatus:
        """Bind ``key_hash`` to ``agent_id`` if :func:`enroll_decision` allows;
        a token's use is spent in the same transaction, and only on success."""
        with self._write("enroll") as conn:
            token = None
            if token_hash is not None:
                token = self._token(conn, token_hash)
                if not token_usable(token, agent_id, now_ms):
                    return ENROLL_BAD_TOKEN
            got = conn.execute(
                "SELECT key_hash, revoked FROM agents WHERE agent_id=?", (agent_id,)
            ).fetchone()
            current = None if got is None else (str(got[0]), bool(got[1]))
            status = enroll_decision(current, proof_hash, token.agent_id if token else None, agent_id)
            if status not in (ENROLL_NEW, ENROLL_REKEYED):
                return status
            host = self._host_ref(conn, host_name)
            conn.execute(
                "INSERT INTO agents(agent_id, host_ref, key_hash, revoked, enrolled_ms) "
                "VALUES (?, ?, ?, 0, ?) ON CONFLICT(agent_id) DO UPDATE SET host_ref=excluded.host_ref, "
                "key_hash=excluded.key_hash, enrolled_ms=excluded.enrolled_ms",
                (agent_id, host, key_hash, now_ms),
            )
            if token_hash is not None:
                conn.execute(
                    "UPDATE enroll_tokens SET uses_left=uses_left-1 WHERE token_hash=?", (token_hash,)
                )
            return status

    @classmethod
    def _token(cls, conn: sqlite3.Connection, token_hash: str) -> Optional[EnrollToken]:
        r = conn.execute(TOKENS_SQL + " WHERE token_hash=?", (token_hash,)).fetchone()
        return None if r is None else EnrollToken(*r)

    def add_token(self, token_hash: str, token: EnrollToken) -> None:
        with self._write("adding a token") as conn:
            conn.execute(
                "INSERT INTO enroll_tokens(token_hash, token_id, agent_id, uses_left, expires_ms, "
                "created_ms, comment) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (token_hash, token.token_id, token.agent_id, token.uses_left, token.expires_ms,
                 token.created_ms, token.comment),
            )  # fmt: skip

    def list_tokens(self) -> list[EnrollToken]:
        with _db_errors("listing tokens"):
            rows = self._conn().execute(TOKENS_SQL + " ORDER BY created_ms, token_id").fetchall()
        return [EnrollToken(*r) for r in rows]

    def revoke_token(self, token_id: str) -> bool:
        with self._write("revoking a token") as conn:
            return (
                conn.execute("UPDATE enroll_tokens SET uses_left=0 WHERE token_id=?", (token_id,)).rowcount
                > 0
            )

    def heartbeats(self, beats: Sequence[tuple[int, int, str]]) -> None:
        """(agent ref, time, health JSON) of heartbeats, in one transaction."""
        with self._write("heartbeats") as conn:
            conn.executemany(
                "UPDATE agents SET last_seen_ms=max(coalesce(last_seen_ms, 0), ?), health=? WHERE ref=?",
                [(t, h, ref) for ref, t, h in beats],
            )

    _AGENT_SQL = (
        "SELECT a.agent_id, h.name, a.revoked, a.ref, a.host_ref, a.enrolled_ms, a.last_seen_ms, a.health "
        "FROM agents a JOIN hosts h ON h.ref = a.host_ref"
    )

    @staticmethod
    def _agent(r: Sequence[Any]) -> AgentRecord:
        return AgentRecord(str(r[0]), str(r[1]), bool(r[2]), int(r[3]), int(r[4]), int(r[5]), r[6], r[7])

    def agent_for_key(self, key_hash: str) -> Optional[AgentRecord]:
        with _db_errors("key lookup"):
            r = self._conn().execute(self._AGENT_SQL + " WHERE a.key_hash=?", (key_hash,)).fetchone()
        return self._agent(r) if r else None

    def revoke(self, agent_id: str) -> bool:
        with self._write("revoke") as conn:
            cur = conn.execute("UPDATE agents SET revoked=1 WHERE agent_id=?", (agent_id,))
            return cur.rowcount > 0

    def restore(self, agent_id: str) -> bool:
        """An admin's reset: the id may enroll again with the secret alone
        (revoked or not); its old key stays dead."""
        with self._write("restore") as conn:
            cur = conn.execute(  # a key hash no key has: the old key stays dead
                "UPDATE agents SET revoked=0, key_hash=? || agent_id WHERE agent_id=?",
                (RESET_PREFIX, agent_id),
            )
            return cur.rowcount > 0

    def list_agents(self) -> list[AgentRecord]:
        with _db_errors("listing agents"):
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
        """Store one decoded batch for ``agent`` in one transaction, with what
        its new-terms ``terms`` change (agent.collector.terms.split).

        ``batch`` is a :class:`wire.Batch` or, from the server's decoder, a
        :class:`wire.RowBatch` (details already packed: stored as they are).
        Returns "duplicate" (nothing changed) when its batch id was stored
        before, "conflict" (nothing changed) when its seq is not past the last
        one of its epoch under another batch id, else "stored". A seq gap
        records a "possible_loss" gap for the agent.
        """
        rb = wire.rows_of(batch)
        cache = self._pair_cache()
        fresh: dict[bytes, tuple[int, int]] = {}
        with self._write("ingest") as conn:
            dv = conn.execute("PRAGMA data_version").fetchone()[0]
            if dv != self._local.data_version:
                cache.clear()  # another connection committed: a cached pair may be gone
                self._local.data_version = dv
            claimed = self._claim(conn, agent, rb, now_ms)
            if claimed != "stored":
                return claimed
            refs = self._pair_refs(conn, newest_per_pair(rb), cache, fresh)
            new_actors: dict[bytes, int] = {}
            actors = self._actor_refs(conn, actor_keys(rb), new_actors)
            conn.executemany(
                "INSERT INTO events(ts, pair, agent, host, detail, actor) VALUES (?, ?, ?, ?, ?, ?)",
                event_rows(rb, refs, agent, actors),
            )
            if rb.gaps:
                conn.executemany(
                    "INSERT INTO gaps(agent_ref, start_ms, end_ms, lost, reason, received_ms) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [(agent.ref, g.start, g.end, g.lost, g.reason, now_ms) for g in rb.gaps],
                )
            if terms:
                self._terms(conn, agent, rb.host_id, terms, now_ms)
            if rb.notes:
                conn.executemany(notes.NOTE_INSERT_SQL, notes.note_rows(agent.ref, rb.notes, now_ms))
                conn.executemany(notes.ACTION_DONE_SQL, notes.action_reports(agent.ref, rb.notes, now_ms))
            if refs:
                conn.execute(
                    "INSERT INTO pair_changes(received_ms, pairs) VALUES (?, ?)",
                    (now_ms, ticks.pack_refs(set(refs.values()))),
                )
            conn.execute("UPDATE agents SET last_seen_ms=? WHERE ref=?", (now_ms, agent.ref))
        # Committed: what this batch learnt about its pairs and actors is now true.
        self._local.actors.update(new_actors)
        if len(cache) + len(fresh) > PAIR_CACHE_MAX:
            cache.clear()
        cache.update(fresh)
        return "stored"

    @staticmethod
    def _terms(
        conn: sqlite3.Connection, agent: AgentRecord, host_id: str, cands: Sequence[Candidate], now_ms: int
    ) -> None:
        def lookup(rule_id: str, pairs: Sequence[bytes]) -> dict[bytes, Run]:
            sql = TERM_SELECT_SQL.format(marks=",".join("?" * len(pairs)))
            got = conn.execute(sql, (rule_id, agent.ref, *pairs)).fetchall()
            return {bytes(p): (int(first), int(last)) for p, first, last in got}

        upserts, inserts = term_writes(lookup, agent, host_id, cands, now_ms)
        conn.executemany(TERM_UPSERT_SQL, upserts)
        conn.executemany(HIT_INSERT_SQL, inserts)

    def term_hits(
        self, rule_id: str, lo_ms: int, hi_ms: int, by_received: bool = False, on_hosts: int = 0
    ) -> list[TermHit]:
        """The new events of ``rule_id`` with lo < ts <= hi (or received in
        it), in that order; ``on_hosts``: only pairs new on that many agents in it."""
        sql, args = hits_query(rule_id, lo_ms, hi_ms, by_received, on_hosts)
        with _db_errors("reading new terms"):
            got = self._conn().execute(sql, args).fetchall()
        return [hit_of(r) for r in got]

    def prune_terms(self, rule_id: str, before_ms: int) -> int:
        """Forget combinations of ``rule_id`` last seen before ``before_ms``."""
        with self._write("pruning new terms") as conn:
            cur = conn.execute("DELETE FROM terms WHERE rule_id=? AND last_ts < ?", (rule_id, before_ms))
            return int(cur.rowcount)

    @staticmethod
    def _claim(conn: sqlite3.Connection, agent: AgentRecord, rb: wire.RowBatch, now_ms: int) -> str:
        """Name the batch (agent, epoch, seq, batch id) in this transaction,
        with the possible-loss gap its seq opens: "stored", or "duplicate" (its
        batch id was stored) or "conflict" (a new batch id with a used seq)."""
        seen = conn.execute(
            "SELECT 1 FROM batches WHERE agent_ref=? AND batch_id=?", (agent.ref, rb.batch_id)
        ).fetchone()
        if seen:
            return "duplicate"
        ep = conn.execute(
            "SELECT last_seq, last_sent_at FROM epochs WHERE agent_ref=? AND epoch=?",
            (agent.ref, rb.epoch),
        ).fetchone()
        if is_replayed(ep, rb.seq):
            return "conflict"
        gap = possible_loss(agent, ep, rb)
        if gap is not None:
            conn.execute(
                "INSERT INTO gaps(agent_ref, start_ms, end_ms, lost, reason, received_ms) "
                "VALUES (?, ?, ?, 0, 'possible_loss', ?)",
                (agent.ref, *gap, now_ms),
            )
        conn.execute(
            "INSERT INTO epochs(agent_ref, epoch, last_seq, last_sent_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(agent_ref, epoch) DO UPDATE SET last_seq=excluded.last_seq, "
            "last_sent_at=excluded.last_sent_at",
            (agent.ref, rb.epoch, rb.seq, rb.sent_at),
        )
        conn.execute(
            "INSERT INTO batches(agent_ref, epoch, seq, batch_id, received_ms, records) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (agent.ref, rb.epoch, rb.seq, rb.batch_id, now_ms, rb.size()),
        )
        return "stored"

    @staticmethod
    def _pair_refs(
        conn: sqlite3.Connection,
        newest: dict[bytes, tuple[Optional[bytes], Optional[bytes], int]],
        cache: dict[bytes, tuple[int, int]],
        fresh: dict[bytes, tuple[int, int]],
    ) -> dict[bytes, int]:
        """Pair key -> ref for the batch's pairs: one statement per pair that
        is new to the cache or whose last_ts moves. What the cache should
        learn once the transaction commits goes into ``fresh``."""
        refs: dict[bytes, int] = {}
        moved: list[tuple[int, int]] = []
        for key, (exe, path, top) in newest.items():
            known = cache.get(key)
            if known is None:
                ref = int(
                    conn.execute(_PAIR_UPSERT_SQL, (order_key(exe, path), exe, path, top)).fetchone()[0]
                )
                fresh[key] = (ref, top)
            else:
                ref = known[0]
                if top > known[1]:
                    moved.append((top, ref))
                    fresh[key] = (ref, top)
            refs[key] = ref
        if moved:
            conn.executemany("UPDATE pairs SET last_ts=max(last_ts, ?) WHERE ref=?", moved)
        return refs

    def _actor_refs(
        self, conn: sqlite3.Connection, keys: set[bytes], fresh: dict[bytes, int]
    ) -> dict[bytes, int]:
        """Actor key -> ref (actors are never deleted: a host has a handful).
        Refs new to this connection go into ``fresh``, cached once committed."""
        known: dict[bytes, int] = self._local.actors
        for key in keys - known.keys():
            conn.execute("INSERT OR IGNORE INTO actors(key) VALUES (?)", (key,))
            fresh[key] = int(conn.execute("SELECT ref FROM actors WHERE key=?", (key,)).fetchone()[0])
        return {**known, **fresh} if fresh else known

    def _actor_names(self, conn: sqlite3.Connection, refs: set[int]) -> dict[int, Actor]:
        if not refs <= self._actor_by_ref.keys():
            self._actor_by_ref.update(
                (int(r), actor_of_key(bytes(k))) for r, k in conn.execute("SELECT ref, key FROM actors")
            )
        return self._actor_by_ref

    def pairs_since(self, lo_ms: int) -> list[PairRef]:
        """Every pair with an event after ``lo_ms`` (by its newest time)."""
        with _db_errors("reading pairs"):
            got = (
                self._conn()
                .execute("SELECT ref, exe, path FROM pairs WHERE last_ts > ?", (lo_ms,))
                .fetchall()
            )
        return got  # INTEGER and BLOB come out as int and bytes

    def window_events(self, refs: Sequence[int], lo_ms: int, hi_ms: int) -> list[WindowEvent]:
        """The events of the pairs ``refs`` with lo < ts <= hi, with their actors."""
        conn = self._conn()
        out: list[WindowEvent] = []
        with _db_errors("reading events"), self.read():
            for i in range(0, len(refs), 500):
                chunk = list(refs[i : i + 500])
                marks = ",".join("?" * len(chunk))
                got = conn.execute(
                    "SELECT pair, ts, agent, host, actor FROM events INDEXED BY events_pair "  # noqa: S608
                    f"WHERE pair IN ({marks}) AND ts > ? AND ts <= ?",
                    (*chunk, lo_ms, hi_ms),
                ).fetchall()
                agents = self._names(conn, {r[2] for r in got}, "agents")
                hosts = self._names(conn, {r[3] for r in got}, "hosts")
                who = self._actor_names(conn, {r[4] for r in got if r[4] is not None})
                out.extend(
                    WindowEvent(int(p), int(t), agents[a], hosts[h], NO_ACTOR if w is None else who[w])
                    for p, t, a, h, w in got
                )
        return out

    def _pair_cache(self) -> dict[bytes, tuple[int, int]]:
        """This connection's pair key -> (ref, last_ts) of committed pairs (bounded)."""
        cache: Optional[dict[bytes, tuple[int, int]]] = getattr(self._local, "pairs", None)
        if cache is None:
            cache = self._local.pairs = {}
            self._local.actors = {}
            self._local.data_version = None
        return cache

    # ------------------------------------------------------------ evaluation

    def _names(self, conn: sqlite3.Connection, refs: set[int], table: str) -> dict[int, str]:
        cache = self._agent_names if table == "agents" else self._host_names
        if not refs <= cache.keys():
            sql = "SELECT ref, agent_id FROM agents" if table == "agents" else "SELECT ref, name FROM hosts"
            cache.update((int(r), str(n)) for r, n in conn.execute(sql))
        return cache

    def ranked_rows(self, rule: Rule, at_ms: int, skip: Collection[int] = ()) -> list[RankedRow]:
        """The rule's rows at T, each with its pair's first event time in the
        window; pairs in ``skip`` (refs) left out (exceptions count those themselves)."""
        if not can_have_rows(rule):
            return []
        conn = self._conn()
        one, args = rule.agent_count == 1, self._row_args(rule, at_ms)
        with _db_errors("evaluating"), self.read():
            if skip:
                self._temp_refs(conn, "rw_skip", skip)
            sk = bool(skip)
            walked = rule.limit <= WALK_PAIRS
            got = conn.execute(_ROWS_SQL["walk", one, sk], args).fetchall() if walked else []
            if len(got) < rule.limit:  # too few rows with the fewest events: rank them all
                got = conn.execute(_ROWS_SQL["full", one, sk], args).fetchall()
            return self._ranked(conn, got, args["lo"], at_ms)

    def ranked_among(self, rule: Rule, at_ms: int, refs: Collection[int]) -> list[RankedRow]:
        """Every row at T among the pairs ``refs``, in the rule's order (no limit)."""
        if not can_have_rows(rule) or not refs:
            return []
        conn = self._conn()
        args = self._row_args(rule, at_ms)
        lo, below = args["lo"], rule.count_below
        with _db_errors("evaluating"), self.read():
            counts = []
            for ref in self._busy.to_count(rule, at_ms, refs):
                got = conn.execute(_COUNT_SQL, (ref, lo, at_ms, below)).fetchall()
                if got:
                    agents = {a for a, _ in got}
                    ok = len(agents) == 1 if rule.agent_count == 1 else len(agents) == rule.agent_count
                    counts.append((ref, len(got), ok, got[-1][1]))
            chosen = self._busy.rows(rule, at_ms, counts)
            if not chosen:
                return []
            self._temp_refs(conn, "rw_among", chosen)
            rows = self._ranked(
                conn, conn.execute(_ROWS_SQL["among", True, False], args).fetchall(), lo, at_ms
            )
        rows.sort(key=lambda r: (r.row.cc, order_key(r.row.executable, r.row.path)))
        return rows

    def _row_args(self, rule: Rule, at_ms: int) -> dict[str, int]:
        return {
            "lo": at_ms - rule.window_ms,
            "hi": at_ms,
            "below": rule.count_below,
            "agents": rule.agent_count,
            "limit": rule.limit,
            "vmin": 2 * max(1, rule.agent_count) + 1,
            "budget": max(self.walk_pairs, 10 * rule.limit),
        }

    @staticmethod
    def _temp_refs(conn: sqlite3.Connection, table: str, refs: Collection[int]) -> None:
        conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {table} (ref INTEGER PRIMARY KEY)")
        conn.execute(f"DELETE FROM temp.{table}")  # noqa: S608 - one of two fixed names
        conn.executemany(f"INSERT INTO temp.{table} VALUES (?)", ((r,) for r in refs))  # noqa: S608

    def _ranked(self, conn: sqlite3.Connection, got: list[Any], lo: int, at_ms: int) -> list[RankedRow]:
        """RankedRows of _DETAIL_SQL's result rows (names looked up, cached)."""
        agent_names = self._names(conn, {r[1] for r in got} | {r[2] for r in got}, "agents")
        host_names = self._names(conn, {r[3] for r in got} | {r[4] for r in got}, "hosts")
        single_agent: dict[int, tuple[str, ...]] = {}
        single_host: dict[int, tuple[str, ...]] = {}
        out = []
        for cc, a1, a2, h1, h2, first, exe, path, pair in got:
            if a1 == a2 and h1 == h2:  # the usual row: one agent under one host name
                agents = 1
                agent_ids = single_agent.get(a1) or single_agent.setdefault(a1, (agent_names[a1],))
                hosts = single_host.get(h1) or single_host.setdefault(h1, (host_names[h1],))
            else:
                both = conn.execute(
                    "SELECT DISTINCT agent, host FROM events INDEXED BY events_pair "
                    "WHERE pair = ? AND ts > ? AND ts <= ?",
                    (pair, lo, at_ms),
                ).fetchall()
                agent_names = self._names(conn, {a for a, _ in both}, "agents")
                host_names = self._names(conn, {h for _, h in both}, "hosts")
                agents = len({a for a, _ in both})
                agent_ids = tuple(sorted({agent_names[a] for a, _ in both}))
                hosts = tuple(sorted({host_names[h] for _, h in both}))
            out.append(RankedRow(Row(cc, agents, hosts, agent_ids, exe, path), first))
        return out

    # ------------------------------------------------------------ continuous ticks

    def change_mark(self) -> int:
        """The newest pair_changes id this snapshot sees (call inside read())."""
        with _db_errors("reading changes"):
            got = self._conn().execute("SELECT max(id) FROM pair_changes").fetchone()
        return int(got[0] or 0)

    def tick_candidates(self, rule_id: str, state: ticks.TickState, at_ms: int, window_ms: int,
                        settle_ms: int) -> set[int]:  # fmt: skip
        """The pairs whose row may differ from the last tick's (see
        agent.collector.continuous): written since its mark, an event
        entering or leaving the window or passing the settle time, an alert
        of the rule leaving the window."""
        conn = self._conn()
        refs: set[int] = set()
        with _db_errors("reading changes"):
            for (blob,) in conn.execute("SELECT pairs FROM pair_changes WHERE id > ?", (state.mark,)):
                refs.update(ticks.unpack_refs(bytes(blob)))
            for lo, hi in ticks.edges(state.at_ms, at_ms, window_ms, settle_ms):
                refs.update(r for (r,) in conn.execute(ticks.PAIRS_BETWEEN_SQL, (lo, hi)))
            lo, hi = state.at_ms - window_ms, at_ms - window_ms
            for exe, path in conn.execute(ticks.ALERTS_BETWEEN_SQL, (rule_id, lo, hi)).fetchall():
                got = conn.execute("SELECT ref FROM pairs WHERE key=?", (order_key(exe, path),)).fetchone()
                if got is not None:
                    refs.add(int(got[0]))
        return refs

    def pair_refs(self, refs: Collection[int]) -> list[PairRef]:
        """(ref, exe, path) of the pairs ``refs`` (those still stored)."""
        conn = self._conn()
        out: list[PairRef] = []
        want = list(refs)
        with _db_errors("reading pairs"):
            for i in range(0, len(want), 500):
                chunk = want[i : i + 500]
                sql = f"SELECT ref, exe, path FROM pairs WHERE ref IN ({','.join('?' * len(chunk))})"  # noqa: S608
                out.extend(conn.execute(sql, chunk).fetchall())
        return out

    def alerted_among(self, rule_id: str, since_ms: int, pairs: Collection[Pair]) -> set[Pair]:
        """Those of ``pairs`` alerted by ``rule_id`` at a time T' > since_ms."""
        conn = self._conn()
        sql = "SELECT 1 FROM alerts WHERE rule_id=? AND exe IS ? AND path IS ? AND at_ms > ? LIMIT 1"
        with _db_errors("reading alerts"):
            return {p for p in pairs if conn.execute(sql, (rule_id, p[0], p[1], since_ms)).fetchone()}

    def tick_state(self, rule_id: str) -> Optional[ticks.TickState]:
        with _db_errors("reading the last tick"):
            got = self._conn().execute(ticks.TICK_SQL, (rule_id,)).fetchone()
        return None if got is None else ticks.TickState(int(got[0]), int(got[1]), str(got[2]), bool(got[3]))

    def save_tick(self, rule_id: str, state: ticks.TickState) -> None:
        with self._write("saving the tick") as conn:
            conn.execute(
                ticks.TICK_SAVE_SQL, (rule_id, state.at_ms, state.mark, state.fingerprint, int(state.cut))
            )

    def rows(self, rule: Rule, at_ms: int) -> list[Row]:
        """The rule's rows at T: exact to the millisecond, sorted by cc, at most rule.limit."""
        return [r.row for r in self.ranked_rows(rule, at_ms)]

    def pair_events(self, pair: Pair, lo_ms: int, hi_ms: int, limit: int) -> list[StoredEvent]:
        """Up to ``limit`` events of ``pair`` with lo < ts <= hi, oldest first."""
        conn = self._conn()
        with _db_errors("reading events"):
            ref = conn.execute("SELECT ref FROM pairs WHERE key=?", (order_key(*pair),)).fetchone()
            if ref is None:
                return []
            got = conn.execute(
                "SELECT e.ts, a.agent_id, h.name, e.detail, e.actor FROM events e "
                "JOIN agents a ON a.ref = e.agent JOIN hosts h ON h.ref = e.host "
                "WHERE e.ts > ? AND e.ts <= ? AND e.pair = ? ORDER BY e.ts, e.id LIMIT ?",
                (lo_ms, hi_ms, ref[0], limit),
            ).fetchall()
            who = self._actor_names(conn, {r[4] for r in got if r[4] is not None})
        out = []
        for ts, agent_id, host, detail, actor in got:
            d = None
            if detail is not None:
                d = msgpack.unpackb(detail, raw=False, strict_map_key=True)
            out.append(
                StoredEvent(int(ts), str(agent_id), str(host), d, NO_ACTOR if actor is None else who[actor])
            )
        return out

    def gaps_overlapping(self, start_ms: int, end_ms: int) -> list[GapRow]:
        """Gaps whose [start, end] meets (start_ms, end_ms], any agent."""
        with _db_errors("reading gaps"):
            got = (
                self._conn()
                .execute(
                    "SELECT a.agent_id, g.start_ms, g.end_ms, g.lost, g.reason FROM gaps g "
                    "JOIN agents a ON a.ref = g.agent_ref "
                    "WHERE g.end_ms > ? AND g.start_ms <= ? ORDER BY g.id",
                    (start_ms, end_ms),
                )
                .fetchall()
            )
        return [GapRow(str(a), int(s), int(e), int(n), str(r)) for a, s, e, n, r in got]

    # ------------------------------------------------------------ alerts

    def record_alerts(self, rule_id: str, alerts: Sequence[AlertItem]) -> list[str]:
        """Store (alert_id, pair, at_ms, first_ts, doc_json, suppression key)
        tuples as raised alerts; return the ids that were new."""
        new = []
        with self._write("recording alerts") as conn:
            for alert_id, (exe, path), at_ms, first_ts, doc, skey in alerts:
                cur = conn.execute(
                    "INSERT OR IGNORE INTO alerts(alert_id, rule_id, exe, path, at_ms, first_ts, doc, skey, "
                    "emitted_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (alert_id, rule_id, exe, path, at_ms, first_ts, doc, skey, at_ms),
                )
                if cur.rowcount:
                    new.append(alert_id)
        return new

    def suppression_parent(self, rule_id: str, skey: bytes, since_ms: int) -> Optional[tuple[str, str]]:
        """(alert_id, doc) of the newest raised alert with this suppression key after since_ms."""
        with _db_errors("reading alerts"):
            got = (
                self._conn()
                .execute(
                    "SELECT alert_id, doc FROM alerts WHERE rule_id=? AND skey=? AND folded_into IS NULL "
                    "AND at_ms > ? ORDER BY at_ms DESC LIMIT 1",
                    (rule_id, skey, since_ms),
                )
                .fetchone()
            )
        return None if got is None else (str(got[0]), str(got[1]))

    def fold_alert(self, rule_id: str, item: AlertItem, parent_id: str, parent_doc: str) -> bool:
        """Record a suppressed alert as folded into ``parent_id``, whose updated
        document waits to be sent again; False when it was recorded before."""
        alert_id, (exe, path), at_ms, first_ts, doc, skey = item
        with self._write("folding an alert") as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO alerts(alert_id, rule_id, exe, path, at_ms, first_ts, doc, skey, "
                "folded_into) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (alert_id, rule_id, exe, path, at_ms, first_ts, doc, skey, parent_id),
            )
            if not cur.rowcount:
                return False
            conn.execute("UPDATE alerts SET doc=?, dirty=1 WHERE alert_id=?", (parent_doc, parent_id))
        return True

    def suppressed_due(self, rule_id: str, before_ms: int) -> list[tuple[str, str]]:
        """(alert_id, doc) of alerts that grew since they were last sent at or before ``before_ms``."""
        with _db_errors("reading alerts"):
            got = (
                self._conn()
                .execute(
                    "SELECT alert_id, doc FROM alerts WHERE rule_id=? AND dirty=1 "
                    "AND coalesce(emitted_ms, 0) <= ? ORDER BY at_ms, alert_id",
                    (rule_id, before_ms),
                )
                .fetchall()
            )
        return [(str(a), str(d)) for a, d in got]

    def mark_emitted(self, alert_ids: Sequence[str], now_ms: int) -> None:
        with self._write("marking alerts sent") as conn:
            conn.executemany(
                "UPDATE alerts SET dirty=0, emitted_ms=? WHERE alert_id=?", [(now_ms, a) for a in alert_ids]
            )

    def alerted_pairs(self, rule_id: str, since_ms: int) -> set[Pair]:
        """Pairs alerted by ``rule_id`` at a time T' > since_ms."""
        with _db_errors("reading alerts"):
            got = (
                self._conn()
                .execute("SELECT exe, path FROM alerts WHERE rule_id=? AND at_ms > ?", (rule_id, since_ms))
                .fetchall()
            )
        return {(None if e is None else bytes(e), None if p is None else bytes(p)) for e, p in got}

    def list_alerts(self, since_ms: int) -> list[dict[str, Any]]:
        with _db_errors("reading alerts"):
            got = (
                self._conn()
                .execute(
                    "SELECT doc FROM alerts WHERE at_ms > ? AND folded_into IS NULL ORDER BY at_ms, alert_id",
                    (since_ms,),
                )
                .fetchall()
            )
        return [json.loads(d) for (d,) in got]

    # ------------------------------------------------------------ upkeep

    def prune(self, before_ms: int, max_chunks: Optional[int] = None) -> int:
        """Delete events, gaps and batch names older than ``before_ms`` in small
        transactions (ingest can run between them); return events deleted.
        With ``max_chunks`` stop after that many event chunks (call again while
        it returns a multiple of PRUNE_CHUNK)."""
        total = 0
        chunks = 0
        while True:
            with self._write("pruning events") as conn:
                n = conn.execute(
                    "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE ts < ? LIMIT ?)",
                    (before_ms, PRUNE_CHUNK),
                ).rowcount
            total += n
            chunks += 1
            if n < PRUNE_CHUNK:
                break
            if max_chunks is not None and chunks >= max_chunks:
                return total
        with self._write("pruning") as conn:
            conn.execute("DELETE FROM gaps WHERE end_ms < ?", (before_ms,))
            conn.execute("DELETE FROM term_hits WHERE ts < ? AND received_ms < ?", (before_ms, before_ms))
            conn.execute("DELETE FROM batches WHERE received_ms < ?", (before_ms,))
            conn.execute("DELETE FROM pair_changes WHERE received_ms < ?", (before_ms,))
            conn.execute("DELETE FROM alerts WHERE at_ms < ?", (before_ms - 7 * 86_400_000,))
            conn.execute(notes.PRUNE_NOTES_SQL, (before_ms,))
            conn.execute(notes.PRUNE_ACTIONS_SQL, (before_ms - 7 * 86_400_000,))
            # A pair whose newest event is older than the cutoff has no event left,
            # unless one arrived late; check inside this transaction.
            if conn.execute("SELECT 1 FROM events WHERE ts < ? LIMIT 1", (before_ms,)).fetchone() is None:
                conn.execute("DELETE FROM pairs WHERE last_ts < ?", (before_ms,))
                self._pair_cache().clear()
        return total

    def notes_for(self, pair: Pair, lo_ms: int, hi_ms: int) -> list[notes.Note]:
        """The notes about the pair's events with lo <= ts <= hi, in arrival order."""
        with _db_errors("reading notes"):
            got = self._conn().execute(notes.NOTES_FOR_SQL, (notes.note_pkey(*pair), lo_ms, hi_ms)).fetchall()
        return [notes.note_of(r) for r in got]

    def alerts_about(self, pair: Pair, event_ts: int) -> list[tuple[str, str, str]]:
        """(alert id, rule id, document) of the alerts whose window holds the pair's event at ``event_ts``."""
        with _db_errors("reading alerts"):
            got = (
                self._conn()
                .execute(
                    "SELECT alert_id, rule_id, doc FROM alerts WHERE at_ms >= ? AND first_ts <= ? "
                    "AND exe IS ? AND path IS ? AND folded_into IS NULL ORDER BY at_ms",
                    (event_ts, event_ts, *pair),
                )
                .fetchall()
            )
        return [(str(a), str(r), str(d)) for a, r, d in got]

    def queue_actions(self, rows: Sequence[notes.ActionRow]) -> None:
        """(alert id, rule id, exe, path, now, agent id): ask that agent to act once (again: nothing)."""
        with self._write("queueing actions") as conn:
            conn.executemany(notes.ACTION_INSERT_SQL, rows)

    def pending_actions(self, agent_ref: int) -> list[notes.Action]:
        with _db_errors("reading actions"):
            got = self._conn().execute(notes.PENDING_SQL, (agent_ref, notes.MAX_PENDING)).fetchall()
        return [notes.action_of(r) for r in got]

    def counts(self) -> dict[str, Any]:
        """Small gauges for /metrics."""
        conn = self._conn()
        with _db_errors("counting"):
            agents = conn.execute("SELECT count(*) FROM agents WHERE revoked=0").fetchone()[0]
            gaps = dict(conn.execute("SELECT reason, count(*) FROM gaps GROUP BY reason").fetchall())
            alerts = conn.execute("SELECT count(*) FROM alerts WHERE folded_into IS NULL").fetchone()[0]
        return {
            "agents": int(agents),
            "gaps": {str(k): int(v) for k, v in gaps.items()},
            "alerts": int(alerts),
        }
