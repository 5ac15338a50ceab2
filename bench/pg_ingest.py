#!/usr/bin/env python3
"""Collector scale-out (issue 9): ingest rate, SQLite vs PostgreSQL, and
evaluate time over many stored events.

Ingest: 10 agent threads (each its own enrolled agent) post wire batches as
fast as the collectors answer, for ``--seconds``:
  sqlite-1:  one ``collector serve --db FILE`` (WAL, synchronous=FULL);
  pg-2:      two ``collector serve --db postgresql://...`` on one database,
             each agent's batches alternating between the two collectors.
PostgreSQL here is a throwaway local cluster (tests/support/pg.py) with
fsync on and synchronous_commit on: a 2xx means durable on both stores.
A batch is ``--records`` records: 10% full events, 90% count times.

Per core: next to records/s, records per CPU-second of the store side over
the measured interval, from /proc/PID/stat (utime + stime of each process of
the tree, plus cutime + cstime: its reaped children), so that two setups on a
shared 2-core box compare by the work they cost, not by who got the cores:
  sqlite-1:  the collector process and its children (SQLite runs inside it);
  pg-2:      both collectors and their children, plus the postmaster and all
             its processes (backends, WAL writer, checkpointer, autovacuum).
The bench's own agent threads (the client) are shown apart (client_cpu_s).

``--against DIR`` also runs another checkout's collector (for example
``git worktree add /tmp/rw-old HEAD~1``), by this venv's interpreter, so old
and new compare side by side in one run: ``--rounds`` rounds (3 by default
then), each running every setup once per checkout, the order rotated every
round; each run gets a fresh SQLite file or PostgreSQL database. Medians per
setup and checkout are printed last. ``--ingest-only`` skips the evaluate part.

Evaluate: ``--events`` events (default 10,000,000) spread over one hour,
bulk-loaded (COPY / generate_series, not through HTTP), with a realistic
skew: 90% of events on the common pairs (10% of pairs, many agents), the
rest on pairs one agent writes a few times. Then the rule at T: the store's
``rows`` (median of 3) and one ``rarewrite collector evaluate`` process.
``--sqlite-eval`` also loads the same data into SQLite for comparison.

Prints tables and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import resource
import shutil
import sqlite3
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import _common as c
import requests

from agent.collector.storage import open_store
from agent.collector.storage.base import order_key
from agent.collector.storage.sqlite import CollectorStore
from agent.shared import wire
from agent.shared.rule import Rule
from agent.shared.wire.format import pair_key
from tests.support import pg, procs

H = 3_600_000
EXE = b"/usr/sbin/nginx"


# ---------------------------------------------------------------- ingest


def _batch(agent_id: str, epoch: str, seq: int, now: int, records: int, rng: random.Random) -> bytes:
    n_events = max(1, records // 10)
    events = tuple(
        wire.EventRecord(
            now - rng.randrange(H),
            "creation",
            EXE,
            b"/var/www/html/upload/%s-%d.php" % (agent_id.encode(), rng.randrange(1 << 30)),
            {"pid": rng.randrange(2, 1 << 22), "uname": "www-data", "cmd": "php-fpm: pool www"},
        )
        for _ in range(n_events)
    )
    left = records - n_events
    counts = []
    while left > 0:
        k = min(left, 30)
        path = b"/var/cache/nginx/%d" % rng.randrange(500)  # common pairs: every agent writes them
        counts.append(wire.CountRecord(EXE, path, tuple(sorted(now - rng.randrange(H) for _ in range(k)))))
        left -= k
    return wire.encode_batch(
        wire.Batch(os.urandom(16).hex(), epoch, seq, agent_id, f"h-{agent_id}", now, events, tuple(counts))
    )


def tree_cpu_s(roots: list[int]) -> float:
    """CPU seconds (user + system) used so far by ``roots`` and every process
    below them: each live one's own time plus its reaped children's."""
    procs_: dict[int, tuple[int, int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        # fields[0] is field 3 (state): ppid is 4, utime stime cutime cstime 14-17
        procs_[int(d)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    below: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs_.items():
        below.setdefault(ppid, []).append(pid)
    ticks, todo, seen = 0, list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in procs_:
            continue
        seen.add(pid)
        ticks += procs_[pid][1]
        todo.extend(below.get(pid, ()))
    return ticks / os.sysconf("SC_CLK_TCK")


def _self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _enroll(urls: list[str], threads: int) -> list[str]:
    keys = []
    for i in range(threads):
        r = requests.post(
            urls[i % len(urls)] + "/api/v1/enroll",
            json={"enrollment_secret": procs.SECRET, "agent_id": f"bench-{i}", "host_name": f"h-bench-{i}"},
            timeout=10,
        )
        r.raise_for_status()
        keys.append(r.json()["api_key"])
    return keys


def ingest_run(
    urls: list[str], threads: int, seconds: float, records: int, cpu: dict[str, list[int]]
) -> dict[str, Any]:
    """``cpu``: name -> root pids whose process trees make the store side."""
    keys = _enroll(urls, threads)
    stop = time.monotonic() + seconds
    done = [0] * threads
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads

    def agent(i: int) -> None:
        rng = random.Random(i)  # noqa: S311 - test data, not secrets
        session = requests.Session()
        epoch = os.urandom(16).hex()
        seq = 0
        headers = {"Authorization": f"Bearer {keys[i]}", "Content-Type": "application/msgpack"}
        while time.monotonic() < stop:
            seq += 1
            body = _batch(f"bench-{i}", epoch, seq, int(time.time() * 1000), records, rng)
            url = urls[(i + seq) % len(urls)]  # one agent's batches alternate between collectors
            while True:
                t0 = time.monotonic()
                resp = session.post(url + "/api/v1/batches", data=body, headers=headers, timeout=60)
                if resp.status_code == 200:
                    latencies[i].append(time.monotonic() - t0)
                    done[i] += 1
                    break
                errors[i] += 1
                time.sleep(float(resp.headers.get("Retry-After", "0.2")))

    cpu0 = {k: tree_cpu_s(v) for k, v in cpu.items()}
    client0 = _self_cpu_s()
    t0 = time.monotonic()
    ts = [threading.Thread(target=agent, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    took = time.monotonic() - t0
    used = {f"{k}_cpu_s": round(tree_cpu_s(v) - cpu0[k], 2) for k, v in cpu.items()}
    store_cpu = sum(used.values())
    client = _self_cpu_s() - client0
    lat = sorted(x for xs in latencies for x in xs)
    batches = sum(done)
    return {
        "collectors": len(urls),
        "threads": threads,
        "seconds": round(took, 2),
        "batches": batches,
        "batches_per_s": round(batches / took, 1),
        "records_per_s": round(batches * records / took),
        "records_per_cpu_s": round(batches * records / store_cpu) if store_cpu else None,
        "store_cpu_s": round(store_cpu, 2),
        **used,
        "client_cpu_s": round(client, 2),
        "p50_ms": round(1000 * lat[len(lat) // 2], 1) if lat else None,
        "p99_ms": round(1000 * lat[int(len(lat) * 0.99)], 1) if lat else None,
        "non_2xx": sum(errors),
    }


@contextlib.contextmanager
def _collector(tmp: str, db: str, checkout: str | None) -> Iterator[procs.Collector]:
    """``collector serve`` of this checkout (None) or of ``checkout`` (--against)."""
    os.makedirs(tmp)
    port = procs.free_port()
    log = os.path.join(tmp, f"collector-{port}.log")
    env = {**os.environ, "RAREWRITE_ENROLLMENT_SECRET": procs.SECRET}
    cmd = [*c.rarewrite_of(checkout), "collector", "serve", "--listen", f"127.0.0.1:{port}", "--db", db]
    with open(log, "ab") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    col = procs.Collector(f"http://127.0.0.1:{port}", db, p, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(col.url + "/healthz", timeout=2).status_code == 200:
                    break
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("collector did not come up: " + col.log_text()[-2000:])
            time.sleep(0.1)
        yield col
    finally:
        procs.stop(p)


def _postmaster(server: pg.Server) -> int:
    with open(os.path.join(server.data, "postmaster.pid"), encoding="ascii") as f:
        return int(f.readline())


def ingest_setup(
    setup: str, checkout: str | None, server: pg.Server, tmp: str, args: argparse.Namespace
) -> dict[str, Any]:
    """One run of ``setup`` (sqlite-1 or pg-2) on a fresh store."""
    d = tempfile.mkdtemp(prefix=f"{setup}-", dir=tmp)
    run = (args.threads, args.seconds, args.records)
    if setup == "sqlite-1":
        with _collector(os.path.join(d, "s"), os.path.join(d, "c.db"), checkout) as col:
            return ingest_run([col.url], *run, {"collector": [col.proc.pid]})
    name = server.create_db("ingest")
    url = server.url(name, with_password=False)
    try:
        with (
            _collector(os.path.join(d, "a"), url, checkout) as a,
            _collector(os.path.join(d, "b"), url, checkout) as b,
        ):
            cpu = {"collector": [a.proc.pid, b.proc.pid], "postgres": [_postmaster(server)]}
            return ingest_run([a.url, b.url], *run, cpu)
    finally:
        server.drop_db(name)


INGEST_KEYS = [
    "setup",
    "checkout",
    "batches_per_s",
    "records_per_s",
    "records_per_cpu_s",
    "store_cpu_s",
    "collector_cpu_s",
    "postgres_cpu_s",
    "client_cpu_s",
    "p50_ms",
    "p99_ms",
    "non_2xx",
]


def ingest_all(server: pg.Server, tmp: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every setup, for this checkout and (``--against``) the other one, in rotated order."""
    checkouts: list[str | None] = [None, args.against] if args.against else [None]
    runs = []
    for k in range(args.rounds):
        order = checkouts[k % len(checkouts) :] + checkouts[: k % len(checkouts)]
        for setup in ("sqlite-1", "pg-2"):
            for checkout in order:
                r = ingest_setup(setup, checkout, server, tmp, args)
                runs.append({"setup": setup, "checkout": checkout or "this", "round": k, **r})
    print(
        f"\ningest: {args.threads} agent threads, {args.records} records a batch, {args.seconds:g} s each"
        + (f"; this = {c.ROOT}, against = {args.against}" if args.against else "")
    )
    c.table(INGEST_KEYS, [[r.get(k) for k in INGEST_KEYS] for r in runs])
    summary = []
    for setup in ("sqlite-1", "pg-2"):
        for checkout in checkouts:
            rs = [r for r in runs if r["setup"] == setup and r["checkout"] == (checkout or "this")]
            summary.append(
                {
                    "setup": setup,
                    "checkout": checkout or "this",
                    "runs": len(rs),
                    **{
                        k: c.median([r[k] for r in rs if r.get(k) is not None])
                        for k in ("records_per_s", "records_per_cpu_s", "store_cpu_s", "p50_ms")
                    },
                }
            )
    if args.rounds > 1 or args.against:
        print("\nmedians")
        keys = ["setup", "checkout", "runs", "records_per_s", "records_per_cpu_s", "store_cpu_s", "p50_ms"]
        c.table(keys, [[r[k] for k in keys] for r in summary])
    return {"ingest": runs, "ingest_summary": summary}


