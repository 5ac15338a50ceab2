#!/usr/bin/env python3
"""``collector evaluate`` over 1,000,000 stored events in the window (issue 7: <= 1 s).

A collector SQLite database is filled through the store's own API
(``CollectorStore.ingest`` with ``wire.Batch`` objects, 10 agents, batches of
20,000 records), every event inside the hour ending at T. Two shapes:

  repeat: 1,000 pairs with ~1,000 events each, sent as count times (each pair
          by one agent), plus 50 rare pairs (1-4 detailed events, one agent):
          few rows (the 50 rare pairs);
  unique: 1,000,000 unique pairs, one detailed event each: every pair is a
          row (the rule keeps the first 100 by cc, exe, path);
  twice:  500,000 unique pairs, two detailed events each (one agent): every
          pair is a row with cc 2, none has cc 1, so the store cannot stop
          early and ranks every pair (its slowest case per event).

Timed per shape (median of --runs runs; the first run is reported apart as
"first"): the in-process ``CollectorStore.rows(rule, T)`` on a read-only store
with the rule's default limit (100) and with the limit raised to 1,000,000
(every row built), and the CLI's wall time for ``rarewrite collector
evaluate --db DB --at T`` (default limit; includes interpreter start and
imports, measured apart as ``rarewrite --help``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import subprocess
import tempfile
import time
from typing import Any

import _common as c

from agent.collector.storage.sqlite import CollectorStore
from agent.shared import wire
from agent.shared.rule import Rule
from tests.support import procs

HOUR = 3_600_000
EXE = b"/usr/sbin/php-fpm8.2"
DETAIL = {"etype": ["creation"], "attr": "exact", "pid": 4242, "pname": "php-fpm8.2", "uid": "33"}


def _batch(
    agent_id: str, host: str, epoch: str, seq: int, events: list[Any], counts: list[Any]
) -> wire.Batch:
    return wire.Batch(
        batch_id=os.urandom(16).hex(),
        epoch=epoch,
        seq=seq,
        agent_id=agent_id,
        host_name=host,
        sent_at=0,
        events=tuple(events),
        counts=tuple(counts),
    )


def fill(
    db: str, shape: str, total: int, at_ms: int, agents: int = 10, per_batch: int = 20_000
) -> dict[str, Any]:
    rng = random.Random(7)  # noqa: S311 - test data, not secrets
    store = CollectorStore(db)
    for i in range(agents):
        store.enroll(f"bench-agent-{i:02d}", f"web-{i:02d}", f"key-hash-{i}", 0)
    recs = {r.agent_id: r for r in store.list_agents()}
    ids = sorted(recs)
    epochs = {a: os.urandom(16).hex() for a in ids}
    seqs = dict.fromkeys(ids, 0)

    def when() -> int:
        return at_ms - rng.randint(0, HOUR - 1)  # in (T - 1 h, T]

    def send(aid: str, events: list[Any], counts: list[Any]) -> None:
        seqs[aid] += 1
        store.ingest(recs[aid], _batch(aid, recs[aid].host_name, epochs[aid], seqs[aid], events, counts), 0)

    t0 = time.perf_counter()
    stored = 0
    if shape == "repeat":
        n_rare = 50
        rare_events = 0
        for k in range(n_rare):
            aid = ids[k % agents]
            evs = [
                wire.EventRecord(when(), "creation", EXE, f"/var/www/html/rare-{k:03d}.php".encode(), DETAIL)
                for _ in range(1 + k % 4)
            ]
            rare_events += len(evs)
            send(aid, evs, [])
        stored += rare_events
        n_pairs = 1000
        per_pair = (total - rare_events) // n_pairs
        extra = (total - rare_events) - per_pair * n_pairs
        counts_by_agent: dict[str, list[wire.CountRecord]] = {a: [] for a in ids}
        for p in range(n_pairs):
            m = per_pair + (1 if p < extra else 0)
            path = f"/var/www/html/cache/page-{p:04d}.html".encode()
            counts_by_agent[ids[p % agents]].append(
                wire.CountRecord(EXE, path, tuple(sorted(when() for _ in range(m))))
            )
        for aid, cs in counts_by_agent.items():
            chunk: list[wire.CountRecord] = []
            size = 0
            for cr in cs:
                chunk.append(cr)
                size += len(cr.times)
                if size >= per_batch:
                    send(aid, [], chunk)
                    stored += size
                    chunk, size = [], 0
            if chunk:
                send(aid, [], chunk)
                stored += size
        rows_expected = n_rare
    else:  # unique: one event per pair; twice: two events per pair, so no pair has count 1
        copies = 2 if shape == "twice" else 1
        n_pairs, per = total // copies, per_batch // copies
        k = 0
        while k < n_pairs:
            aid = ids[(k // per) % agents]
            n = min(per, n_pairs - k)
            evs = [
                wire.EventRecord(
                    when(),
                    "creation",
                    EXE,
                    f"/var/www/{aid}/up/{(k + j) // 1000:04d}/f{k + j:07d}.php".encode(),
                    DETAIL,
                )
                for j in range(n)
                for _ in range(copies)
            ]
            send(aid, evs, [])
            k += n
        stored = copies * n_pairs
        rows_expected = n_pairs
    fill_s = time.perf_counter() - t0
    store.close()
    return {"events": stored, "fill_s": fill_s, "rows_qualifying": rows_expected}


def time_rows(db: str, at_ms: int, limit: int, runs: int) -> dict[str, Any]:
    rule = dataclasses.replace(Rule(), limit=limit)
    times, n = [], 0
    for _ in range(runs):
        store = CollectorStore(db, readonly=True)
        t0 = time.perf_counter()
        n = len(store.rows(rule, at_ms))
        times.append(time.perf_counter() - t0)
        store.close()
    return {"first_s": times[0], "median_s": c.median(times[1:] or times), "runs_s": times, "rows": n}


def time_cli(args: list[str], runs: int) -> dict[str, Any]:
    times, lines = [], 0
    env = {**os.environ, "RAREWRITE_ENROLLMENT_SECRET": procs.SECRET}
    for _ in range(runs):
        t0 = time.perf_counter()
        r = subprocess.run([*procs.RAREWRITE, *args], capture_output=True, text=True, env=env, check=False)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise RuntimeError(f"{args}: {r.stderr[-2000:]}")
        lines = len([x for x in r.stdout.splitlines() if x.strip()])
    return {"first_s": times[0], "median_s": c.median(times[1:] or times), "runs_s": times, "rows": lines}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000, help="events in the window (default 1,000,000)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per figure (default 5)")
    ap.add_argument("--shapes", default="repeat,unique,twice", help="comma list of repeat, unique, twice")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test): 20,000 events, 2 runs")
    a = ap.parse_args()
    if a.quick:
        a.events, a.runs = 20_000, 2
    m = c.machine()
    c.print_machine(m)
    tmp = tempfile.mkdtemp(prefix="rw-evalscale-")
    at_ms = (int(time.time()) // 60) * 60_000
    at = c.iso_ms(at_ms)
    shapes: dict[str, Any] = {}
    try:
        startup = time_cli(["--help"], a.runs)
        for shape in a.shapes.split(","):
            db = os.path.join(tmp, f"{shape}.db")
            f = fill(db, shape, a.events, at_ms)
            print(f"  {shape}: {f['events']} events stored in {f['fill_s']:.1f} s", flush=True)
            size_mb = sum(os.path.getsize(p) for p in (db, db + "-wal") if os.path.exists(p)) / 1e6
            shapes[shape] = {
                **f,
                "db_mb": size_mb,
                "rows_limit100": time_rows(db, at_ms, 100, a.runs),
                "rows_all": time_rows(db, at_ms, 1_000_000, max(2, a.runs // 2 + 1)),
                "cli": time_cli(["collector", "evaluate", "--db", db, "--at", at], a.runs),
            }
            os.unlink(db)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"collector evaluate over {a.events} events in the window ending at {at}; median of {a.runs} runs")
    c.table(
        ["shape", "events", "pairs rare", "db MB", "fill s", "rows() s (limit 100)", "first", "rows",
         "rows() s (all rows)", "rows", "CLI wall s", "first", "CLI rows"],
        [[s, v["events"], v["rows_qualifying"], v["db_mb"], v["fill_s"], v["rows_limit100"]["median_s"],
          v["rows_limit100"]["first_s"], v["rows_limit100"]["rows"], v["rows_all"]["median_s"],
          v["rows_all"]["rows"], v["cli"]["median_s"], v["cli"]["first_s"], v["cli"]["rows"]]
         for s, v in shapes.items()],
    )  # fmt: skip
    print(f"CLI start-up alone (rarewrite --help): {startup['median_s']:.3f} s; target <= 1 s per evaluate")
    c.emit(
        {
            "bench": "evaluate_scale",
            "machine": m,
            "quick": a.quick,
            "events": a.events,
            "at": at,
            "cli_startup_s": startup["median_s"],
            "shapes": shapes,
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
