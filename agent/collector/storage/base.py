"""What every collector store is: the Store protocol and the records it
hands out, whatever the database."""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import msgpack

from agent.collector.storage import notes, ticks
from agent.collector.terms import Candidate, Run, new_candidates
from agent.shared import wire
from agent.shared.events import Actor
from agent.shared.exceptions import NO_ACTOR
from agent.shared.rule import Row, Rule

log = logging.getLogger("rarewrite.collector.store")

Pair = tuple[Optional[bytes], Optional[bytes]]
# An alert as stored: (alert id, pair, T, first event time, document JSON, suppression key or None)
AlertItem = tuple[str, Pair, int, int, str, Optional[bytes]]
PRUNE_CHUNK = 5000  # Store.prune deletes up to this many events per chunk: fewer means done


@dataclass(frozen=True)
class AgentRecord:
    agent_id: str
    host_name: str
    revoked: bool
    ref: int = 0
    host_ref: int = 0
    enrolled_ms: int = 0
    last_seen_ms: Optional[int] = None
    health: Optional[str] = None  # the last heartbeat's health, JSON


# What Store.enroll answers: a new agent, a key replaced (with the current
# key as proof, an admin's reset or a token bound to the id), or refused:
# the id is another agent's ("taken"), revoked, or the token is not valid.
EnrollStatus = str
ENROLL_NEW, ENROLL_REKEYED = "new", "rekeyed"
ENROLL_TAKEN, ENROLL_REVOKED, ENROLL_BAD_TOKEN = "taken", "revoked", "bad_token"
RESET_PREFIX = "restored:"  # agents.key_hash after an admin's reset: no key has it
TOKENS_SQL = "SELECT token_id, agent_id, uses_left, expires_ms, created_ms, comment FROM enroll_tokens"


@dataclass(frozen=True)
class EnrollToken:
    """A per-host enrollment token as stored (only its hash is kept)."""

    token_id: str
    agent_id: Optional[str]  # None: any id that is not enrolled yet
    uses_left: int
    expires_ms: int
    created_ms: int
    comment: str = ""


def enroll_decision(
    current: Optional[tuple[str, bool]], proof_hash: Optional[str], token_agent: Optional[str], agent_id: str
) -> EnrollStatus:
    """May ``agent_id`` get a new key? ``current`` is its (key_hash, revoked)
    if it is enrolled. A secret (the fleet's or a token) enrolls a new id;
    replacing the key of an enrolled one needs more: its current key, an
    admin's reset, or a token an admin bound to that very id."""
    if current is None:
        return ENROLL_NEW
    key, revoked = current
    if revoked:
        return ENROLL_REVOKED
    if key.startswith(RESET_PREFIX) or token_agent == agent_id:
        return ENROLL_REKEYED
    if proof_hash is not None and hmac.compare_digest(proof_hash.encode(), key.encode()):
        return ENROLL_REKEYED
    return ENROLL_TAKEN


def token_usable(token: Optional[EnrollToken], agent_id: str, now_ms: int) -> bool:
    return (
        token is not None
        and token.uses_left > 0
        and now_ms < token.expires_ms
        and token.agent_id in (None, agent_id)
    )


@dataclass(frozen=True)
class GapRow:
    agent_id: str
    start_ms: int
    end_ms: int
    lost: int
    reason: str


@dataclass(frozen=True)
class StoredEvent:
    """One stored event of a pair, for alert enrichment."""

    ts: int
    agent_id: str
    host_name: str
    detail: Optional[dict[str, Any]]  # None for an event sent as a count time
    actor: Actor = NO_ACTOR  # (process.name, user.name, user.id), known for count times too


@dataclass(frozen=True)
class WindowEvent:
    """One event of a pair in a window, as exceptions need it."""

    pair: int  # the pair's ref
    ts: int
    agent_id: str
    host_name: str
    actor: Actor


# A pair as exceptions need it: (ref, exe, path); plain tuples, as the
# database hands them out (every pair of the window, every tick).
PairRef = tuple[int, Optional[bytes], Optional[bytes]]


@dataclass(frozen=True)
class TermHit:
    """A new event of a new-terms rule (see agent.collector.terms)."""

    ts: int
    received_ms: int
    agent_id: str
    host_name: str
    host_id: str
    exe: Optional[bytes]
    path: Optional[bytes]
    detail: Optional[dict[str, Any]]  # None for a count time
    actor: Actor


