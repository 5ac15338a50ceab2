#!/usr/bin/env python3
"""What the second and third rules cost (issue 15): the first rule alone
against all three on (the new-terms rule keeping its history at ingest, the
outbreak rule reading it), side by side in one run on this machine.

- Agent: ``RuleSet.mask`` per event (the rules' predicates; the agent's
  added work per matching event), first rule alone vs all rules.
- Collector ingest: the same batches (A agents x B batches x R records:
  ~80 % detailed events, ~20 % count times of repeating pairs; every record
  matches both rules) through ``decode_rows``, ``terms.split`` and
  ``CollectorStore.ingest`` in this process, each configuration on a fresh
  SQLite database holding the day before (the same paths: the history the
  new-terms rule looks each event up in), alternating, median of
  ``--runs``: records/s of today's batches, where one event in 50 is a path
  never seen before (one in 20 of those on every agent: outbreaks).
  Database size after ingest, before any alert.
- Evaluate: ``collector evaluate`` of each rule at T over the filled store
  (the first rule's rows; the new-terms events of (T - 9 min, T]; the
  outbreak rows), and one tick of the continuous loop for the two new rules:
  the first (every new event of the 10 minutes alerted at once: the cost per
  alert) and the next (its overlap remembered: what every second costs).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Sequence
from typing import Any, Optional, Union

import _common as c

from agent.collector import evaluate as ev
from agent.collector import fleet_rules, terms
from agent.collector.storage.sqlite import CollectorStore
from agent.shared import wire
from agent.shared.events import FileEvent, ProcessInfo, UserInfo
from agent.shared.rule import Rule
from agent.shared.rules import NewTermsRule, OutbreakRule, RuleSet

T = 1_790_000_000_000
DAY = 86_400_000
RETENTION = 2 * 3_600_000
EXE = b"/usr/sbin/php-fpm8.2"
DETAIL = {
    "etype": ["creation"],
    "attr": "exact",
    "pid": 4242,
    "pname": "php-fpm8.2",
    "uid": "33",
    "uname": "www-data",
}
Others = Sequence[Union[NewTermsRule, OutbreakRule]]


def batches(
    agents: int, n: int, records: int, both: bool, end_ms: int, new_every: int = 0
) -> list[tuple[str, list[bytes]]]:
    """Per agent, its encoded batches over the 10 minutes before ``end_ms``;
    ``both``: tagged for both rules (else the first alone). Each agent
    writes the same paths every day; with ``new_every`` one event in that
    many is a path never written before (one in 20 of those on every agent
    at once: an outbreak)."""
    rules = (Rule().rule_id, NewTermsRule().rule_id) if both else (Rule().rule_id,)
    mask = 3 if both else 1
    out = []
    for a in range(agents):
        rng = random.Random(a)  # noqa: S311 - bench data
        epoch, bodies, k = uuid.uuid4().hex, [], 0
        for b in range(n):
            lo = end_ms - 600_000 + b * (600_000 // n)
            events = []
            for _ in range(round(records * 0.8)):
                k += 1
                events.append(
                    wire.EventRecord(
                        lo + rng.randrange(600_000 // n), "creation", EXE, _path(a, k, new_every), DETAIL
                    )
                )
            events.sort(key=lambda e: e.ts)
            counts = tuple(
                wire.CountRecord(
                    EXE, b"/var/www/html/cache/c%02d.php" % j, tuple(range(lo, lo + records // 100))
                )
                for j in range(20)
            )
            batch = wire.Batch(
                uuid.uuid4().hex, epoch, b + 1, f"agent-{a}", f"web-{a:03d}", end_ms, tuple(events), counts,
                rules=rules, event_rules=(mask,) * len(events), count_rules=(mask,) * len(counts),
                host_id=f"{a:032x}",
            )  # fmt: skip
            bodies.append(wire.encode_batch(batch))
        out.append((f"agent-{a}", bodies))
    return out


def _path(agent: int, k: int, new_every: int) -> bytes:
    if not new_every or k % new_every:
        return b"/var/www/web-%03d/up/%07d.php" % (agent, k)  # written every day
    if k % (new_every * 20) == 0:
        return b"/var/www/html/wp-%07d.php" % k  # new, on every agent
    return b"/var/www/web-%03d/new/%07d.php" % (agent, k)


def ingest(
    folder: str, seed: list[tuple[str, list[bytes]]], data: list[tuple[str, list[bytes]]], others: Others
) -> tuple[CollectorStore, float, int]:
    """A fresh store holding yesterday's ``seed``, then ``data`` (timed):
    (store, seconds, records of data)."""
    store = CollectorStore(os.path.join(folder, f"c-{uuid.uuid4().hex[:8]}.db"))
    recs = []
    for agent_id, _ in data:
        store.enroll(agent_id, agent_id.replace("agent", "web"), "k-" + agent_id, T - DAY)
        recs.append(store.agent_for_key("k-" + agent_id))
    _fill(store, recs, seed, others, T - DAY)
    t = time.perf_counter()
    records = _fill(store, recs, data, others, T)
    return store, time.perf_counter() - t, records


def _fill(
    store: CollectorStore, recs: list[Any], data: list[tuple[str, list[bytes]]], others: Others, now: int
) -> int:
    records = 0
    for rounds in zip(*(bodies for _, bodies in data)):  # agents interleaved, as they arrive
        for rec, body in zip(recs, rounds):
            rb = wire.decode_rows(body)
            records += rb.events_total()
            rb, cands = terms.split(rb, Rule(), others)
            assert store.ingest(rec, rb, now, cands) == "stored"
    return records


def history_bytes_per_pair(path: str) -> Optional[float]:
    """The new-terms history (terms and its index) per combination kept,
    where this SQLite has the dbstat table (None where it has not)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        try:
            (size,) = db.execute(
                "SELECT sum(pgsize) FROM dbstat WHERE name IN ('terms', 'terms_last')"
            ).fetchone()
        except sqlite3.OperationalError:
            return None
        (n,) = db.execute("SELECT count(*) FROM terms").fetchone()
    return size / n if n else None


