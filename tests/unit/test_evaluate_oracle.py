"""store.rows against an independent oracle, over many random fleets, on
both stores (SQLite and PostgreSQL).

The oracle is the rule's query written here as plain SQL over one flat,
in-memory table of events (no interning, no batches); a second reference is
agent.shared.rule.reference_rows over the same events as Sightings.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Optional

import pytest

from agent.collector.storage import open_store
from agent.collector.storage.base import Store
from agent.collector.storage.sqlite import CollectorStore
from agent.shared import wire
from agent.shared.events import FileEvent, ProcessInfo, UserInfo
from agent.shared.rule import Row, Rule, Sighting, reference_rows

T = 1_790_000_000_000
H = 3_600_000

Flat = tuple[str, str, Optional[bytes], Optional[bytes], int]  # agent, host, exe, path, ts


def oracle(events: list[Flat], at_ms: int, window: int, below: int, agents: int, limit: int) -> list[Row]:
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        return _oracle(db, events, at_ms, window, below, agents, limit)


def _oracle(
    db: sqlite3.Connection, events: list[Flat], at_ms: int, window: int, below: int, agents: int, limit: int
) -> list[Row]:
    db.execute("CREATE TABLE e (agent TEXT, host TEXT, exe BLOB, path BLOB, ts INTEGER)")
    db.executemany("INSERT INTO e VALUES (?, ?, ?, ?, ?)", events)
    groups = db.execute(
        "SELECT exe, path, count(*), count(DISTINCT agent) FROM e WHERE ts > ? AND ts <= ? "
        "GROUP BY exe, path HAVING count(*) < ? AND count(DISTINCT agent) = ? "
        "ORDER BY count(*), exe, path LIMIT ?",
        (at_ms - window, at_ms, below, agents, limit),
    ).fetchall()
    rows = []
    for exe, path, cc, ac in groups:
        args = (at_ms - window, at_ms, exe, path)
        q_hosts = (
            "SELECT DISTINCT host FROM e WHERE ts > ? AND ts <= ? AND exe IS ? AND path IS ? ORDER BY host"
        )
        q_agents = (
            "SELECT DISTINCT agent FROM e WHERE ts > ? AND ts <= ? AND exe IS ? AND path IS ? ORDER BY agent"
        )
        hosts = tuple(h for (h,) in db.execute(q_hosts, args))
        ags = tuple(a for (a,) in db.execute(q_agents, args))
        rows.append(Row(cc, ac, hosts, ags, exe, path))
    return rows


def fleet(rng: random.Random) -> list[Flat]:
    n_agents = rng.randint(3, 6)
    agents = [(f"agent-{i}", f"web-{i:02d}") for i in range(n_agents)]
    exes: list[Optional[bytes]] = [
        b"/usr/sbin/apache2",
        b"/usr/bin/php-fpm8.2",
        None,
        b"/usr/bin/python3\xff",
    ]
    paths: list[Optional[bytes]] = [b"/var/www/%d.php" % i for i in range(12)] + [None, b"/tmp/\n\x1b"]
    interesting = [T - H - 1, T - H, T - H + 1, T - 1, T, T + 1, T - H // 2]
    out: list[Flat] = []
    for _ in range(rng.randint(8, 25)):
        exe, path = rng.choice(exes), rng.choice(paths)
        owners = rng.sample(agents, rng.choice([1, 1, 1, 2, 3]))
        for agent_id, host in owners:
            for _ in range(rng.randint(3, 6) if rng.random() < 0.7 else rng.randint(1, 2)):
                ts = rng.choice(interesting) if rng.random() < 0.6 else T - rng.randrange(-1000, H + 1000)
                out.append((agent_id, host, exe, path, ts))
    return out


def ship(store: Store, events: list[Flat], rng: random.Random) -> None:
    by_agent: dict[str, list[Flat]] = {}
    for e in events:
        by_agent.setdefault(e[0], []).append(e)
    for agent_id, evs in by_agent.items():
        store.enroll(agent_id, evs[0][1], "k-" + agent_id, T - H)
        rec = store.agent_for_key("k-" + agent_id)
        assert rec is not None
        rng.shuffle(evs)
        batches = []
        seq = 0
        pool = evs
        while pool:
            n = rng.randint(1, 8)
            chunk, pool = pool[:n], pool[n:]
            records: list[wire.EventRecord] = []
            counts: dict[tuple[Optional[bytes], Optional[bytes]], list[int]] = {}
            for _, _, exe, path, ts in chunk:
                if rng.random() < 0.5:
                    records.append(wire.EventRecord(ts, "creation", exe, path, {"pid": 7}))
                else:
                    counts.setdefault((exe, path), []).append(ts)
            seq += 1
            batches.append(
                wire.Batch(
                    os.urandom(16).hex(),
                    "a" * 32,
                    seq,
                    agent_id,
                    chunk[0][1],
                    T,
                    tuple(records),
                    tuple(wire.CountRecord(e, p, tuple(sorted(t))) for (e, p), t in counts.items()),
                )
            )
        for b in batches:
            # Round trip through the wire format, like the server does.
            decoded = wire.decode_batch(wire.encode_batch(b))
            assert store.ingest(rec, decoded, T) == "stored"
            if rng.random() < 0.3:  # a resend must change nothing
                assert store.ingest(rec, decoded, T) == "duplicate"


def sightings(events: list[Flat]) -> list[Sighting]:
    return [
        Sighting(
            a,
            h,
            FileEvent(
                ts,
                "creation",
                path,
                ProcessInfo(pid=7, name="apache2", executable=exe),
                UserInfo("33", "www-data"),
            ),
        )
        for a, h, exe, path, ts in events
    ]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
@pytest.mark.parametrize("seed", range(40))
def test_rows_match_oracle(tmp_path: Path, seed: int, backend: str, request: pytest.FixtureRequest) -> None:
    rng = random.Random(seed)
    events = fleet(rng)
    if backend == "sqlite":
        store: Store = CollectorStore(str(tmp_path / "c.db"))
    else:
        store = open_store(request.getfixturevalue("pg_url"))
    try:
        ship(store, events, rng)
        rules = [Rule(), replace(Rule(), agent_count=2), replace(Rule(), count_below=3, limit=4)]
        seen = 0
        for rule in rules:
            for at in (T - H, T - 1, T, T + 1, T + H - 1, T + H):
                got = store.rows(rule, at)
                want = oracle(events, at, rule.window_ms, rule.count_below, rule.agent_count, rule.limit)
                assert got == want, (seed, rule.agent_count, at)
                assert [r.cc for r in got] == sorted(r.cc for r in got)
                assert got == reference_rows(rule, sightings(events), at)
                seen += len(got)
        assert seen > 0, "the fleet produced no row at all: the comparison proved nothing"
    finally:
        store.close()


# Many rare pairs: both stores find the rows by walking pairs in
# (exe, path) order and stopping at the limit when enough pairs have the
# fewest events, else ranks every pair. Bytes that test the order key: NUL
# and 0xFF inside names, names that are prefixes of others, NULL (the wire
# refuses empty names).
EDGE_NAMES: list[Optional[bytes]] = [
    None,
    b"\x00",
    b"\x00\xff",
    b"/a",
    b"/a\x00",
    b"/a\x00\x00",
    b"/a\x00b",
    b"/a\x01",
    b"/a\xff",
    b"/a\xff\x00",
    b"/ab",
]


def rare_fleet(rng: random.Random) -> list[Flat]:
    agents = [(f"agent-{i}", f"web-{i:02d}") for i in range(3)]
    exes: list[Optional[bytes]] = [*EDGE_NAMES, b"/usr/sbin/apache2", b"/usr/bin/php-fpm8.2"]
    seen: set[tuple[Optional[bytes], Optional[bytes]]] = set()
    out: list[Flat] = []
    for _ in range(rng.randint(150, 300)):
        exe = rng.choice(exes)
        path = rng.choice(EDGE_NAMES) if rng.random() < 0.3 else b"/var/www/%d.php" % rng.randrange(1000)
        if (exe, path) in seen:
            continue
        seen.add((exe, path))
        owners = rng.sample(agents, 1 if rng.random() < 0.85 else 2)
        n = rng.choice([1, 1, 1, 2, 3, 4, 5, 8])
        for _ in range(n):
            agent_id, host = rng.choice(owners)
            ts = (
                T - rng.randrange(-2000, H + 2000)
                if rng.random() < 0.8
                else rng.choice([T - H, T - H + 1, T])
            )
            out.append((agent_id, host, exe, path, ts))
    return out


@pytest.mark.parametrize("backend", ["sqlite", "sqlite-short-walk", "postgres", "postgres-short-walk"])
@pytest.mark.parametrize("seed", range(8))
def test_many_rare_pairs_match_oracle(
    tmp_path: Path, seed: int, backend: str, request: pytest.FixtureRequest
) -> None:
    rng = random.Random(1000 + seed)
    events = rare_fleet(rng)
    if backend.startswith("sqlite"):
        sq = CollectorStore(str(tmp_path / "c.db"))
        if backend == "sqlite-short-walk":
            sq.walk_pairs = 0  # the walk looks at 10 * limit pairs, then gives up
        store: Store = sq
    else:
        store = open_store(request.getfixturevalue("pg_url"))
        if backend == "postgres-short-walk":
            store.walk_pairs = 0  # type: ignore[attr-defined]
    try:
        ship(store, events, rng)
        rules = [
            replace(Rule(), limit=limit, count_below=below, agent_count=agents)
            for limit in (1, 7, 60, 100, 1000)
            for below, agents in ((5, 1), (2, 1), (3, 2), (5, 2))
        ]
        for rule in rules:
            for at in (T - H // 2, T, T + H // 3):
                got = store.rows(rule, at)
                want = oracle(events, at, rule.window_ms, rule.count_below, rule.agent_count, rule.limit)
                assert got == want, (seed, rule.limit, rule.count_below, rule.agent_count, at)
    finally:
        store.close()
