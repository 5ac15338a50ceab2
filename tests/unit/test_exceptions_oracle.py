"""Exceptions are exact: over random fleets and random exception sets,
``evaluate`` equals the rule's query with each active exception's
``and not (...)`` added to its where, for every T, on SQLite and PostgreSQL.

The oracle here is that query as plain SQL over one flat table, with its own
glob translation and its own file.name / directory / extension; the second
reference is agent.shared.rule.reference_rows over the same events.
"""
# ruff: noqa: S608  (the oracle's SQL is made from the test's own exceptions)

from __future__ import annotations

import contextlib
import os
import random
import re
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import pytest

from agent.collector import evaluate as ev
from agent.collector.storage.base import Store
from agent.shared import wire
from agent.shared.events import FileEvent, ProcessInfo, UserInfo
from agent.shared.exceptions import FIELDS, RuleException
from agent.shared.rule import Row, Rule, Sighting, reference_rows
from tests.support import pg

T = 1_790_000_000_000
H = 3_600_000

# agent, host, exe, path, ts, pname, uname, uid
Flat = tuple[str, str, Optional[bytes], Optional[bytes], int, Optional[str], Optional[str], Optional[str]]

ACTORS = [
    ("php-fpm8.2", "www-data", "33"),
    ("nginx", "www-data", "33"),
    ("apache2", None, "33"),
    ("python3", "nginx", "498"),
]
EXES: list[Optional[bytes]] = [b"/usr/sbin/php-fpm8.2", b"/usr/sbin/nginx", b"/usr/bin/python3\xff", None]
PATHS: list[Optional[bytes]] = [
    *[b"/var/lib/php/sessions/sess_%d" % i for i in range(4)],
    *[b"/var/www/html/uploads/%d.jpg" % i for i in range(3)],
    b"/var/www/html/uploads/s.php",
    b"/var/lib/nginx/body/000000001",
    b"/tmp/.x",
    b"/var/www/caf\xc3\xa9.php",
    b"/var/www/\xff.ph",
    b"/noext",
    b"/var/www/html/uploads/.htaccess",
    None,
]  # fmt: skip


