"""What every collector store is: the Store protocol and the records it
hands out, whatever the database."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Protocol

from agent.shared import wire
from agent.shared.rule import Row, Rule

Pair = tuple[Optional[bytes], Optional[bytes]]


@dataclass(frozen=True)
class AgentRecord:
    agent_id: str
    host_name: str
    revoked: bool
    ref: int = 0
    host_ref: int = 0
    enrolled_ms: int = 0
    last_seen_ms: Optional[int] = None


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


@dataclass(frozen=True)
class RankedRow:
    """A rule row plus the first event time of its pair in the window."""

    row: Row
    first_ts: int


class Store(Protocol):
    """What the server and the evaluator need: SQLite (:class:`CollectorStore`)
    or PostgreSQL (:class:`agent.collector.storage.postgres.PgStore`); see :func:`open_store`."""

    path: str

    def enroll(self, agent_id: str, host_name: str, key_hash: str, now_ms: int) -> bool: ...
    def agent_for_key(self, key_hash: str) -> Optional[AgentRecord]: ...
    def revoke(self, agent_id: str) -> bool: ...
    def restore(self, agent_id: str) -> bool: ...
    def list_agents(self) -> list[AgentRecord]: ...
    def ingest(self, agent: AgentRecord, batch: wire.Batch | wire.RowBatch, now_ms: int) -> str: ...
    def rows(self, rule: Rule, at_ms: int) -> list[Row]: ...
    def ranked_rows(self, rule: Rule, at_ms: int) -> list[RankedRow]: ...
    def pair_events(self, pair: Pair, lo_ms: int, hi_ms: int, limit: int) -> list[StoredEvent]: ...
    def gaps_overlapping(self, start_ms: int, end_ms: int) -> list[GapRow]: ...
    def record_alerts(self, rule_id: str, alerts: Sequence[tuple[str, Pair, int, int, str]]) -> list[str]: ...
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