@dataclass(frozen=True)
class RankedRow:
    """A rule row plus the first event time of its pair in the window."""

    row: Row
    first_ts: int


class Store(Protocol):
    """What the server and the evaluator need: SQLite (:class:`CollectorStore`)
    or PostgreSQL (:class:`agent.collector.storage.postgres.PgStore`); see :func:`open_store`."""

    path: str

    def enroll(
        self,
        agent_id: str,
        host_name: str,
        key_hash: str,
        now_ms: int,
        proof_hash: Optional[str] = None,
        token_hash: Optional[str] = None,
    ) -> EnrollStatus: ...
    def heartbeats(self, beats: Sequence[tuple[int, int, str]]) -> None: ...
    def add_token(self, token_hash: str, token: EnrollToken) -> None: ...
    def list_tokens(self) -> list[EnrollToken]: ...
    def revoke_token(self, token_id: str) -> bool: ...
    def agent_for_key(self, key_hash: str) -> Optional[AgentRecord]: ...
    def revoke(self, agent_id: str) -> bool: ...
    def restore(self, agent_id: str) -> bool: ...
    def list_agents(self) -> list[AgentRecord]: ...
    def ingest(
        self,
        agent: AgentRecord,
        batch: wire.Batch | wire.RowBatch,
        now_ms: int,
        terms: Sequence[Candidate] = (),
    ) -> str: ...
    def term_hits(
        self, rule_id: str, lo_ms: int, hi_ms: int, by_received: bool = False, on_hosts: int = 0
    ) -> list[TermHit]: ...
    def prune_terms(self, rule_id: str, before_ms: int) -> int: ...
    def rows(self, rule: Rule, at_ms: int) -> list[Row]: ...
    def ranked_rows(self, rule: Rule, at_ms: int, skip: Collection[int] = ()) -> list[RankedRow]: ...
    def ranked_among(self, rule: Rule, at_ms: int, refs: Collection[int]) -> list[RankedRow]: ...
    def change_mark(self) -> int: ...
    def tick_candidates(
        self, rule_id: str, state: ticks.TickState, at_ms: int, window_ms: int, settle_ms: int
    ) -> set[int]: ...
    def pair_refs(self, refs: Collection[int]) -> list[PairRef]: ...
    def alerted_among(self, rule_id: str, since_ms: int, pairs: Collection[Pair]) -> set[Pair]: ...
    def tick_state(self, rule_id: str) -> Optional[ticks.TickState]: ...
    def save_tick(self, rule_id: str, state: ticks.TickState) -> None: ...
    def pair_events(self, pair: Pair, lo_ms: int, hi_ms: int, limit: int) -> list[StoredEvent]: ...
    def pairs_since(self, lo_ms: int) -> list[PairRef]: ...
    def window_events(self, refs: Sequence[int], lo_ms: int, hi_ms: int) -> list[WindowEvent]: ...
    def gaps_overlapping(self, start_ms: int, end_ms: int) -> list[GapRow]: ...
    def notes_for(self, pair: Pair, lo_ms: int, hi_ms: int) -> list[notes.Note]: ...
    def alerts_about(self, pair: Pair, event_ts: int) -> list[tuple[str, str, str]]: ...
    def queue_actions(self, rows: Sequence[notes.ActionRow]) -> None: ...
    def pending_actions(self, agent_ref: int) -> list[notes.Action]: ...
    def record_alerts(self, rule_id: str, alerts: Sequence[AlertItem]) -> list[str]: ...
    def suppression_parent(self, rule_id: str, skey: bytes, since_ms: int) -> Optional[tuple[str, str]]: ...
    def fold_alert(self, rule_id: str, item: AlertItem, parent_id: str, parent_doc: str) -> bool: ...
    def suppressed_due(self, rule_id: str, before_ms: int) -> list[tuple[str, str]]: ...
    def mark_emitted(self, alert_ids: Sequence[str], now_ms: int) -> None: ...
    def alerted_pairs(self, rule_id: str, since_ms: int) -> set[Pair]: ...
    def list_alerts(self, since_ms: int) -> list[dict[str, Any]]: ...
    def prune(self, before_ms: int, max_chunks: Optional[int] = None) -> int: ...
    def counts(self) -> dict[str, Any]: ...
    def check(self) -> None: ...
    def read(self) -> contextlib.AbstractContextManager[None]: ...
    def schedule_run(
        self, rule_id: str, kind: str, at_ms: int
    ) -> contextlib.AbstractContextManager[bool]: ...
    def close(self) -> None: ...


