"""The agent's state: the rolling hour and the outbox, in one SQLite file.

Schema version 3 (``meta.schema_version``)::

    meta(k TEXT PRIMARY KEY, v)            epoch, next_seq, schema_version,
                                           rule_bits (JSON list of rule ids)
    win(pair BLOB, ts INTEGER)             this agent's matching events, one hour;
                                           one index, on (pair, ts)
    outbox(id INTEGER PRIMARY KEY AUTOINCREMENT, kind INTEGER, ts INTEGER, body BLOB,
           rules INTEGER)                  kind 0: an <event> map (msgpack)
                                           kind 1: a count time; body = its count key
                                           kind 2: a <gap> map (msgpack)
                                           kind 3: a <note> map (msgpack): enrichment
                                           after its event (wire.context)
                                           rules: bit i = rule_bits[i] matched the
                                           event (NULL: a version-2 row, the first rule)
    lease(seq INTEGER PRIMARY KEY, batch_id TEXT, hi INTEGER, n INTEGER, body BLOB)
                                           the one batch in flight, bytes frozen
    quarantine(id, at, reason, body)       records the collector refused (400)

A pair is ``msgpack([exe, path])``; a count key is ``msgpack([exe, path,
pname, uname, uid])``, the pair and who wrote it (the collector applies
exceptions on those to bare times too; a key of schema 2 may be a bare pair).
An event goes into ``win`` and ``outbox``
in the same transaction, and the detail decision is made there: every event
is sent (no agent can decide rarity alone), with full detail while its pair
has fewer than ``count_below`` events in the agent's hour ending at the
event, as a bare time after that.

The hour is pruned every 5000 events, without an index on ``ts``: rows go in
spans of consecutive rowids (rows come in time order, near enough), a span
once its newest time is a window older than the newest time stored. Each
prune also moves a horizon there, and no time at or before the horizon counts
any more, whether its row is gone yet or not; so the decision never depends
on how the rows were grouped, and only an event arriving later than a window
can miss a time (it then gets detail it could have gone without).

Readability rule: a file with a newer schema_version is refused with a clear
error (never half-read); an older one is migrated in place, in one
transaction (version 1 had a second index, on ``win(ts)``: it is dropped;
version 2 kept the first rule's events only and had no ``rules``).
A file that fails ``PRAGMA quick_check`` at start is moved aside and a fresh
one is created (power loss must not become a crash loop).

Durability: WAL with ``synchronous=NORMAL``. A committed transaction survives
a crash or SIGKILL of the agent (the promise); after a power loss the last
few transactions may roll back, which costs fewer events than an fsync per
read would cost on a busy server. ``[agent] durable = full`` is the way to
trade that speed for power-loss safety when it is ever needed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import msgpack

from agent.sensor import longpath
from agent.sensor.facts import FactsReader
from agent.shared import wire
from agent.shared.clock import Clock
from agent.shared.errors import StoreError
from agent.shared.events import Actor, FileEvent, FileFacts
from agent.shared.migrations import Migration, pending
from agent.shared.rule import Rule
from agent.shared.wire.encode import pack_batch

log = logging.getLogger("rarewrite.store")

SCHEMA_VERSION = 3
EVENT, COUNT, GAP, NOTE = 0, 1, 2, 3
BATCH_BYTES = 2 << 20  # stay well under the collector's body cap
RECENT_PAIRS = 4096  # pairs whose recent times are kept in memory (a few hundred KB)
# File facts are read this long after the event, not at it: FAN_CREATE comes
# before the writer has written anything, and a hash of the empty file would
# tell the analyst nothing. Rows waiting for their facts are not shipped yet.
FACTS_DELAY_MS = 1000
FACTS_PENDING_MAX = 20_000  # beyond this, new events simply carry no facts
CACHE_KIB = 2048  # SQLite page cache per connection: RSS stays bounded in a burst

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v);
CREATE TABLE IF NOT EXISTS win(pair BLOB NOT NULL, ts INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS win_pair_ts ON win(pair, ts);
CREATE TABLE IF NOT EXISTS outbox(id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind INTEGER NOT NULL, ts INTEGER NOT NULL, body BLOB NOT NULL, rules INTEGER);
CREATE TABLE IF NOT EXISTS lease(seq INTEGER PRIMARY KEY, batch_id TEXT NOT NULL,
    hi INTEGER NOT NULL, n INTEGER NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine(id INTEGER PRIMARY KEY, at INTEGER NOT NULL,
    reason TEXT NOT NULL, kind INTEGER NOT NULL, body BLOB NOT NULL);
"""


def _drop_win_ts(db: sqlite3.Connection) -> None:
    db.execute("DROP INDEX IF EXISTS win_ts")


def _add_rules(db: sqlite3.Connection) -> None:
    if "rules" not in [r[1] for r in db.execute("PRAGMA table_info(outbox)")]:
        db.execute("ALTER TABLE outbox ADD COLUMN rules INTEGER")


# The steps run in one transaction with the new version number.
MIGRATIONS: tuple[Migration[sqlite3.Connection], ...] = (
    Migration(2, "the hour pruned by rowid spans: no index on win(ts)", _drop_win_ts),
    Migration(3, "several rules: which ones each outbox row matched", _add_rules),
)

# Rows of win are pruned in spans of consecutive rowids (a few record() calls
# each), a span once its newest time has left the hour: win needs no index on
# ts. A span is cut when its times reach into the next 1/SPANS of the window.
SPANS = 64

