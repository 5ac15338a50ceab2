#!/usr/bin/env python3
"""Collector ingest (issue 7): matching events/s from 10 concurrent agents over HTTP.

One ``rarewrite collector serve`` with its default store (SQLite, WAL,
synchronous=FULL) on loopback. N agents (default 10) enroll through
``POST /api/v1/enroll``; each gets B batches (default 20) of R records
(default 5,000, the agent's ``batch_max_records``) built directly with
``agent/wire.py`` and encoded BEFORE the clock starts. The mix per batch
(realistic for a burst): ~80 % detailed events of unique pairs (exe, path,
pid, ppid, names, command line, uid, file facts with sha256: ~200 B each on
the wire, like a live agent's) and ~20 % count times of ~20 repeating pairs
per agent. N threads, one ``requests.Session`` each, POST their batches one
after another (what an agent's shipper does: one request in flight).

Figures: events committed per second = events of batches answered 2xx with
``{"status": "stored"}`` / wall time from the first POST to the last answer
(a 429/503 is retried after its Retry-After and is not counted until it is
stored); the events table is counted afterwards and must match. Collector
RSS: VmRSS sampled every 50 ms during the run (max), VmHWM, and VmRSS 2 s
after the last answer. Also, for scale: the same batches through
``CollectorStore.ingest`` in this process (no HTTP, no decode), one thread,
on a fresh database: the store's own ceiling.

``--profile FILE`` also records the collector with py-spy (raw collapsed
stacks to FILE) and prints the functions with the most samples.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

import _common as c
import requests

from agent.shared import wire
from tests.support import procs

HOUR = 3_600_000
EXES = [b"/usr/sbin/nginx", b"/usr/sbin/php-fpm8.2", b"/usr/sbin/apache2", b"/usr/bin/uwsgi"]
PNAMES = {e: e.rsplit(b"/", 1)[1].decode() for e in EXES}


def make_batches(
    agent_id: str,
    host: str,
    n_batches: int,
    records: int,
    now_ms: int,
    seed: int,
    unique_share: float = 0.8,
    repeat_pairs: int = 20,
) -> list[wire.Batch]:
    """``n_batches`` batches of ``records`` records each for one agent: detailed
    events of unique pairs (``unique_share``) and count times of a few
    repeating pairs (the rest). Times in agent order, as a live agent ships
    them: batch b holds times from the b-th of n_batches equal slices of the
    hour ending at now_ms, sorted."""
    rng = random.Random(seed)  # noqa: S311 - test data
    epoch = uuid.UUID(int=rng.getrandbits(128)).hex
    exe = EXES[seed % len(EXES)]
    pname = PNAMES[exe]
    n_detail = round(records * unique_share)
    n_count = records - n_detail
    out = []
    k = 0
    width = max(1, (HOUR - 2) // n_batches)
    for b in range(n_batches):
        lo = now_ms - HOUR + 1 + b * width

        def when() -> int:
            return lo + rng.randrange(width)  # noqa: B023 - used within this iteration only

        events = []
        for _ in range(n_detail):
            k += 1
            path = f"/var/www/{host}/uploads/{k // 100:05d}/f{k:07d}.php".encode()
            pid = 1000 + k % 30000
            events.append(
                wire.EventRecord(
                    ts=when(),
                    action="creation" if k % 10 else "rename",
                    exe=exe,
                    path=path,
                    detail={
                        "etype": ["creation"] if k % 10 else ["change"],
                        "attr": "exact",
                        "pid": pid,
                        "ppid": 900,
                        "pname": pname,
                        "cmd": f"{pname}: pool www",
                        "uid": "33",
                        "uname": "www-data",
                        "ppname": pname,
                        "ppexe": exe,
                        "file": {
                            "size": 9,
                            "mode": 0o100644,
                            "uid": 33,
                            "gid": 33,
                            "sha256": hashlib.sha256(path).hexdigest(),
                        },
                    },
                )
            )
        counts = []
        per = max(1, n_count // repeat_pairs)
        left = n_count
        j = 0
        while left > 0:
            m = min(per, left)
            times = tuple(sorted(when() for _ in range(m)))
            counts.append(wire.CountRecord(exe, f"/var/www/{host}/cache/c{j:03d}.php".encode(), times))
            left -= m
            j += 1
        out.append(
            wire.Batch(
                batch_id=uuid.UUID(int=rng.getrandbits(128)).hex,
                epoch=epoch,
                seq=b + 1,
                agent_id=agent_id,
                host_name=host,
                sent_at=now_ms,
                events=tuple(sorted(events, key=lambda e: e.ts)),
                counts=tuple(counts),
            )
        )
    return out


def family(pid: int) -> list[int]:
    """``pid`` and its child processes (the collector's decoding worker)."""
    out = [pid]
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", encoding="ascii", errors="replace") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                continue
    return out


def rss_kb(pids: list[int], key: str = "VmRSS") -> int:
    return sum(c.proc_rss_kb(p, key) for p in pids)


def cpu_s(pids: list[int]) -> float:
    return sum(c.proc_cpu_s(p) for p in pids)


class Sampler(threading.Thread):
    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids, self.max_kb, self.samples, self.stop = pids, 0, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.max_kb = max(self.max_kb, rss_kb(self.pids))
                self.samples += 1
            except OSError:
                return
            self.stop.wait(0.05)


def enroll(url: str, agent_id: str, host: str) -> str:
    r = requests.post(
        url + "/api/v1/enroll",
        json={"enrollment_secret": procs.SECRET, "agent_id": agent_id, "host_name": host},
        timeout=30,
    )
    r.raise_for_status()
    return str(r.json()["api_key"])


def post_all(url: str, key: str, bodies: list[tuple[bytes, int]], out: dict[str, Any]) -> None:
    """One agent's shipper: POST each body until it is answered 2xx."""
    s = requests.Session()
    s.headers.update({"Authorization": f"Bearer {key}", "Content-Type": "application/msgpack"})
    statuses: collections.Counter[int] = collections.Counter()
    stored = events = 0
    latencies = []
    for body, n in bodies:
        while True:
            t0 = time.perf_counter()
            r = s.post(url + "/api/v1/batches", data=body, timeout=120)
            latencies.append(time.perf_counter() - t0)
            statuses[r.status_code] += 1
            if 200 <= r.status_code < 300:
                if r.json().get("status") == "stored":
                    stored += 1
                    events += n
                break
            if r.status_code in (429, 503):
                time.sleep(float(r.headers.get("Retry-After", "1")))
                continue
            out["error"] = f"HTTP {r.status_code}: {r.text[:200]}"
            break
    out.update(
        {
            "statuses": dict(statuses),
            "batches_stored": stored,
            "events": events,
            "latency_median_s": c.median(latencies),
            "latency_max_s": max(latencies) if latencies else None,
            "t_end": time.perf_counter(),
        }
    )
    s.close()


def in_process(tmp: str, agents: list[dict[str, Any]]) -> dict[str, Any]:
    """The same batches straight into CollectorStore.ingest, one thread, fresh db:
    as the server's writer gets them (``wire.decode_rows`` of each body, decoded
    before the clock starts); then ``wire.decode_rows`` alone (the worker's part)."""
    from agent.collector.storage.sqlite import CollectorStore

    db = os.path.join(tmp, "inproc.db")
    store = CollectorStore(db)
    try:
        recs = []
        for i, a in enumerate(agents):
            store.enroll(a["agent_id"], a["host"], f"key-hash-{i}", 0)
        by_id = {r.agent_id: r for r in store.list_agents()}
        events = 0
        rows = [(by_id[a["agent_id"]], wire.decode_rows(body)) for a in agents for body, _ in a["bodies"]]
        t0 = time.perf_counter()
        for rec, rb in rows:
            store.ingest(rec, rb, 0)
            events += rb.size()
        del rows
        dt = time.perf_counter() - t0
        recs.append(dt)
    finally:
        store.close()
    t1 = time.perf_counter()
    decoded = 0
    for a in agents:
        for body, _ in a["bodies"]:
            wire.decode_rows(body)
            decoded += 1
    dec = time.perf_counter() - t1
    return {
        "events": events,
        "seconds": dt,
        "events_per_s": events / dt,
        "decode_s": dec,
        "decode_events_per_s": events / dec,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=10, help="concurrent agents (default 10)")
    ap.add_argument("--batches", type=int, default=20, help="batches per agent (default 20)")
    ap.add_argument("--records", type=int, default=5000, help="records per batch (default 5,000)")
    ap.add_argument("--unique-share", type=float, default=0.8, help="detailed unique-pair share (0.8)")
    ap.add_argument("--profile", metavar="FILE", help="py-spy the collector, raw stacks to FILE")
    ap.add_argument("--no-inproc", action="store_true", help="skip the in-process store.ingest figure")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test): 3 agents x 2 x 500")
    a = ap.parse_args()
    if a.quick:
        a.agents, a.batches, a.records = 3, 2, 500
    m = c.machine()
    c.print_machine(m)
    tmp = tempfile.mkdtemp(prefix="rw-ingest-")
    now = int(time.time() * 1000)
    agents: list[dict[str, Any]] = []
    t_gen = time.perf_counter()
    for i in range(a.agents):
        aid, host = f"bench-agent-{i:02d}", f"web-{i:02d}"
        batches = make_batches(aid, host, a.batches, a.records, now, seed=i, unique_share=a.unique_share)
        bodies = [(wire.encode_batch(b), b.size()) for b in batches]
        agents.append({"agent_id": aid, "host": host, "batches": batches, "bodies": bodies})
    gen_s = time.perf_counter() - t_gen
    total_events = sum(n for ag in agents for _, n in ag["bodies"])
    body_bytes = sum(len(b) for ag in agents for b, _ in ag["bodies"])
    detail_events = sum(len(b.events) for ag in agents for b in ag["batches"])
    print(
        f"{a.agents} agents x {a.batches} batches x {a.records} records = {total_events} events "
        f"({detail_events} detailed, {total_events - detail_events} count times), "
        f"{body_bytes / total_events:.1f} body B/event, generated in {gen_s:.1f} s",
        flush=True,
    )
    spy = None
    result: dict[str, Any] = {}
    try:
        with procs.collector(tmp) as col:
            pid = col.proc.pid
            for ag in agents:
                ag["key"] = enroll(col.url, ag["agent_id"], ag["host"])
            pids = family(pid)  # the collector and its decoding worker: RSS and CPU of both
            rss_idle = rss_kb(pids)
            if a.profile:
                spy = subprocess.Popen(
                    [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "--pid", str(pid),
                     "--rate", "200", "--format", "raw", "--output", a.profile, "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                time.sleep(1.0)
            sampler = Sampler(pids)
            sampler.start()
            cpu0 = cpu_s(pids)
            outs: list[dict[str, Any]] = [{} for _ in agents]
            threads = [
                threading.Thread(target=post_all, args=(col.url, ag["key"], ag["bodies"], out))
                for ag, out in zip(agents, outs)
            ]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = max(o["t_end"] for o in outs) - t0
            cpu1 = cpu_s(pids)
            sampler.stop.set()
            sampler.join()
            if spy is not None:
                spy.send_signal(2)
                spy.wait(30)
            hwm = rss_kb(pids, "VmHWM")
            time.sleep(2)
            rss_after = rss_kb(pids)
            errors = [o["error"] for o in outs if "error" in o]
            with sqlite3.connect(f"file:{col.db}?mode=ro", uri=True) as db:
                stored_rows = db.execute("SELECT count(*) FROM events").fetchone()[0]
        committed = sum(o["events"] for o in outs)
        statuses: collections.Counter[int] = collections.Counter()
        for o in outs:
            statuses.update(o["statuses"])
        result = {
            "events_sent": total_events,
            "events_committed": committed,
            "events_in_db": stored_rows,
            "wall_s": wall,
            "events_per_s": committed / wall,
            "batches_per_s": sum(o["batches_stored"] for o in outs) / wall,
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "errors": errors,
            "latency_median_s": c.median([o["latency_median_s"] for o in outs]),
            "latency_max_s": max(o["latency_max_s"] for o in outs),
            "collector_cpu_s": cpu1 - cpu0,
            "collector_cpu_us_per_event": (cpu1 - cpu0) / max(1, committed) * 1e6,
            "collector_processes": len(pids),
            "rss_idle_mb": rss_idle / 1024,
            "rss_max_sampled_mb": sampler.max_kb / 1024,
            "rss_hwm_mb": hwm / 1024,
            "rss_after_mb": rss_after / 1024,
            "body_bytes_per_event": body_bytes / total_events,
            "detail_events": detail_events,
        }
        inproc = None if a.no_inproc else in_process(tmp, agents)
    finally:
        if spy is not None and spy.poll() is None:
            procs.stop(spy)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"collector ingest over HTTP, {a.agents} concurrent agents, default SQLite store")
    c.table(
        ["agents", "events", "committed", "in db", "wall s", "events/s", "batch p50 s", "batch max s",
         "cpu us/ev", "rss idle MB", "rss max MB", "rss after MB"],
        [[a.agents, total_events, committed, result["events_in_db"], wall, result["events_per_s"],
          result["latency_median_s"], result["latency_max_s"], result["collector_cpu_us_per_event"],
          result["rss_idle_mb"], result["rss_max_sampled_mb"], result["rss_after_mb"]]],
    )  # fmt: skip
    print(f"HTTP statuses: {result['statuses']}; target >= 50,000 events/s: "
          f"{'met' if result['events_per_s'] >= 50_000 else 'MISSED'}")  # fmt: skip
    if inproc:
        print(
            f"same batches into CollectorStore.ingest in-process, one thread: "
            f"{inproc['events_per_s']:.0f} events/s; wire.decode_rows alone: "
            f"{inproc['decode_events_per_s']:.0f} events/s"
        )
    prof = None
    if a.profile and os.path.exists(a.profile):
        prof = c.top_functions(a.profile)
        print("py-spy on the collector (all threads, 200 Hz): functions by inclusive % of samples")
        for fn, p in prof["inclusive"]:
            print(f"  {p:5.1f}  {fn}")
        print("source lines by self % of samples")
        for fn, p in prof["self_lines"]:
            print(f"  {p:5.1f}  {fn}")
    c.emit(
        {
            "bench": "collector_ingest",
            "machine": m,
            "quick": a.quick,
            "agents": a.agents,
            "batches_per_agent": a.batches,
            "records_per_batch": a.records,
            "unique_share": a.unique_share,
            "http": result,
            "in_process": inproc,
            "profile_top": prof,
        }
    )
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