def _db_bytes(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


def timed(fn: Any, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(c.median(times) or 0.0)


def agent_mask_us(n: int) -> tuple[float, float]:
    ext, name = (b"php", b"jpg", b"js"), ("php-fpm8.2", "nginx", "node")
    events = [
        FileEvent(T, "creation", b"/var/www/html/uploads/%d.%s" % (i, ext[i % 3]),
                  ProcessInfo(1, name[i % 3], b"/usr/sbin/x"), UserInfo("33", "www-data"))
        for i in range(n)
    ]  # fmt: skip
    out = []
    for rs in (RuleSet(Rule()), RuleSet(Rule(), (NewTermsRule(), OutbreakRule()))):
        out.append(timed(lambda rs=rs: [rs.mask(e) for e in events]) / n * 1e6)
    return out[0], out[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--agents", type=int, default=20)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="3 agents x 2 batches x 200 records, 1 run")
    a = ap.parse_args()
    if a.quick:
        a.agents, a.batches, a.records, a.runs = 3, 2, 200, 1
    m = c.machine()
    c.print_machine(m)
    nt, ob = NewTermsRule(), OutbreakRule()
    data = {
        both: (
            batches(a.agents, a.batches, a.records, both, T - DAY),
            batches(a.agents, a.batches, a.records, both, T, 50),
        )
        for both in (False, True)
    }
    folder = tempfile.mkdtemp(prefix="rw-rules-")
    try:
        rates: dict[str, list[float]] = {"first": [], "all": []}
        for _ in range(a.runs):  # alternating: the machine's noise falls on both
            for name, both, others in (("first", False, ()), ("all", True, (nt, ob))):
                store, secs, total = ingest(folder, *data[both], others)
                rates[name].append(total / secs)
                if name == "first":
                    first_store = store
                else:
                    all_store = store
        sizes = {n: _db_bytes(s.path) for n, s in (("first", first_store), ("all", all_store))}
        per_pair = history_bytes_per_pair(all_store.path)
        ev_first = timed(lambda: ev.evaluate(first_store, Rule(), T))
        ev_first_all = timed(lambda: ev.evaluate(all_store, Rule(), T))
        ev_nt = timed(lambda: fleet_rules.new_terms_rows(all_store, nt, T))
        ev_ob = timed(lambda: fleet_rules.outbreak_rows(all_store, ob, nt, T))
        hits = len(fleet_rules.new_terms_rows(all_store, nt, T))
        outbreaks = len(fleet_rules.outbreak_rows(all_store, ob, nt, T))

        memory: dict[str, int] = {}  # the alerts of the overlap, as fleet_rules_loop keeps them

        def tick() -> int:
            raised = fleet_rules.run_new_terms(all_store, nt, T + 1000, T - 60_000, RETENTION, memory)
            return len(raised) + len(fleet_rules.run_outbreak(all_store, ob, nt, T + 1000))

        t = time.perf_counter()
        raised = tick()
        tick_first = time.perf_counter() - t
        tick_idle = timed(tick)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    mask_first, mask_all = agent_mask_us(2000 if a.quick else 200_000)
    r_first, r_all = c.median(rates["first"]) or 0, c.median(rates["all"]) or 0
    doc = {
        "bench": "rules_cost", "machine": m, "quick": a.quick,
        "agents": a.agents, "records": total,
        "agent_mask_us": {"first": mask_first, "all": mask_all},
        "ingest_records_per_s": {"first": r_first, "all": r_all, "ratio": r_all / r_first},
        "db_bytes": sizes, "history_bytes_per_pair": per_pair,
        "evaluate_s": {"first_rule_alone": ev_first, "first_rule_all_on": ev_first_all,
                       "new_terms": ev_nt, "outbreak": ev_ob},
        "new_terms_hits": hits, "outbreak_rows": outbreaks,
        "tick_s": {"first": tick_first, "idle": tick_idle, "alerts": raised},
    }  # fmt: skip
    c.table(
        ["", "first rule alone", "all rules on", "ratio"],
        [
            ["agent: mask per event, us", mask_first, mask_all, mask_all / mask_first],
            ["collector ingest, records/s", r_first, r_all, doc["ingest_records_per_s"]["ratio"]],
            ["database, MB", sizes["first"] / 1e6, sizes["all"] / 1e6, sizes["all"] / sizes["first"]],
            ["evaluate first rule, s", ev_first, ev_first_all, ev_first_all / ev_first if ev_first else None],
        ],
    )
    print(f"evaluate new-terms {ev_nt:.4f}s ({hits} events), outbreak {ev_ob:.4f}s ({outbreaks} rows); "
          f"tick: first {tick_first:.3f}s ({raised} alerts), idle {tick_idle:.4f}s; "
          f"history {per_pair or 0:.0f} B per combination")  # fmt: skip
    c.emit(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