# The map header with one more key, where the old header ends (1-based), the packed
# "file" pair; only an event map (kind 0) is filled.
_FILL_SQL = "UPDATE outbox SET body=CAST(? || substr(body, ?) || ? AS BLOB) WHERE id=? AND kind=0"
_COUNT_SQL = "SELECT count(*) FROM (SELECT 1 FROM win WHERE pair=? AND ts>? AND ts<=? LIMIT ?)"


def count_of(key: bytes) -> tuple[Optional[bytes], Optional[bytes], Optional[Actor]]:
    """The (exe, path, actor) of a count key (or of a bare pair key: no actor)."""
    got = msgpack.unpackb(key, raw=False)
    if len(got) == 2:
        return got[0], got[1], None
    return got[0], got[1], (got[2], got[3], got[4])


def count_key_of_map(e: dict[str, Any]) -> bytes:
    """The count key of an ``<event>`` map that loses its detail."""
    return bytes(
        msgpack.packb(
            [e.get("exe"), e.get("path"), e.get("pname"), e.get("uname"), e.get("uid")], use_bin_type=True
        )
    )


class Candidate(NamedTuple):
    """A detailed event as its enrichment needs it (the pending facts)."""

    host_path: bytes  # where the host reads the file
    ts_ms: int
    executable: Optional[bytes]
    path: Optional[bytes]  # as the event says (a container's path)
    process_name: Optional[str]
    stat: Optional[longpath.Stat] = None  # the file's lstat when its facts were read (None: not yet)


@dataclass(frozen=True)
class Lease:
    """The batch in flight: its bytes never change once it has a seq."""

    seq: int
    batch_id: str
    hi: int  # the highest outbox id it holds
    n: int  # records in it
    body: bytes


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT; whatever fails in between is rolled back
    and raised: an open transaction would keep the write lock, and every
    later write of the agent would wait for it and fail."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK") if db.in_transaction else None
        raise


def _is_full(e: sqlite3.Error) -> bool:
    return "full" in str(e).lower() or "disk i/o" in str(e).lower()


