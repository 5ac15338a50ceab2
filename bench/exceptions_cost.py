#!/usr/bin/env python3
"""What exceptions cost an evaluation (issue 14): ``evaluate`` at T with
``exceptions = none`` and with the recommended list, side by side on one
SQLite database, for a window where half the pairs are PHP session files
(pairs the list touches) and half are scripts (pairs it does not).

Timed in process, median of --runs: the first evaluation with exceptions
(every pair's globs matched) and the later ones (the continuous schedule's
case: the compiled set and its per-pair answers are kept across ticks)."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import replace

import _common as c

from agent.collector import evaluate as ev
from agent.collector import excepted
from agent.collector.storage.sqlite import CollectorStore
from agent.shared import wire
from agent.shared.recommended import RECOMMENDED
from agent.shared.rule import Rule

T = 1_790_000_000_000
EXE = b"/usr/sbin/php-fpm8.2"


def fill(store: CollectorStore, pairs: int) -> None:
    store.enroll("a", "web-01", "k", T)
    agent = store.agent_for_key("k")
    assert agent is not None
    seq = 0
    for lo in range(0, pairs, 5000):
        seq += 1
        events = tuple(
            wire.EventRecord(
                T - 1000 - j, "creation", EXE,
                b"/var/lib/php/sessions/sess_%08d" % j if j % 2 else b"/var/www/html/app/%08d.php" % j,
                {"pname": "php-fpm8.2", "uname": "www-data", "uid": "33"},
            )
            for j in range(lo, min(lo + 5000, pairs))
        )  # fmt: skip
        store.ingest(agent, wire.Batch(os.urandom(16).hex(), "e" * 32, seq, "a", "web-01", T, events), T)


def timed(store: CollectorStore, rule: Rule, runs: int) -> tuple[float, float, int]:
    """(first, median of the rest) seconds and the rows."""
    excepted._SETS.clear()
    times, rows = [], 0
    for _ in range(runs):
        t = time.perf_counter()
        rows = len(ev.evaluate(store, rule, T))
        times.append(time.perf_counter() - t)
    return times[0], c.median(times[1:]) or times[0], rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="1,000 pairs, 3 runs")
    a = ap.parse_args()
    sizes, runs = ([1000], 3) if a.quick else (a.pairs, a.runs)
    m = c.machine()
    c.print_machine(m)
    out = []
    for n in sizes:
        d = tempfile.mkdtemp(prefix="rw-exc-")
        try:
            store = CollectorStore(os.path.join(d, "c.db"))
            fill(store, n)
            none = timed(store, Rule(), runs)
            rec = timed(store, replace(Rule(), exceptions=RECOMMENDED), runs)
            store.close()
        finally:
            shutil.rmtree(d, ignore_errors=True)
        out.append({"pairs": n, "none_s": none[1], "recommended_first_s": rec[0], "recommended_s": rec[1],
                    "rows": [none[2], rec[2]]})  # fmt: skip
    c.table(
        ["pairs in window", "none s", "recommended, first s", "recommended, later s"],
        [[r["pairs"], r["none_s"], r["recommended_first_s"], r["recommended_s"]] for r in out],
    )
    c.emit({"bench": "exceptions_cost", "machine": m, "quick": a.quick, "sizes": out})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