# ---------------------------------------------------------------- evaluate


def _shape(n: int) -> dict[str, int]:
    pairs = max(100, n // 20)
    return {
        "events": n,
        "pairs": pairs,
        "common": max(10, pairs // 10),
        "agents": max(10, min(10_000, n // 1000)),
    }


def load_pg(url: str, n: int, at: int, create: bool = True) -> float:
    """Bulk-load ``n`` events over (at - 1h, at]; seconds taken. ``create``:
    make the schema first (else another checkout's code made it, and the
    pairs get its columns: ``okey`` only from schema 6 on)."""
    import psycopg

    s = _shape(n)
    if create:
        from agent.collector.storage.postgres import PgStore

        store = PgStore(url)
        store.ensure_partitions({at // H + i for i in range(-2, 2)})
        store.close()
    t0 = time.monotonic()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO hosts(ref, name) SELECT g, 'host-' || g FROM generate_series(1, %s) g",
            (s["agents"],),
        )
        conn.execute(
            "INSERT INTO agents(ref, agent_id, host_ref, key_hash, enrolled_ms) "
            "SELECT g, 'agent-' || g, g, 'k' || g, 0 FROM generate_series(1, %s) g",
            (s["agents"],),
        )
        okey = conn.execute(
            "SELECT 1 FROM information_schema.columns WHERE table_name = 'pairs' AND column_name = 'okey'"
        ).fetchone()
        cols = "ref, key, exe, path, last_ts" + (", okey" if okey else "")
        with conn.cursor() as cur, cur.copy(f"COPY pairs ({cols}) FROM STDIN") as cp:
            for ref in range(1, s["pairs"] + 1):
                path = b"/var/www/p/%d" % ref
                row = (ref, pair_key(EXE, path), EXE, path, at)
                cp.write_row((*row, order_key(EXE, path)) if okey else row)
        for table in ("hosts", "agents", "pairs"):  # the refs were given: move the sequences past them
            conn.execute(f"SELECT setval('{table}_ref_seq', (SELECT max(ref) FROM {table}))")  # noqa: S608
        conn.execute(
            "INSERT INTO events (ts, pair, agent, host) "
            "SELECT %(at)s - 1 - (random() * %(h)s)::bigint, "
            "  CASE WHEN r < 0.9 THEN 1 + (random() * (%(common)s - 1))::bigint "
            "       ELSE %(common)s + 1 + (random() * (%(pairs)s - %(common)s - 1))::bigint END, a, a "
            "FROM (SELECT random() AS r, 1 + (random() * (%(agents)s - 1))::bigint AS a "
            "      FROM generate_series(1, %(n)s)) s",
            {"at": at, "h": H - 2, "n": n, **s},
        )
        conn.execute("ANALYZE")
    return time.monotonic() - t0


def pg_bytes_per_event(url: str, n: int) -> dict[str, float]:
    """Heap and index bytes of the events partitions, per stored event."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT sum(pg_table_size(c.oid)), sum(pg_indexes_size(c.oid)) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'events'::regclass"
        ).fetchone()
    assert row is not None
    return {"heap_b": round(int(row[0]) / n, 1), "index_b": round(int(row[1]) / n, 1)}


def load_sqlite(path: str, n: int, at: int, create: bool = True) -> float:
    s = _shape(n)
    if create:
        CollectorStore(path).close()
    t0 = time.monotonic()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO hosts(ref, name) VALUES (?, ?)", ((g, f"host-{g}") for g in range(1, s["agents"] + 1))
    )
    db.executemany(
        "INSERT INTO agents(ref, agent_id, host_ref, key_hash, enrolled_ms) VALUES (?, ?, ?, ?, 0)",
        ((g, f"agent-{g}", g, f"k{g}") for g in range(1, s["agents"] + 1)),
    )
    db.executemany(
        "INSERT INTO pairs(ref, key, exe, path, last_ts) VALUES (?, ?, ?, ?, ?)",
        (
            (ref, order_key(EXE, b"/var/www/p/%d" % ref), EXE, b"/var/www/p/%d" % ref, at)
            for ref in range(1, s["pairs"] + 1)
        ),
    )
    rng = random.Random(1)  # noqa: S311 - test data, not secrets

    def rows() -> Any:
        for _ in range(n):
            a = rng.randint(1, s["agents"])
            if rng.random() < 0.9:
                p = rng.randint(1, s["common"])
            else:
                p = rng.randint(s["common"] + 1, s["pairs"])
            yield (at - 1 - rng.randrange(H - 2), p, a, a)

    db.executemany("INSERT INTO events(ts, pair, agent, host) VALUES (?, ?, ?, ?)", rows())
    db.execute("COMMIT")
    db.execute("ANALYZE")
    db.close()
    return time.monotonic() - t0


def sqlite_bytes_per_event(path: str, n: int) -> dict[str, float]:
    db = sqlite3.connect(path)
    try:
        got = dict(db.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name").fetchall())
    except sqlite3.OperationalError:  # no dbstat in this build
        return {}
    finally:
        db.close()
    return {
        "heap_b": round(got.get("events", 0) / n, 1),
        "index_b": round((got.get("events_pair", 0) + got.get("events_ts", 0)) / n, 1),
    }


def time_eval(db: str, at: int, tmp: str) -> dict[str, Any]:
    store = open_store(db, readonly=True)
    times = []
    try:
        for _ in range(3):
            t0 = time.monotonic()
            rows = store.rows(Rule(), at)
            times.append(time.monotonic() - t0)
    finally:
        store.close()
    t0 = time.monotonic()
    cli_rows = c.evaluate(db, at, tmp, limit=100)
    cli_s = time.monotonic() - t0
    assert [r.cc for r in rows] == [r["cc"] for r in cli_rows]
    return {
        "rows": len(rows),
        "rows_s_median": round(statistics.median(times), 3),
        "rows_s_first": round(times[0], 3),
        "cli_s": round(cli_s, 3),
    }


def evaluate_all(server: pg.Server, tmp: str, args: argparse.Namespace) -> dict[str, Any]:
    at = (int(time.time() * 1000) // H) * H + H // 2
    evals = []
    eurl = server.url(server.create_db("evaluate"), with_password=False)
    load = load_pg(eurl, args.events, at)
    evals.append(
        {
            "store": "postgresql",
            "events": args.events,
            "load_s": round(load, 1),
            **pg_bytes_per_event(eurl, args.events),
            **time_eval(eurl, at, tmp),
        }
    )
    if args.sqlite_eval:
        path = os.path.join(tmp, "eval.db")
        load = load_sqlite(path, args.events, at)
        evals.append(
            {
                "store": "sqlite",
                "events": args.events,
                "load_s": round(load, 1),
                **sqlite_bytes_per_event(path, args.events),
                **time_eval(path, at, tmp),
            }
        )
    print(f"\nevaluate: {args.events:,} events in the window, shape {_shape(args.events)}")
    keys = [
        "store",
        "events",
        "load_s",
        "heap_b",
        "index_b",
        "rows",
        "rows_s_first",
        "rows_s_median",
        "cli_s",
    ]
    c.table(keys, [[r.get(k) for k in keys] for r in evals])
    return {"evaluate": evals, "shape": _shape(args.events)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=10_000_000, help="stored events for the evaluate timing")
    ap.add_argument("--seconds", type=float, default=20.0, help="ingest duration per setup")
    ap.add_argument("--threads", type=int, default=10, help="concurrent agent threads")
    ap.add_argument("--records", type=int, default=200, help="records per batch")
    ap.add_argument(
        "--sqlite-eval", action="store_true", help="also time evaluate on SQLite with the same data"
    )
    ap.add_argument("--against", metavar="DIR", help="also run another checkout's collector, side by side")
    ap.add_argument("--rounds", type=int, help="ingest runs per setup and checkout (1; 3 with --against)")
    ap.add_argument("--ingest-only", action="store_true", help="skip the evaluate part")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = ap.parse_args()
    if args.rounds is None:
        args.rounds = 3 if args.against else 1
    if args.quick:
        args.events, args.seconds, args.threads, args.records = 20_000, 2.0, 4, 50
        args.sqlite_eval = True
    m = c.machine()
    c.print_machine(m)
    tmp = tempfile.mkdtemp(prefix="rw-pgbench-")
    doc: dict[str, Any] = {"bench": "pg_ingest", "machine": m, "quick": args.quick, "args": vars(args)}
    try:
        with pg.running(durable=True, settings={"max_wal_size": "'4GB'"}) as server:
            os.environ["PGPASSWORD"] = server.password  # children read it; never on a command line
            doc["postgres"] = os.path.basename(os.path.dirname(server.bindir))
            doc.update(ingest_all(server, tmp, args))
            if not args.ingest_only:
                doc.update(evaluate_all(server, tmp, args))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    c.emit(doc)


if __name__ == "__main__":
    main()