# ------------------------------------------------------ ingest, shared by the stores


def can_have_rows(rule: Rule) -> bool:
    """Can the rule have a row at all? (a row has max(1, agent_count) events at least)"""
    return rule.agent_count >= 1 and max(1, rule.agent_count) < rule.count_below and rule.limit > 0


def order_key(exe: Optional[bytes], path: Optional[bytes]) -> bytes:
    """``pairs.key`` of (exe, path): one byte string per pair whose bytewise
    order (SQLite compares BLOBs with memcmp, the shorter first on a tie) is
    the order of ``ORDER BY exe, path``: NULL first, then the bytes.

    Each part is ``00`` for NULL, else ``01``, the bytes with every ``00``
    written ``00 FF``, and a ``00`` terminator; a part is never a prefix of
    another one, so the two concatenate without changing the order."""
    return _order_part(exe) + _order_part(path)


def _order_part(b: Optional[bytes]) -> bytes:
    if b is None:
        return b"\x00"
    return b"\x01" + b.replace(b"\x00", b"\x00\xff") + b"\x00"


# A row of the events table: (ts, pair ref, agent ref, host ref, detail or None, actor ref or None).
EventRow = tuple[int, int, int, int, Optional[bytes], Optional[int]]
# What the stores keep of an agent's epoch: (last seq, sent_at of that batch).
EpochState = Optional[tuple[int, int]]


def is_replayed(epoch: EpochState, seq: int) -> bool:
    """The sequence rule: a batch whose seq is not past the last one stored
    of its epoch is not stored. The same batch id again is a duplicate (a
    resend); a new batch id is a conflict (a restored snapshot or state dir
    reused the numbers): answered 409, so the agent starts a new epoch and
    nothing is acknowledged that was not stored."""
    return epoch is not None and seq <= epoch[0]


def possible_loss(agent: AgentRecord, epoch: EpochState, batch: wire.RowBatch) -> Optional[tuple[int, int]]:
    """(start, end) of the "possible_loss" gap a batch opens when its seq
    skips batches of its epoch (the first seq of an epoch is 1), else None."""
    last = epoch[0] if epoch is not None else 0
    if batch.seq <= last + 1:
        return None
    start = epoch[1] if epoch is not None else min([*batch.times(), batch.sent_at])
    log.warning(
        "event=seq_gap agent_id=%r epoch=%s missing_batches=%d",
        agent.agent_id,
        batch.epoch,
        batch.seq - 1 - last,
    )
    return (min(start, batch.sent_at), batch.sent_at)


def newest_per_pair(batch: wire.RowBatch) -> dict[bytes, tuple[Optional[bytes], Optional[bytes], int]]:
    """Pair key -> (exe, path, newest time in the batch), for the pairs table."""
    out: dict[bytes, tuple[Optional[bytes], Optional[bytes], int]] = {}
    for ts, key, exe, path, _, _ in batch.events:
        got = out.get(key)
        if got is None or ts > got[2]:
            out[key] = (exe, path, ts)
    for key, exe, path, times, _ in batch.counts:
        top = max(times)
        got = out.get(key)
        if got is None or top > got[2]:
            out[key] = (exe, path, top)
    return out


def actor_keys(batch: wire.RowBatch) -> set[bytes]:
    """The actor keys a batch names (see wire.actor_key)."""
    keys = {e[5] for e in batch.events if e[5] is not None}
    keys.update(c[4] for c in batch.counts if c[4] is not None)
    return keys


def event_rows(
    batch: wire.RowBatch, refs: dict[bytes, int], agent: AgentRecord, actors: dict[bytes, int]
) -> Iterator[EventRow]:
    """The batch's rows of the events table: one per event and per count time."""
    aref, href = agent.ref, agent.host_ref
    for ts, key, _, _, detail, actor in batch.events:
        yield (ts, refs[key], aref, href, detail, None if actor is None else actors[actor])
    for key, _, _, times, actor in batch.counts:
        ref = refs[key]
        who = None if actor is None else actors[actor]
        for t in times:
            yield (t, ref, aref, href, None, who)


def actor_of_key(key: Optional[bytes]) -> Actor:
    """(pname, uname, uid) of a stored actor key."""
    if key is None:
        return NO_ACTOR
    v = msgpack.unpackb(key, raw=False)
    return (v[0], v[1], v[2])