def fleet(rng: random.Random) -> list[Flat]:
    agents = [(f"agent-{i}", f"web-{i:02d}") for i in range(rng.randint(2, 4))]
    interesting = [T - H - 1, T - H, T - H + 1, T - 1, T, T + 1, T - H // 2]
    out: list[Flat] = []
    for _ in range(rng.randint(8, 22)):
        exe, path = rng.choice(EXES), rng.choice(PATHS)
        for agent_id, host in rng.sample(agents, rng.choice([1, 1, 1, 2])):
            for _ in range(rng.randint(1, 8)):
                ts = rng.choice(interesting) if rng.random() < 0.5 else T - rng.randrange(-1000, H + 1000)
                out.append((agent_id, host, exe, path, ts, *rng.choice(ACTORS)))
    return out


def ship(store: Store, events: list[Flat], rng: random.Random) -> None:
    by_agent: dict[str, list[Flat]] = {}
    for e in events:
        by_agent.setdefault(e[0], []).append(e)
    for agent_id, mine in by_agent.items():
        store.enroll(agent_id, mine[0][1], "k-" + agent_id, T - H)
        rec = store.agent_for_key("k-" + agent_id)
        assert rec is not None
        pool = list(mine)
        rng.shuffle(pool)
        seq = 0
        while pool:
            n = rng.randint(1, 9)
            chunk, pool = pool[:n], pool[n:]
            records: list[wire.EventRecord] = []
            counts: dict[tuple[Any, ...], list[int]] = {}
            for _, _, exe, path, ts, pname, uname, uid in chunk:
                if rng.random() < 0.4:
                    detail = {k: v for k, v in (("pname", pname), ("uname", uname), ("uid", uid)) if v}
                    records.append(wire.EventRecord(ts, "creation", exe, path, detail))
                else:
                    counts.setdefault((exe, path, (pname, uname, uid)), []).append(ts)
            seq += 1
            batch = wire.Batch(
                os.urandom(16).hex(), "b" * 32, seq, agent_id, chunk[0][1], T, tuple(records),
                tuple(wire.CountRecord(e, p, tuple(sorted(t)), a) for (e, p, a), t in counts.items()),
            )  # fmt: skip
            assert store.ingest(rec, wire.decode_rows(wire.encode_batch(batch)), T) == "stored"


# ------------------------------------------------------------------ the oracle


def _glob_rx(g: str) -> str:
    return "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in g)


def _derived(path: Optional[bytes]) -> tuple[Optional[str], Optional[str], Optional[str], Optional[str]]:
    if path is None:
        return None, None, None, None
    text = path.decode("utf-8", "surrogateescape")
    head, _, name = text.rpartition("/")
    directory = (head or "/") if "/" in text else None
    _stem, dot, ext = name.rpartition(".")
    return text, name or None, directory, (ext or None) if dot else None


def _fields(e: Flat) -> dict[str, Optional[str]]:
    """The ECS fields of one flat event, as the oracle derives them."""
    agent, host, exe, path, _, pname, uname, uid = e
    p, name, directory, ext = _derived(path)
    return {
        "process.executable": None if exe is None else exe.decode("utf-8", "surrogateescape"),
        "file.path": p, "file.name": name, "file.directory": directory, "file.extension": ext,
        "host.name": host, "agent.id": agent, "process.name": pname, "user.name": uname, "user.id": uid,
    }  # fmt: skip


def oracle(events: list[Flat], rule: Rule, at_ms: int) -> list[Row]:
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        db.create_function("glob_like", 2, _like)
        cols = [c.replace(".", "_") for c in FIELDS]
        db.execute(f"CREATE TABLE e (ts INTEGER, exe_b BLOB, path_b BLOB, {', '.join(cols)})")
        for e in events:
            values = _fields(e)
            ts, exe, path = e[4], e[2], e[3]
            db.execute(
                f"INSERT INTO e VALUES (?, ?, ?, {', '.join('?' * len(cols))})",
                (ts, exe, path, *[_sqlable(values[f]) for f in FIELDS]),
            )
        nots: list[str] = []
        args: list[Optional[bytes]] = []
        for x in rule.exceptions:
            if x.expires_ms is not None and at_ms >= x.expires_ms:
                continue
            parts = [f"{f.replace('.', '_')} IS NULL" for f in x.missing]
            for f, globs in x.conditions:
                c = f.replace(".", "_")
                parts.append(
                    f"({c} IS NOT NULL AND (" + " OR ".join(f"glob_like({c}, ?)" for _ in globs) + "))"
                )
                args.extend(_sqlable(g) for g in globs)
            nots.append("NOT (" + " AND ".join(parts) + ")")
        where = " AND ".join(["ts > ?", "ts <= ?", *nots])
        base = f"SELECT * FROM e WHERE {where}"
        params = [at_ms - rule.window_ms, at_ms, *args]
        groups = db.execute(
            f"SELECT exe_b, path_b, count(*), count(DISTINCT agent_id) FROM ({base}) GROUP BY exe_b, path_b "
            "HAVING count(*) < ? AND count(DISTINCT agent_id) = ? ORDER BY count(*), exe_b, path_b LIMIT ?",
            (*params, rule.count_below, rule.agent_count, rule.limit),
        ).fetchall()
        rows = []
        for exe, path, cc, ac in groups:
            q = f"SELECT DISTINCT {{}} FROM ({base}) WHERE exe_b IS ? AND path_b IS ? ORDER BY 1"
            hosts = tuple(h.decode() for (h,) in db.execute(q.format("host_name"), (*params, exe, path)))
            agents = tuple(a.decode() for (a,) in db.execute(q.format("agent_id"), (*params, exe, path)))
            rows.append(Row(cc, ac, hosts, agents, exe, path))
        return rows


def _sqlable(v: Optional[str]) -> Optional[bytes]:
    # SQLite text must be valid UTF-8: every field is kept as the bytes it came from
    return None if v is None else v.encode("utf-8", "surrogateescape")


def _like(v: bytes, g: bytes) -> bool:
    text = v.decode("utf-8", "surrogateescape")
    return re.fullmatch(_glob_rx(g.decode("utf-8", "surrogateescape")), text, re.DOTALL) is not None


def sightings(events: list[Flat]) -> list[Sighting]:
    return [
        Sighting(a, h, FileEvent(ts, "creation", path, ProcessInfo(7, pname, exe), UserInfo(uid, uname)))
        for a, h, exe, path, ts, pname, uname, uid in events
    ]


# ------------------------------------------------------------------ random exceptions


def _values(events: list[Flat], field: str) -> list[str]:
    out = {v for v in (_fields(e)[field] for e in events) if v}
    return sorted(out) or ["nothing"]


def _glob_from(rng: random.Random, value: str) -> str:
    safe = value.replace("\\", "?").replace("*", "?")
    k = rng.random()
    if k < 0.3:
        return safe
    if k < 0.5:
        return safe[: rng.randint(0, len(safe))] + "*"
    if k < 0.7:
        return "*" + safe[rng.randint(0, len(safe)) :]
    if k < 0.85 and safe:
        i = rng.randrange(len(safe))
        return safe[:i] + "?" + safe[i + 1 :]
    return safe + "x"  # matches nothing of this value


def exceptions(rng: random.Random, events: list[Flat]) -> tuple[RuleException, ...]:
    out = []
    for i in range(rng.randint(1, 3)):
        fields = rng.sample(FIELDS, rng.choice([1, 1, 2, 3]))
        conds = tuple(
            (f, tuple(_glob_from(rng, rng.choice(_values(events, f))) for _ in range(rng.randint(1, 2))))
            for f in sorted(fields)
        )
        expires = rng.choice([None, None, T, T + 1, T - H // 2])
        others = [f for f in FIELDS if f not in fields]
        missing = tuple(rng.sample(others, rng.choice([0, 0, 1]))) if others else ()
        out.append(RuleException(f"x{i}", conds, expires, missing=missing))
    return tuple(out)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
@pytest.mark.parametrize("seed", range(30))
def test_exceptions_match_query(
    tmp_path: Path, seed: int, backend: str, request: pytest.FixtureRequest
) -> None:
    rng = random.Random(seed)
    events = fleet(rng)
    store: Store = pg.backend_store(backend, tmp_path, request)
    try:
        ship(store, events, rng)
        removed = 0
        for k in range(4):
            rule = replace(Rule(), exceptions=exceptions(rng, events), limit=rng.choice([100, 3]))
            for at in (T - H, T - 1, T, T + 1, T + H - 1):
                want = oracle(events, rule, at)
                assert ev.evaluate(store, rule, at) == want, (seed, k, at, rule.exceptions)
                assert reference_rows(rule, sightings(events), at) == want
                removed += want != oracle(events, replace(rule, exceptions=()), at)
        assert removed, "no exception changed any row: the comparison proved little"
    finally:
        store.close()
