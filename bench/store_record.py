#!/usr/bin/env python3
"""The agent store's cost per matching event: ``AgentStore.record`` plus
``fill_facts``, in this process, on a fresh SQLite file in a temp dir.

What the sensor loop of a live agent does in a burst, without the kernel,
the resolver or the shipper: events come in slices (default 3,000, about
what one ``source.read`` returns in a burst), each slice goes to
``record()`` in one call, then ``fill_facts()`` runs (the facts function is
a stub returning fixed facts, so no file is read: this is the store's cost,
not the disk's). The fake clock moves with the events at ``--rate`` events/s,
so facts fall due one second after their event as they do live. After the
last slice the clock moves on and ``fill_facts`` runs until nothing waits.
The outbox is never shipped (as when the collector is slow): it grows to
the whole run.

Fleets (one agent, every event matching, all with full process detail):
  unique: N events, every one a new (exe, path) pair, so every one is
          detailed (default 110,000: the profiled live burst), named like
          bench/burst.py's files: numbered, in 97 directories;
  random: the same with random names (sess_<32 hex>, as PHP names its
          session files): no locality in the pair index at all;
  repeat: N events over P pairs (default 200) chosen at random, so after
          the first few times a pair goes on as bare count times.

Figures: wall microseconds per event for record(), for fill_facts() and
both, and the process CPU time of the run per event (steadier than wall time
on a shared machine, and what a profile of the agent's CPU counts); the run
with the median total of ``--rounds`` runs, each on a fresh file; the file
size at the end. ``--against DIR``
also times the ``agent`` package of another checkout (for example
``git worktree add /tmp/old-store HEAD``) in a child process with the same
arguments and prints both side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import _common as c

T0 = 1_795_780_800_000
FLEETS = ("unique", "random", "repeat")
EXES = [b"/usr/sbin/nginx", b"/usr/sbin/php-fpm8.2", b"/usr/sbin/apache2", b"/usr/bin/uwsgi"]


def make_events(fleet: str, n: int, pairs: int, rate: float, seed: int) -> list[Any]:
    from agent.shared.events import FileEvent, ProcessInfo, UserInfo

    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    procs = [
        ProcessInfo(
            pid=4000 + i,
            name=os.path.basename(exe).decode(),
            executable=exe,
            ppid=1000 + i,
            command_line=f"{os.path.basename(exe).decode()}: worker process -c /etc/www/{i}.conf",
            parent_name="systemd",
            parent_executable=b"/usr/lib/systemd/systemd",
        )
        for i, exe in enumerate(EXES)
    ]
    user = UserInfo("33", "www-data")
    out = []
    for i in range(n):
        if fleet == "random":
            k = i
            path = b"/var/lib/php/sessions/sess_%032x" % rng.getrandbits(128)
        else:
            k = i if fleet == "unique" else rng.randrange(pairs)
            path = b"/var/www/html/cache/%d/f%08d.php" % (k % 97, k)
        out.append(FileEvent(T0 + int(i * 1000 / rate), "creation", path, procs[k % len(procs)], user))
    return out


def run_once(events: list[Any], slice_n: int, rate: float, tmp: str) -> dict[str, Any]:
    from agent.sensor.outbox import AgentStore
    from agent.shared.clock import FakeClock
    from agent.shared.events import FileFacts
    from agent.shared.rule import Rule

    facts = FileFacts(29, 0o100644, 33, 33, "ab" * 32, b"<?php system($_GET['c']); ?>")
    clock = FakeClock(T0)
    path = os.path.join(tmp, "agent.db")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    store = AgentStore(path, Rule(), clock, facts=lambda _p: facts)
    t_record = t_fill = 0.0
    filled = 0
    pc = time.perf_counter
    cpu0 = time.process_time()
    for i in range(0, len(events), slice_n):
        chunk = events[i : i + slice_n]
        clock.advance(max(0, chunk[-1].ts_ms - clock.now_ms()) / 1000)
        t0 = pc()
        store.record(chunk)
        t1 = pc()
        filled += store.fill_facts()
        t_fill += pc() - t1
        t_record += t1 - t0
    clock.advance(2.0)
    t1 = pc()
    while True:
        got = store.fill_facts()
        if not got:
            break
        filled += got
    t_fill += pc() - t1
    cpu = time.process_time() - cpu0
    n = len(events)
    kinds = dict(store._db().execute("SELECT kind, count(*) FROM outbox GROUP BY kind").fetchall())
    depth = store.depth()
    store.close()
    size = sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s))
    return {
        "events": n,
        "record_us_per_event": t_record / n * 1e6,
        "fill_us_per_event": t_fill / n * 1e6,
        "total_us_per_event": (t_record + t_fill) / n * 1e6,
        "cpu_us_per_event": cpu / n * 1e6,
        "detailed": kinds.get(0, 0),
        "count_times": kinds.get(1, 0),
        "facts_filled": filled,
        "outbox_depth": depth,
        "file_mb": size / 1e6,
    }


def measure(a: argparse.Namespace) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="rw-store-")
    out: dict[str, Any] = {}
    try:
        for fleet in FLEETS:
            events = make_events(fleet, a.events, a.pairs, a.rate, seed=7)
            runs = [run_once(events, a.slice, a.rate, tmp) for _ in range(a.rounds)]
            best = sorted(runs, key=lambda r: r["total_us_per_event"])[len(runs) // 2]
            out[fleet] = {**best, "total_us_per_event_runs": [r["total_us_per_event"] for r in runs]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def child(a: argparse.Namespace, code: str) -> dict[str, Any]:
    argv = [sys.executable, os.path.abspath(__file__), "--code", code, "--events", str(a.events)]
    argv += ["--pairs", str(a.pairs), "--slice", str(a.slice), "--rate", str(a.rate)]
    argv += ["--rounds", str(a.rounds)]
    r = subprocess.run(argv, check=False, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"timing {code} failed: " + r.stderr[-2000:])
    doc: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return dict(doc["fleets"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=110_000, help="events per fleet (default 110,000)")
    ap.add_argument("--pairs", type=int, default=200, help="pairs of the repeat fleet (default 200)")
    ap.add_argument("--slice", type=int, default=3000, help="events per record() call (default 3,000)")
    ap.add_argument("--rate", type=float, default=20_000.0, help="event times per second (default 20,000)")
    ap.add_argument("--rounds", type=int, default=3, help="runs per fleet, the median is kept (default 3)")
    ap.add_argument("--code", metavar="DIR", help="time the agent package of this checkout instead")
    ap.add_argument("--against", metavar="DIR", help="also time another checkout's agent package")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test): 3,000 events, 1 round")
    a = ap.parse_args()
    if a.quick:
        a.events, a.rounds, a.slice = 3000, 1, 500
    if a.code:
        sys.path.insert(0, os.path.abspath(a.code))
    m = c.machine()
    c.print_machine(m)
    print(
        f"{a.events} events per fleet in slices of {a.slice}, {a.rate:.0f} events/s of event time, "
        f"median of {a.rounds} round(s)",
        flush=True,
    )
    fleets = measure(a)
    versions = {"this": fleets}
    if a.against:
        versions["against"] = child(a, a.against)
    rows = []
    for fleet in FLEETS:
        for name, got in versions.items():
            f = got[fleet]
            rows.append([fleet, name, f["events"], f["detailed"], f["count_times"], f["facts_filled"],
                         f["record_us_per_event"], f["fill_us_per_event"], f["total_us_per_event"],
                         f["cpu_us_per_event"], f["file_mb"]])  # fmt: skip
    c.table(
        ["fleet", "code", "events", "detailed", "count times", "facts", "record us/ev", "fill us/ev",
         "total us/ev", "cpu us/ev", "file MB"],
        rows,
    )  # fmt: skip
    if a.against:
        for fleet in FLEETS:
            new, old = fleets[fleet], versions["against"][fleet]
            cpu_new, cpu_old = new["cpu_us_per_event"], old["cpu_us_per_event"]
            print(
                f"{fleet}: against -> this: wall {old['total_us_per_event']:.2f} -> "
                f"{new['total_us_per_event']:.2f} us/event, CPU {cpu_old:.2f} -> {cpu_new:.2f} us/event "
                f"({cpu_old / cpu_new:.2f}x)"
            )
    c.emit(
        {
            "bench": "store_record",
            "machine": m,
            "quick": a.quick,
            "code": os.path.abspath(a.code) if a.code else c.ROOT,
            "events": a.events,
            "pairs": a.pairs,
            "slice": a.slice,
            "rate": a.rate,
            "rounds": a.rounds,
            "fleets": fleets,
            "against": versions.get("against"),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