class AgentStore:
    """The rolling hour and the outbox. One writer (the sensor loop) and one
    shipper may use it from two threads; each gets its own connection."""

    def __init__(
        self,
        path: str,
        rule: Rule,
        clock: Clock,
        outbox_max: int = 2_000_000,
        facts: Optional[Callable[[bytes], Optional[FileFacts]]] = None,
        context: Optional[Callable[[Candidate], Optional[dict[str, Any]]]] = None,
    ) -> None:
        self.path = path
        self.rule = rule
        self.clock = clock
        self.outbox_max = outbox_max
        self.facts = facts
        self.context = context  # the enrichment of a detailed event, read with its facts
        self.host_id = ""  # the machine id, sent as host.id
        self._local = threading.local()
        self._lock = threading.Lock()  # serialises writers across threads
        self.counters = {"stored": 0, "detailed": 0, "dropped": 0, "quarantined": 0, "not_stored": 0}
        self._unstored: Optional[list[int]] = None  # [first ts, last ts, count] lost to a full disk
        self._writes_since_prune = 0
        self._last_store_error = -1e9
        # pair -> its newest count_below times in win (ascending): an exact
        # cache of the table for the pairs it holds, so the detail decision
        # needs no query per event. Bounded; a pair it dropped is read again.
        self._recent: OrderedDict[bytes, list[int]] = OrderedDict()
        self._recent_rule = (rule.window_ms, rule.count_below)  # what the cached times were chosen for
        # [last rowid, newest ts] of the rows of win, oldest first, and the
        # newest time in win (the prune keeps the hour before it).
        self._spans: deque[list[int]] = deque()
        self._newest: Optional[int] = None
        # Times at or before the horizon no longer count: every prune moves it
        # to the newest time minus the window (see record()).
        self._horizon = -(1 << 62)
        # rows awaiting facts: (outbox id, host path, due ms, keys in its event map, the event)
        self._pending: deque[tuple[int, bytes, int, int, Candidate]] = deque()
        self._depth = 0  # rows in the outbox: counted once at open, then kept here
        # One packer for the writer's keys and bodies (msgpack.packb builds a
        # new one per call); only used under self._lock.
        self._packer = msgpack.Packer(use_bin_type=True)
        self._events = wire.EventPacker()  # the event maps, same bytes as packing wire.event_map
        self._rule_bits: list[str] = []  # meta rule_bits: the rule of each mask bit (set_rules)
        self._bit_of: list[int] = []  # bit i of record()'s masks -> its bit in _rule_bits
        self._open()

    # -------------------------------------------------------------- opening

    def _open(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        reset_since: Optional[int] = None
        if os.path.exists(self.path):
            why = "corrupt" if not self._healthy() else self._foreign()
            if why:
                reset_since = self._move_aside(why)
        db = self._db()
        version = self._meta(db, "schema_version")
        if version is not None and int(version) > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {version} is newer than this agent's {SCHEMA_VERSION}; "
                "upgrade rarewrite or move the file away"
            )
        db.executescript("BEGIN;" + _SCHEMA + "COMMIT;")
        if version is not None and int(version) < SCHEMA_VERSION:
            db.execute("BEGIN IMMEDIATE")
            for m in pending(MIGRATIONS, int(version)):
                m.step(db)
            db.execute("UPDATE meta SET v=? WHERE k='schema_version'", (SCHEMA_VERSION,))
            db.execute("COMMIT")
            log.info("event=state_migrated path=%r from=%s to=%d", self.path, version, SCHEMA_VERSION)
        if version is None:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            db.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', ?)", (uuid.uuid4().hex,))
            db.execute("INSERT OR IGNORE INTO meta VALUES ('next_seq', 1)")
            db.execute("COMMIT")
        self._depth = int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])
        last, newest = db.execute("SELECT max(rowid), max(ts) FROM win").fetchone()
        if last is not None:  # one span for what an earlier run left: it goes a window after its newest
            self._spans.append([last, newest])
            self._newest = newest
            self._horizon = newest - self.rule.window_ms  # as if pruned now (the horizon is not saved)
        os.chmod(self.path, 0o600)
        if reset_since is not None:  # the collector must know what the old file may have held
            self.record_gap(reset_since, self.clock.now_ms(), 0, "state_reset")

    def _move_aside(self, why: str) -> int:
        """Move the unusable state file (and its WAL) aside; return where the
        state_reset gap starts: a window before the file's last change, since
        its outbox may have held events of that hour not yet shipped."""
        try:
            changed = int(os.stat(self.path).st_mtime * 1000)
        except OSError:
            changed = self.clock.now_ms()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.clock.now_ms() // 1000))
        aside = f"{self.path}.{why}-{stamp}"
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                os.replace(self.path + suffix, aside + suffix)
        log.error(
            "event=state_%s action=moved_aside path=%r aside=%r detail='a new state file is made; "
            "the collector is told with a state_reset gap'",
            why,
            self.path,
            aside,
        )
        return min(changed, self.clock.now_ms()) - self.rule.window_ms

    def _foreign(self) -> str:
        """ "foreign" when the file is SQLite but not an agent state file of a
        version this agent reads (its tables or columns are not ours), else ""."""
        want = {
            "meta": ["k", "v"],
            "win": ["pair", "ts"],
            "outbox": ["id", "kind", "ts", "body", "rules"],
            "lease": ["seq", "batch_id", "hi", "n", "body"],
            "quarantine": ["id", "at", "reason", "kind", "body"],
        }
        try:
            db = sqlite3.connect(self.path, timeout=10)
            try:
                tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
                if not tables:
                    return ""  # empty: made fresh below
                for t in tables:
                    cols = [r[1] for r in db.execute(f"PRAGMA table_info({t!r})")]
                    if t == "outbox" and cols == want[t][:4]:
                        continue  # version 2, migrated below
                    if want.get(t) != cols and not t.startswith("sqlite_"):
                        log.error("event=state_foreign table=%r columns=%r", t, cols)
                        return "foreign"
                version = (
                    db.execute("SELECT v FROM meta WHERE k='schema_version'").fetchone()
                    if "meta" in tables
                    else None
                )
                if version is None:
                    return "foreign"
            finally:
                db.close()
        except sqlite3.DatabaseError as e:
            log.error("event=state_check_failed path=%r error=%r", self.path, str(e))
            return "foreign"
        return ""

    def _healthy(self) -> bool:
        try:
            db = sqlite3.connect(self.path, timeout=10)
            try:
                ok = db.execute("PRAGMA quick_check").fetchone()
                return bool(ok and ok[0] == "ok")
            finally:
                db.close()
        except sqlite3.DatabaseError as e:
            log.error("event=state_check_failed path=%r error=%r", self.path, str(e))
            return False

    def _db(self) -> sqlite3.Connection:
        db: Optional[sqlite3.Connection] = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=True)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=30000")
            db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            db.execute("PRAGMA mmap_size=0")
            self._local.db = db
        return db

    @staticmethod
    def _meta(db: sqlite3.Connection, key: str) -> Any:
        try:
            row = db.execute("SELECT v FROM meta WHERE k=?", (key,)).fetchone()
        except sqlite3.OperationalError:
            return None
        return row[0] if row else None

    def progress(self, key: str) -> int:
        """A value saved by :meth:`record` (0 when never saved)."""
        value = self._meta(self._db(), key)
        return int(value) if value is not None else 0

    def set_rules(self, rule_ids: Sequence[str]) -> None:
        """The rules of the masks :meth:`record` gets from now on (bit i:
        ``rule_ids[i]``). Stored rows keep their meaning: each id has its bit
        in ``rule_bits`` for good, a new id takes the next free one."""
        db = self._db()
        with self._lock, _transaction(db):
            got = self._meta(db, "rule_bits")
            bits: list[str] = json.loads(got) if got else [self.rule.rule_id]
            bits.extend(i for i in rule_ids if i not in bits)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('rule_bits', ?)", (json.dumps(bits),))
        self._rule_bits = bits
        self._bit_of = [bits.index(i) for i in rule_ids]

    def _stored_masks(self, events: Sequence[FileEvent], masks: Optional[Sequence[int]]) -> Sequence[int]:
        """The masks of record() in ``rule_bits`` numbering."""
        if not self._rule_bits:
            self.set_rules([self.rule.rule_id])
        if masks is None:
            return [1 << self._rule_bits.index(self.rule.rule_id)] * len(events)
        bit_of = self._bit_of
        if all(b == i for i, b in enumerate(bit_of)):
            return masks
        out = []
        for m in masks:
            t = 0
            for i, b in enumerate(bit_of):
                if m >> i & 1:
                    t |= 1 << b
            out.append(t)
        return out

    @property
    def epoch(self) -> str:
        return str(self._meta(self._db(), "epoch"))

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -------------------------------------------------------------- recording

    def record(
        self,
        events: Sequence[FileEvent],
        progress: Optional[tuple[str, int]] = None,
        masks: Optional[Sequence[int]] = None,
    ) -> int:
        """Store matching events in one transaction; returns how many were
        detailed. ``masks`` says which rules each event matched (bit i:
        ``rules[i]`` of :meth:`set_rules`; None: the first rule alone).
        ``progress`` (key, value) is saved in the same transaction
        (replay resumes from it). On a full disk nothing is raised: the events
        are counted as not stored and a gap is written once space returns.

        The detail decision is exact and made in memory: for every pair of
        the batch the times already in ``win`` come from one query per chunk
        of pairs (or from the small LRU of recent pairs), then ``win`` and
        ``outbox`` get one executemany each, in event order. An event counts
        the times of its pair in (ts - window, ts], its own included, except
        those at or before the horizon of the last prune (the newest time
        then, minus the window): for events in time order that is all of
        them; only an event later than the window can miss a pruned time."""
        if not events and self._unstored is None and progress is None:
            return 0
        db = self._db()
        stored = self._stored_masks(events, masks)
        with self._lock:
            if self._recent_rule != (self.rule.window_ms, self.rule.count_below):
                self._recent.clear()  # a reload changed the rule: cached times were chosen for the old one
                self._recent_rule = (self.rule.window_ms, self.rule.count_below)
            try:
                detailed = self._record_tx(db, events, progress, stored)
            except sqlite3.Error as e:
                self._abandon(db)
                if not _is_full(e) and not isinstance(e, sqlite3.OperationalError):
                    raise StoreError(f"{self.path}: {e}") from e
                self._note_unstored(events, e)
                return 0
            except BaseException:
                # Anything else (an unpackable value, a signal): leave no open
                # transaction and no cached time of the batch behind.
                self._abandon(db)
                raise
            while len(self._recent) > RECENT_PAIRS:
                self._recent.popitem(last=False)
        self.counters["stored"] += len(events)
        self.counters["detailed"] += detailed
        self._writes_since_prune += len(events)
        if self._writes_since_prune >= 5000:
            self._writes_since_prune = 0
            self.maintain()
        return detailed

    def _abandon(self, db: sqlite3.Connection) -> None:
        """Roll back a failed record(); the recent times may hold the batch's."""
        if db.in_transaction:
            db.execute("ROLLBACK")
        self._recent.clear()

    def _record_tx(
        self,
        db: sqlite3.Connection,
        events: Sequence[FileEvent],
        progress: Optional[tuple[str, int]],
        masks: Sequence[int],
    ) -> int:
        """record()'s transaction: the rows, the facts they wait for, the
        progress; then, committed, what memory keeps of them."""
        window = self.rule.window_ms
        db.execute("BEGIN IMMEDIATE")
        gaps = self._flush_unstored(db)
        pack = self._packer.pack  # pair_key(), with the writer's one packer
        keys = [pack([ev.process.executable or None, ev.path or None]) for ev in events]
        oldest = min((ev.ts_ms for ev in events), default=0)
        self._load_recent(db, keys, max(oldest - window, self._horizon))
        out_rows, wants_facts, detailed = self._decide(db, events, keys, masks)
        db.executemany("INSERT INTO outbox(kind, ts, body, rules) VALUES (?, ?, ?, ?)", out_rows)
        # One transaction holds the write lock: the new rowids of win and ids
        # of outbox are contiguous.
        last_win = db.execute("SELECT max(rowid) FROM win").fetchone()[0] if events else None
        new_pending = self._facts_due(db, wants_facts, len(out_rows)) if wants_facts else []
        if progress is not None:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", progress)
        db.execute("COMMIT")
        self._depth += len(out_rows) + gaps
        if gaps:
            self._unstored = None
        self._pending.extend(new_pending)
        if last_win is not None:
            self._add_span(last_win, max(ev.ts_ms for ev in events), window)
        return detailed

    def _decide(
        self, db: sqlite3.Connection, events: Sequence[FileEvent], keys: list[bytes], masks: Sequence[int]
    ) -> tuple[list[tuple[int, int, bytes, int]], list[tuple[int, bytes, int, Candidate]], int]:
        """The detail decision for each event, in order; ``win`` gets the
        times. Returns the outbox rows, (row index, path, map keys, ts) of
        those that wait for facts, and how many are detailed."""
        recent, pack_event, horizon = self._recent, self._events.pack, self._horizon
        pack_count = self._packer.pack
        window, below = self.rule.window_ms, self.rule.count_below
        with_facts = self._reads_files and len(self._pending) < FACTS_PENDING_MAX
        win_rows: list[tuple[bytes, int]] = []
        out_rows: list[tuple[int, int, bytes, int]] = []
        wants_facts: list[tuple[int, bytes, int, Candidate]] = []
        detailed = 0
        for ev, key, mask in zip(events, keys, masks):
            ts = ev.ts_ms
            lo = max(ts - window, horizon)
            times = recent[key]
            win_rows.append((key, ts))
            if times and ts < times[-1]:  # out of time order: ask the table (exact)
                db.executemany("INSERT INTO win VALUES (?, ?)", win_rows)
                win_rows = []
                n = db.execute(_COUNT_SQL, (key, lo, ts, below)).fetchone()[0]
                times.append(ts)
                times.sort()
            else:
                times.append(ts)
                n = 0
                for t in reversed(times):  # the newest `below` times decide
                    if t <= lo or n >= below:
                        break
                    n += 1
            if len(times) > below:
                del times[: len(times) - below]
            if n < below:
                body, n_keys = pack_event(ev)
                if with_facts and ev.path:
                    host_path = ev.host_path or ev.path  # the facts are read on the host side
                    cand = Candidate(host_path, ts, ev.process.executable, ev.path, ev.process.name)
                    wants_facts.append((len(out_rows), host_path, n_keys, cand))
                out_rows.append((EVENT, ts, body, mask))
                detailed += 1
            else:
                p, u = ev.process, ev.user
                out_rows.append(
                    (
                        COUNT,
                        ts,
                        pack_count([ev.process.executable or None, ev.path or None, p.name, u.name, u.id]),
                        mask,
                    )
                )
        if win_rows:
            win_rows.sort()  # in key order: the index takes them page by page, not all over
            db.executemany("INSERT INTO win VALUES (?, ?)", win_rows)
        return out_rows, wants_facts, detailed

    def _facts_due(
        self, db: sqlite3.Connection, wants_facts: list[tuple[int, bytes, int, Candidate]], n_rows: int
    ) -> list[tuple[int, bytes, int, int, Candidate]]:
        """(outbox id, path, due ms, map keys) for the new rows that wait for
        facts: FACTS_DELAY_MS after the write, not after this call (a burst
        stored late has its facts read at once, so the queue of pending rows
        stays short); in order."""
        first = db.execute("SELECT max(id) FROM outbox").fetchone()[0] - n_rows + 1
        latest = self.clock.now_ms() + FACTS_DELAY_MS
        due = self._pending[-1][2] if self._pending else 0
        out = []
        for i, path, n_keys, cand in wants_facts:
            due = min(latest, max(due, cand.ts_ms + FACTS_DELAY_MS))
            out.append((first + i, path, due, n_keys, cand))
        return out

    def _facts_of(self, path: bytes, st: longpath.Stat) -> Optional[FileFacts]:
        """The facts of one file from its lstat (a reader that takes none reads its own)."""
        if self.facts is None:
            return None
        return self.facts(path, st) if isinstance(self.facts, FactsReader) else self.facts(path)

    def _context_of(self, cand: Candidate) -> Optional[dict[str, Any]]:
        """The enrichment of one event; what fails in it costs the event its
        context only (it is evidence, not the record)."""
        if self.context is None:
            return None
        try:
            return self.context(cand)
        except Exception as e:  # noqa: BLE001 - a bug or odd input in enrichment must not stop the sensor
            self.counters["context_errors"] = self.counters.get("context_errors", 0) + 1
            log.warning("event=enrichment_failed path=%r error=%r", cand.host_path[:200], repr(e)[:300])
            return None

    def _packed_ctx(self, ctx: Optional[dict[str, Any]]) -> bytes:
        if not ctx:
            return b""
        try:
            return bytes(self._packer.pack("ctx") + self._packer.pack(ctx))
        except (TypeError, ValueError, OverflowError) as e:  # a text that cannot be UTF-8, an odd value
            self._packer.reset()
            log.warning("event=enrichment_not_packed error=%r", repr(e)[:300])
            return b""

    @property
    def _reads_files(self) -> bool:
        return self.facts is not None or self.context is not None

    def fill_facts(self, now_ms: Optional[int] = None, limit: int = 2000) -> int:
        """Read the facts of events whose delay has passed and put them into
        their (not yet shipped) outbox rows; returns how many were filled.
        One caller at a time (the sensor loop).

        The ``file`` map goes last into the stored event map without decoding
        it: the map header gets one more key (the row's key count was noted
        when it was recorded) and the packed ``"file"`` pair is appended, in
        one UPDATE statement for all the rows, the same bytes as unpacking,
        adding the key and packing again. The rows stay pending (so no lease
        takes them) until their facts are committed."""
        if not self._pending or not self._reads_files:
            return 0
        now = self.clock.now_ms() if now_ms is None else now_ms
        with self._lock:
            due = list(itertools.takewhile(lambda p: p[2] <= now, itertools.islice(self._pending, limit)))
        if not due:
            return 0
        # file reads outside the lock; one lstat a file, for its facts and its context alike
        stats = [longpath.lstat_or_error(path) for _, path, _, _, _ in due]
        facts = [self._facts_of(path, st) for (_, path, _, _, _), st in zip(due, stats)]
        contexts = [self._context_of(cand._replace(stat=st)) for (_, _, _, _, cand), st in zip(due, stats)]
        db = self._db()
        filled = 0
        with self._lock:
            packer = self._packer
            rows = []
            for (rid, _, _, keys, _), f, ctx in zip(due, facts, contexts):
                added = b"" if f is None else packer.pack("file") + packer.pack(wire.facts_map(f))
                packed_ctx = self._packed_ctx(ctx)
                if added or packed_ctx:
                    n = keys + (f is not None) + bool(packed_ctx)
                    rows.append((packer.pack_map_header(n), 2 if keys < 16 else 4, added + packed_ctx, rid))
            try:
                if rows:
                    db.execute("BEGIN IMMEDIATE")
                    # kind=0: a row the outbox bound (or a quarantine) made a
                    # bare count time meanwhile has no map to fill any more.
                    filled = db.executemany(_FILL_SQL, rows).rowcount
                    db.execute("COMMIT")
            except sqlite3.Error as e:
                db.execute("ROLLBACK") if db.in_transaction else None
                log.warning("event=facts_not_stored error=%r", str(e))
                filled = 0  # the rows go on without their facts
            for _ in due:  # only this method takes from the left; record() appends on the right
                self._pending.popleft()
        return int(filled)

    def _load_recent(self, db: sqlite3.Connection, keys: list[bytes], since: int) -> None:
        """Make ``self._recent`` hold, for every pair in ``keys``, its newest
        ``count_below`` times in ``win`` after ``since`` (the pairs it lacks
        are read from the table, 500 to a query)."""
        recent = self._recent
        missing = []
        for key in dict.fromkeys(keys):
            if key in recent:
                recent.move_to_end(key)
            else:
                missing.append(key)
        for i in range(0, len(missing), 500):
            chunk = missing[i : i + 500]
            found: dict[bytes, list[int]] = {k: [] for k in chunk}
            marks = ",".join("?" * len(chunk))
            for key, ts in db.execute(
                f"SELECT pair, ts FROM win WHERE pair IN ({marks}) AND ts > ? ORDER BY ts",  # noqa: S608 - only ? marks
                (*chunk, since),
            ):
                found[key].append(ts)
            below = self.rule.count_below
            for key, times in found.items():
                recent[key] = times[-below:] if len(times) > below else times

    def _note_unstored(self, events: Sequence[FileEvent], e: sqlite3.Error) -> None:
        self.counters["not_stored"] += len(events)
        if events:
            lo, hi = min(ev.ts_ms for ev in events), max(ev.ts_ms for ev in events)
            if self._unstored is None:
                self._unstored = [lo, hi, len(events)]
            else:
                u = self._unstored
                self._unstored = [min(u[0], lo), max(u[1], hi), u[2] + len(events)]
        now = self.clock.monotonic()
        if now - self._last_store_error >= 10.0:  # one line per 10 s, however busy the host
            self._last_store_error = now
            log.error("event=store_failed error=%r not_stored_total=%d", str(e), self.counters["not_stored"])

    def _flush_unstored(self, db: sqlite3.Connection) -> int:
        """The gap of what a full disk cost, if any; returns the rows written.
        The caller forgets the loss only once its transaction is committed."""
        if self._unstored is None:
            return 0
        lo, hi, n = self._unstored
        self._insert_gap(db, lo, hi, n, "disk_full")
        return 1

    def reported(self, exe: Optional[bytes], path: Optional[bytes]) -> bool:
        """Whether this agent has an event of (exe, path) in its window."""
        key = msgpack.packb([exe or None, path or None], use_bin_type=True)
        return self._db().execute("SELECT 1 FROM win WHERE pair=? LIMIT 1", (key,)).fetchone() is not None

    notes_ok = False  # the collector said it takes notes (an older one refuses a batch of notes alone)

    def add_notes(self, notes: Sequence[dict[str, Any]]) -> None:
        """Queue ``<note>`` maps (wire.context) for the collector. A note that
        cannot be stored or packed, or that a collector would not take, is
        dropped with a warning: it is enrichment, the events it is about are
        stored already."""
        if not notes:
            return
        if not self.notes_ok:
            self.counters["notes_dropped"] = self.counters.get("notes_dropped", 0) + len(notes)
            return
        db = self._db()
        now = self.clock.now_ms()
        rows = []
        for n in notes:
            try:
                rows.append((NOTE, now, msgpack.packb(n, use_bin_type=True), None))
            except (TypeError, ValueError, OverflowError) as e:
                log.warning("event=note_not_packed error=%r", repr(e)[:300])
        with self._lock:
            try:
                with _transaction(db):
                    db.executemany("INSERT INTO outbox(kind, ts, body, rules) VALUES (?, ?, ?, ?)", rows)
            except sqlite3.Error as e:
                log.warning("event=notes_not_stored notes=%d error=%r", len(rows), str(e))
                return
            self._depth += len(rows)

    def record_gap(self, start_ms: int, end_ms: int, lost: int, reason: str) -> None:
        """A span in which events were lost (kernel overflow, full disk...)."""
        db = self._db()
        with self._lock:
            try:
                db.execute("BEGIN IMMEDIATE")
                self._insert_gap(db, start_ms, end_ms, lost, reason)
                db.execute("COMMIT")
                self._depth += 1
            except sqlite3.Error as e:
                db.execute("ROLLBACK") if db.in_transaction else None
                log.error("event=gap_not_stored reason=%s error=%r", reason, str(e))

    @staticmethod
    def _insert_gap(db: sqlite3.Connection, start: int, end: int, lost: int, reason: str) -> None:
        body = msgpack.packb({"start": start, "end": end, "lost": lost, "reason": reason})
        db.execute("INSERT INTO outbox(kind, ts, body) VALUES (2, ?, ?)", (start, body))

    def _add_span(self, last: int, newest: int, window: int) -> None:
        """The rows of win up to rowid ``last`` (newest time ``newest``) were committed."""
        spans = self._spans
        step = max(1, window // SPANS)
        if spans and (newest <= spans[-1][1] or newest // step == spans[-1][1] // step):
            spans[-1] = [last, max(newest, spans[-1][1])]
        else:
            spans.append([last, newest])
        if self._newest is None or newest > self._newest:
            self._newest = newest

    def release_memory(self) -> None:
        """Drop what memory holds only to go faster, called from the writer's
        thread when the agent falls idle after a burst: the recent pairs'
        times (read again from ``win`` when needed) and the writer's SQLite
        connection itself, with its page cache and its prepared statements
        (a burst's lookups of new pairs prepare one per chunk size: SQLite's
        own memory, which ``PRAGMA shrink_memory`` keeps). The next use
        connects again."""
        with self._lock:
            self._recent.clear()
            db: Optional[sqlite3.Connection] = getattr(self._local, "db", None)
            if db is None or db.in_transaction:
                self.shrink_connection()
                return
            try:
                db.close()
            except sqlite3.Error:
                pass
            self._local.db = None

    def shrink_connection(self) -> None:
        """Free the calling thread's SQLite page cache (each thread has its
        own connection: the shipper calls this once the outbox is empty)."""
        try:
            self._db().execute("PRAGMA shrink_memory")
        except sqlite3.Error:
            pass

    def maintain(self) -> None:
        """Prune the rolling hour and enforce the outbox bound."""
        db = self._db()
        with self._lock:
            try:
                if self._newest is not None:
                    # From now on no time at or before the horizon counts, so
                    # the rows that hold only such times can go: whole spans,
                    # a range of rowids (rows come in roughly in time order).
                    self._horizon = max(self._horizon, self._newest - self.rule.window_ms)
                    spans, gone = self._spans, 0
                    while gone < len(spans) and spans[gone][1] <= self._horizon:
                        gone += 1
                    if gone:
                        db.execute("DELETE FROM win WHERE rowid <= ?", (spans[gone - 1][0],))
                        for _ in range(gone):
                            spans.popleft()
                self._bound_outbox(db)
            except sqlite3.Error as e:
                db.execute("ROLLBACK") if db.in_transaction else None  # never leave the bound half-done
                log.error("event=maintain_failed error=%r", str(e))

    def _bound_outbox(self, db: sqlite3.Connection) -> None:
        over = self._depth - self.outbox_max
        if over <= 0:
            return
        hi = db.execute("SELECT coalesce(max(hi), 0) FROM lease").fetchone()[0]
        db.execute("BEGIN IMMEDIATE")
        # First the oldest detail goes: an event becomes a bare count time,
        # which keeps cc and agent_count exact. Only then do times go.
        rows = db.execute(
            "SELECT id, body FROM outbox WHERE kind=0 AND id>? ORDER BY id LIMIT ?", (hi, over)
        ).fetchall()
        for rid, body in rows:
            e = msgpack.unpackb(body, raw=False)
            db.execute("UPDATE outbox SET kind=1, body=? WHERE id=?", (count_key_of_map(e), rid))
        # Bytes shrink but rows do not: drop the oldest times and say so.
        old = db.execute(
            "SELECT min(ts), max(ts), count(*) FROM (SELECT ts FROM outbox WHERE kind=1 AND id>? "
            "ORDER BY id LIMIT ?)",
            (hi, over),
        ).fetchone()
        if old[2]:
            db.execute(
                "DELETE FROM outbox WHERE id IN "
                "(SELECT id FROM outbox WHERE kind=1 AND id>? ORDER BY id LIMIT ?)",
                (hi, over),
            )
            self._insert_gap(db, old[0], old[1], old[2], "outbox_full")
            self.counters["dropped"] += old[2]
            log.warning("event=outbox_full dropped=%d dropped_total=%d", old[2], self.counters["dropped"])
        db.execute("COMMIT")
        if old[2]:
            self._depth += 1 - old[2]

    # -------------------------------------------------------------- shipping

    def depth(self) -> int:
        """Rows in the outbox (kept in memory: a count(*) reads the whole table)."""
        return self._depth

    def lease(self, agent_id: str, host_name: str, max_records: int) -> Optional[Lease]:
        """The batch in flight, or a new one from the oldest outbox rows."""
        db = self._db()
        row = db.execute("SELECT seq, batch_id, hi, n, body FROM lease").fetchone()
        if row:
            return Lease(*row)
        with self._lock:
            waiting = self._pending[0][0] if self._pending and self._reads_files else None
            rows = db.execute(
                "SELECT id, kind, ts, body, rules FROM outbox WHERE id < ? ORDER BY id LIMIT ?",
                (waiting if waiting is not None else 1 << 62, max_records),
            ).fetchall()
            if not rows:
                return None
            events: list[bytes] = []  # stored msgpack maps, spliced in as they are
            event_rules: list[int] = []
            times: dict[tuple[bytes, int], list[int]] = {}
            gaps: list[bytes] = []
            notes: list[bytes] = []
            size, hi = 0, 0
            for rid, kind, ts, body, rules in rows:
                if size + len(body) + 16 > BATCH_BYTES and hi:
                    break
                size += len(body) + 16
                hi = rid
                if kind == EVENT:
                    events.append(body)
                    event_rules.append(1 if rules is None else rules)
                elif kind == COUNT:
                    times.setdefault((body, 1 if rules is None else rules), []).append(ts)
                elif kind == NOTE:
                    notes.append(body)
                else:
                    gaps.append(body)
            seq = int(self._meta(db, "next_seq"))
            batch_id = uuid.uuid4().hex
            head: dict[str, Any] = {
                "v": wire.VERSION,
                "batch_id": batch_id,
                "epoch": self.epoch,
                "seq": seq,
                "agent_id": agent_id,
                "host_name": host_name,
                "sent_at": self.clock.now_ms(),
            }
            counts = [(count_of(k), t) for (k, _), t in times.items()]
            head["counts"] = [[exe, path, wire.encode_times(t)] for (exe, path, _), t in counts]
            if any(actor is not None for (_, _, actor), _ in counts):
                head["actors"] = [None if actor is None else list(actor) for (_, _, actor), _ in counts]
            self._rule_head(db, head, event_rules, [r for _, r in times])
            n = len(events) + sum(len(t) for t in times.values()) + len(gaps) + len(notes)
            body = pack_batch(head, events, gaps, notes)
            db.execute("INSERT INTO lease VALUES (?, ?, ?, ?, ?)", (seq, batch_id, hi, n, body))
            return Lease(seq, batch_id, hi, n, body)

    def _rule_head(
        self, db: sqlite3.Connection, head: dict[str, Any], event_rules: list[int], count_rules: list[int]
    ) -> None:
        """The batch's rule fields (wire.format): which rules each record matched."""
        got = self._meta(db, "rule_bits")
        head["rules"] = json.loads(got) if got else [self.rule.rule_id]
        head["erules"] = event_rules
        head["crules"] = count_rules
        if self.host_id:
            head["host_id"] = self.host_id

    def ack(self, lease: Lease) -> None:
        """The collector committed the batch: it leaves the outbox."""
        db = self._db()
        with self._lock, _transaction(db):
            # Only the lease still in flight may be acked: a late answer for a
            # batch acked already must not move the sequence back (the next
            # batch would then be taken for a duplicate and lost).
            gone = db.execute(
                "DELETE FROM lease WHERE seq=? AND batch_id=?", (lease.seq, lease.batch_id)
            ).rowcount
            removed = 0
            if gone:
                removed = db.execute("DELETE FROM outbox WHERE id <= ?", (lease.hi,)).rowcount
                db.execute(
                    "UPDATE meta SET v=max(CAST(v AS INTEGER), ?) WHERE k='next_seq'", (lease.seq + 1,)
                )
        self._depth -= removed

    def new_epoch(self, lease: Lease, reason: str) -> str:
        """The collector holds this epoch's seq from another batch (409: a
        restored snapshot or state dir numbered it again): drop the lease
        (nothing of it was stored) and go on under a new epoch from seq 1;
        the lease's rows go again in the next batch. Returns the new epoch."""
        db = self._db()
        epoch = uuid.uuid4().hex
        with self._lock, _transaction(db):
            db.execute("DELETE FROM lease WHERE seq=? AND batch_id=?", (lease.seq, lease.batch_id))
            db.execute("UPDATE meta SET v=? WHERE k='epoch'", (epoch,))
            db.execute("UPDATE meta SET v=1 WHERE k='next_seq'")
        log.warning("event=epoch_reset seq=%d new_epoch=%s reason=%r", lease.seq, epoch, reason[:200])
        return epoch

    def split(self, lease: Lease, reason: str) -> None:
        """The collector refused the batch as a whole (400/413): nothing of it
        was stored, so it may be re-formed. Halve it; a single refused record
        goes to quarantine (kept on disk, counted), never retried as is."""
        db = self._db()
        with self._lock, _transaction(db):
            db.execute("DELETE FROM lease WHERE seq=?", (lease.seq,))
            ids = [r[0] for r in db.execute("SELECT id FROM outbox WHERE id<=? ORDER BY id", (lease.hi,))]
            change = self._quarantine(db, lease.hi, reason) if len(ids) <= 1 else 0
        self._depth += change
        self._split_hint = len(ids) // 2 if len(ids) > 1 else 0

    def _quarantine(self, db: sqlite3.Connection, hi: int, reason: str) -> int:
        """Keep the refused record on disk. An event loses only its detail:
        it goes on as a bare count time, so cc stays exact; a refused time
        becomes a gap, so the collector knows this host lost an event.
        Returns the change in outbox rows."""
        row = db.execute(
            "SELECT id, kind, ts, body FROM outbox WHERE id<=? ORDER BY id LIMIT 1", (hi,)
        ).fetchone()
        if row is None:
            return 0
        rid, kind, ts, body = row
        db.execute(
            "INSERT INTO quarantine(at, reason, kind, body) VALUES (?, ?, ?, ?)",
            (self.clock.now_ms(), reason[:500], kind, body),
        )
        self.counters["quarantined"] += 1
        if kind == EVENT:
            e = msgpack.unpackb(body, raw=False)
            db.execute("UPDATE outbox SET kind=1, body=? WHERE id=?", (count_key_of_map(e), rid))
            change = 0
        else:
            db.execute("DELETE FROM outbox WHERE id=?", (rid,))
            change = -1
            if kind == COUNT:
                self._insert_gap(db, ts, ts, 1, "quarantined")
                change = 0
        log.error(
            "event=record_quarantined kind=%d reason=%r quarantined_total=%d",
            kind,
            reason[:200],
            self.counters["quarantined"],
        )
        return change

    _split_hint = 0

    def next_batch_limit(self, default: int) -> int:
        """After a split, the next batch is at most half the refused one."""
        hint, self._split_hint = self._split_hint, 0
        return min(default, hint) if hint else default

    def quarantined(self) -> int:
        return int(self._db().execute("SELECT count(*) FROM quarantine").fetchone()[0])
