"""The part of bench/continuous_tick.py that runs under the checkout being
measured (this one or ``--against DIR``): it imports nothing from bench/
but this file, so ``agent`` is the checkout's."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import uuid
from typing import Any

H = 3_600_000
SETTLE_MS = 30_000
EXE = b"/usr/sbin/nginx"  # bench/pg_ingest.py's


def _new_events(rng: random.Random, shape: dict[str, int], n: int, t: int, k: int) -> list[Any]:
    from agent.shared import wire

    out = []
    for i in range(n):
        if rng.random() < 0.01:
            path = b"/var/www/new/%d-%d.php" % (k, i)
        elif rng.random() < 0.9:
            path = b"/var/www/p/%d" % rng.randint(1, shape["common"])
        else:
            path = b"/var/www/p/%d" % rng.randint(shape["common"] + 1, shape["pairs"])
        out.append(wire.EventRecord(t - rng.randrange(1000), "creation", EXE, path, {"pid": 7}))
    return out


def _ingest(store: Any, recs: dict[int, Any], events: list[Any], t: int, rng: random.Random, both: bool,
            seq: dict[int, int], epoch: str) -> None:  # fmt: skip
    from agent.collector import terms
    from agent.shared import wire
    from agent.shared.rule import Rule
    from agent.shared.rules import NewTermsRule

    rules = (Rule().rule_id, NewTermsRule().rule_id) if both else (Rule().rule_id,)
    for i in range(0, len(events), 200):
        chunk = tuple(sorted(events[i : i + 200], key=lambda e: e.ts))
        g = rng.choice(list(recs))
        seq[g] = seq.get(g, 0) + 1
        extra: dict[str, Any] = {}
        if both:
            extra = {"rules": rules, "event_rules": (3,) * len(chunk), "host_id": f"{g:032x}"}
        batch = wire.Batch(uuid.uuid4().hex, epoch, seq[g], f"agent-{g}", f"host-{g}", t, chunk, (), **extra)
        rb = wire.decode_rows(wire.encode_batch(batch))
        cands: Any = ()
        if both:
            rb, cands = terms.split(rb, Rule(), (NewTermsRule(),))
        assert store.ingest(recs[g], rb, t, cands) == "stored"


def _alert_every_row(store: Any, at: int) -> int:
    from dataclasses import replace

    from agent.collector import evaluate as ev
    from agent.shared.rule import Rule

    rule = Rule()
    rows = store.ranked_rows(replace(rule, limit=10**7), at)
    items = [
        (ev.alert_id(rule.rule_id, (r.row.executable, r.row.path), "seed"), (r.row.executable, r.row.path),
         at - 2000, r.first_ts, "{}", None)
        for r in rows
    ]  # fmt: skip
    for i in range(0, len(items), 5000):
        store.record_alerts(rule.rule_id, items[i : i + 5000])
    return len(items)


def drive(db: str, at: int, ticks: int, per_tick: int, shape: dict[str, int], both: bool) -> dict[str, Any]:
    """Alert every row, then ``ticks`` ticks with new events between them."""
    from agent.collector import evaluate as ev
    from agent.collector import fleet_rules
    from agent.collector.storage import open_store
    from agent.shared.rule import Rule
    from agent.shared.rules import NewTermsRule

    store = open_store(db)
    rng = random.Random(7)  # noqa: S311 - bench data
    recs = {
        g: store.agent_for_key(f"k{g}")
        for g in rng.sample(range(1, shape["agents"] + 1), min(200, shape["agents"]))
    }
    t0 = time.perf_counter()
    alerted = _alert_every_row(store, at)
    out: dict[str, Any] = {"alerted_before": alerted, "seed_s": round(time.perf_counter() - t0, 2)}
    rule, nt, seq, epoch = Rule(), NewTermsRule(), {}, uuid.uuid4().hex  # type: ignore[var-annotated]
    times, nt_times, raised = [], [], 0
    for k in range(ticks):
        t = at + (k + 1) * 1000
        _ingest(store, recs, _new_events(rng, shape, per_tick, t, k), t, rng, both, seq, epoch)
        t1 = time.perf_counter()
        raised += len(ev.run_continuous(store, rule, t, SETTLE_MS))
        times.append(time.perf_counter() - t1)
        if both:
            t1 = time.perf_counter()
            fleet_rules.run_new_terms(store, nt, t, t - 1000, 7 * 86_400_000)
            nt_times.append(time.perf_counter() - t1)
    store.close()
    rest = times[1:] or times
    out.update(
        first_tick_ms=round(1000 * times[0], 1),
        tick_ms_median=round(1000 * statistics.median(rest), 1),
        tick_ms_max=round(1000 * max(rest), 1),
        raised=raised,
    )
    if nt_times:
        out["new_terms_tick_ms_median"] = round(1000 * statistics.median(nt_times[1:] or nt_times), 1)
    return out


def make(db: str, at: int) -> None:
    from agent.collector.storage import open_store

    store = open_store(db)
    if hasattr(store, "ensure_partitions"):
        store.ensure_partitions({at // H + i for i in range(-2, 2)})
    store.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--make", metavar="DB")
    ap.add_argument("--db")
    ap.add_argument("--at", type=int)
    ap.add_argument("--ticks", type=int)
    ap.add_argument("--per-tick", type=int)
    ap.add_argument("--shape")
    ap.add_argument("--both-rules", action="store_true")
    args = ap.parse_args()
    if args.make:
        make(args.make, args.at)
        print(json.dumps({"made": True}))
    else:
        shape = json.loads(args.shape)
        print(json.dumps(drive(args.db, args.at, args.ticks, args.per_tick, shape, args.both_rules)))
