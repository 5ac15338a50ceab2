#!/usr/bin/env python3
"""The continuous schedule's tick, and ``collector evaluate``, as the window grows (issue 18).

Per store (SQLite, PostgreSQL) and window size (``--sizes``, events in the
hour before T; the shape of bench/pg_ingest.py: 1/20 as many pairs, 90% of
events on the common tenth of them, up to 10,000 agents): the events are
bulk-loaded, then every row of the window is recorded as alerted (the steady
state of a fleet whose rare writes were alerted as they came). Then, one
simulated second apart, ``--ticks`` times: ``--per-tick`` new events are
ingested through ``Store.ingest`` (batches of 200 from random agents, 1% on
new pairs) and one continuous tick of the rule runs (``run_continuous``,
settle 30 s), timed. The first tick has no state to work from (it ranks the
whole window, as every tick did before); the rest work from the changes.

``collector evaluate`` at T (the CLI process, default limit) is timed once per
store and size.

``--against DIR`` runs the same steps with another checkout's code (for
example ``git worktree add -f /tmp/rw-old 50e840f``) on its own copy of the
data, alternating with this one's: its schema, its ticks. ``--both-rules``
tags the new events for the new-terms rule too and times its tick beside.

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Optional

import _common as c

H = 3_600_000
EXE = b"/usr/sbin/nginx"  # bench/pg_ingest.py's
SETTLE_MS = 30_000
HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------ the parent


def _under(code: Optional[str], *args: str) -> dict[str, Any]:
    """bench/_tick_driver.py under checkout ``code`` (None: this one)."""
    root = code or os.path.dirname(HERE)
    boot = "import sys; sys.path[:0] = sys.argv[1:3]; del sys.argv[1:3]; import _tick_driver as d; d.main()"
    r = subprocess.run(
        [sys.executable, "-c", boot, root, HERE, *args],
        capture_output=True, text=True, check=False, cwd=root,
    )  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"driver under {root} failed: {r.stderr[-3000:]}")
    return dict(json.loads(r.stdout.splitlines()[-1]))


def _load(kind: str, db: str, n: int, at: int) -> float:
    """Bulk-load the window into a store ``_under`` just created."""
    import pg_ingest  # the parent's only: the driver may run another checkout

    if kind == "sqlite":
        return pg_ingest.load_sqlite(db, n, at, create=False)
    return pg_ingest.load_pg(db, n, at, create=False)


def _cli_evaluate(code: Optional[str], db: str, at: int, tmp: str) -> float:
    env = dict(os.environ)
    root = code or os.path.dirname(HERE)
    env["PYTHONPATH"] = root
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "collector", "evaluate", "--db", db, "--at", c.iso_ms(at)],
        env=env, capture_output=True, text=True, check=False, cwd=tmp,
    )  # fmt: skip
    took = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError("evaluate failed: " + r.stderr[-2000:])
    return took


def one(
    kind: str, code: Optional[str], n: int, args: argparse.Namespace, server: Any, tmp: str
) -> dict[str, Any]:
    at = (int(time.time() * 1000) // H) * H + H // 2
    name = f"w{uuid.uuid4().hex[:8]}"
    db = os.path.join(tmp, name + ".db") if kind == "sqlite" else server.url(server.create_db(name), False)
    shape = _shape(n)
    try:
        _under(code, "--make", db, "--at", str(at))
        load_s = _load(kind, db, n, at)
        cli_s = _cli_evaluate(code, db, at, tmp)
        both = ["--both-rules"] if args.both_rules else []
        got = _under(code, "--db", db, "--at", str(at), "--ticks", str(args.ticks),
                     "--per-tick", str(args.per_tick), "--shape", json.dumps(shape), *both)  # fmt: skip
    finally:
        if kind == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                with __import__("contextlib").suppress(FileNotFoundError):
                    os.unlink(db + suffix)
        else:
            server.drop_db(name)
    return {"store": kind, "code": "before" if code else "this", "events": n, "pairs": shape["pairs"],
            "load_s": round(load_s, 1), "evaluate_cli_s": round(cli_s, 2), **got}  # fmt: skip


def _shape(n: int) -> dict[str, int]:
    import pg_ingest

    return pg_ingest._shape(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--sizes", default="1000000,3000000,10000000", help="events in the window, comma-separated"
    )
    ap.add_argument("--ticks", type=int, default=12, help="ticks per run (the first ranks the whole window)")
    ap.add_argument("--per-tick", type=int, default=2800, help="new events between ticks (10 M/h: 2,778/s)")
    ap.add_argument("--stores", default="sqlite,postgresql")
    ap.add_argument("--against", metavar="DIR", help="also run another checkout's code, side by side")
    ap.add_argument("--both-rules", action="store_true", help="new events for the new-terms rule too")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.ticks, args.per_tick = "20000,40000", 3, 200
    sizes = [int(x) for x in args.sizes.split(",")]
    m = c.machine()
    c.print_machine(m)
    doc: dict[str, Any] = {"bench": "continuous_tick", "machine": m, "quick": args.quick, "args": vars(args)}
    runs = []
    from tests.support import pg

    tmp = tempfile.mkdtemp(prefix="rw-tick-")
    codes: list[Optional[str]] = [None, os.path.abspath(args.against)] if args.against else [None]
    try:
        with pg.running(durable=True, settings={"max_wal_size": "'4GB'"}) as server:
            os.environ["PGPASSWORD"] = server.password  # children read it; never on a command line
            for kind in args.stores.split(","):
                for n in sizes:
                    for code in codes if n % 2 == 0 else codes[::-1]:  # alternate who goes first
                        runs.append(one(kind, code, n, args, server, tmp))
                        print(json.dumps(runs[-1]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    keys = ["store", "code", "events", "pairs", "alerted_before", "evaluate_cli_s", "first_tick_ms",
            "tick_ms_median", "tick_ms_max", "new_terms_tick_ms_median"]  # fmt: skip
    print(f"\n{args.ticks} ticks, {args.per_tick} new events before each")
    c.table(keys, [[r.get(k) for k in keys] for r in runs])
    doc["runs"] = runs
    c.emit(doc)


if __name__ == "__main__":
    main()