# ------------------------------------------------------ new terms, shared by the stores

TERM_CHUNK = 500  # pairs per history lookup (SQLite allows 32,766 variables since 3.32, 999 before)
TERM_SELECT_SQL = (
    "SELECT pair, first_ts, last_ts FROM terms WHERE rule_id = ? AND agent_ref = ? AND pair IN ({marks})"
)
TERM_UPSERT_SQL = (
    "INSERT INTO terms(rule_id, agent_ref, pair, first_ts, last_ts) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (rule_id, agent_ref, pair) DO UPDATE SET first_ts = excluded.first_ts, "
    "last_ts = excluded.last_ts"
)
HIT_INSERT_SQL = (
    "INSERT INTO term_hits(rule_id, ts, received_ms, agent_ref, host_id, exe, path, detail, actor) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
HITS_SQL = """
SELECT t.ts, t.received_ms, a.agent_id, h.name, t.host_id, t.exe, t.path, t.detail, t.actor
FROM term_hits AS t JOIN agents AS a ON a.ref = t.agent_ref JOIN hosts AS h ON h.ref = a.host_ref
WHERE t.rule_id = ? AND t.{col} > ? AND t.{col} <= ?{on_hosts} ORDER BY t.{col}, t.id
"""
# only the pairs new on at least N agents in the same range (the outbreak
# rule): grouped on the index first, so the rest of the range is never unpacked
ON_HOSTS_SQL = """ AND (t.exe, t.path) IN (
SELECT exe, path FROM term_hits WHERE rule_id = ? AND ts > ? AND ts <= ?
GROUP BY exe, path HAVING count(DISTINCT agent_ref) >= ?)"""


def hits_query(
    rule_id: str, lo_ms: int, hi_ms: int, by_received: bool, on_hosts: int
) -> tuple[str, tuple[Any, ...]]:
    """The SQL (``?`` placeholders) and arguments of ``Store.term_hits``."""
    col = "received_ms" if by_received else "ts"
    if on_hosts <= 0:
        return HITS_SQL.format(col=col, on_hosts=""), (rule_id, lo_ms, hi_ms)
    assert not by_received  # noqa: S101 - outbreaks group by event time
    return HITS_SQL.format(col=col, on_hosts=ON_HOSTS_SQL), (
        rule_id,
        lo_ms,
        hi_ms,
        rule_id,
        lo_ms,
        hi_ms,
        on_hosts,
    )


def term_writes(
    lookup: Callable[[str, Sequence[bytes]], dict[bytes, Run]],
    agent: AgentRecord,
    host_id: str,
    cands: Sequence[Candidate],
    now_ms: int,
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The terms rows to upsert and the term_hits rows to insert for a
    batch's candidates; ``lookup(rule_id, pairs)`` reads the stored runs of
    those pairs (a query per chunk, not per pair)."""
    pairs: dict[str, dict[bytes, None]] = {}
    for c in cands:
        pairs.setdefault(c.rule_id, {})[c.pair] = None
    stored: dict[tuple[str, bytes], Optional[Run]] = {}
    for rule_id, wanted in pairs.items():
        keys = sorted(wanted)  # one order for every collector: PostgreSQL locks them in it
        for i in range(0, len(keys), TERM_CHUNK):
            chunk = keys[i : i + TERM_CHUNK]
            got = lookup(rule_id, chunk)
            stored.update(((rule_id, p), got.get(p)) for p in chunk)
    hits, changed = new_candidates(cands, stored)
    upserts = [(rid, agent.ref, pair, first, last) for (rid, pair), (first, last) in changed.items()]
    inserts = [
        (c.rule_id, c.ts, now_ms, agent.ref, host_id or agent.agent_id, c.exe, c.path, c.detail, c.actor)
        for c in hits
    ]
    return upserts, inserts


def hit_of(row: Sequence[Any]) -> TermHit:
    ts, received, agent_id, host, host_id, exe, path, detail, actor = row
    return TermHit(
        int(ts),
        int(received),
        str(agent_id),
        str(host),
        str(host_id),
        None if exe is None else bytes(exe),
        None if path is None else bytes(path),
        None if detail is None else msgpack.unpackb(bytes(detail), raw=False),
        actor_of_key(None if actor is None else bytes(actor)),
    )
