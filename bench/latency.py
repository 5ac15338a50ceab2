#!/usr/bin/env python3
"""Detection latency with the continuous schedule (issue 8): a file written on
the host -> its alert line written at the collector.

Root only (fanotify, setpriv); without root it says so and exits 0. A real
collector (``collector serve --schedule continuous --settle S --alerts-file
F``) and a real ``rarewrite agent run --watch DIR`` (the agent's default
config unless --ship-interval is given) run on this host. N writes, spaced
--interval apart on average (uniform jitter of +-50 %, so they fall at every
phase of the agent's shipping tick and the collector's 1 s evaluation tick),
each by a web server (a copy of dash named nginx, run as www-data with
setpriv) creating one new file. A thread tails F and notes the
wall-clock time each alert line appears; latency = that time - the file's
mtime (the write, by the kernel's clock). Reported: median, p99 (nearest
rank), min, max, and the alerts that never came (within settle + --wait).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any, Optional

import _common as c

from tests.support import procs


class Tail(threading.Thread):
    """Follows an NDJSON file from its start; file.path -> time its line appeared."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.seen: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def run(self) -> None:
        while not os.path.exists(self.path) and not self.stop.is_set():
            time.sleep(0.005)
        if self.stop.is_set():
            return
        with open(self.path, encoding="ascii") as f:
            buf = ""
            while not self.stop.is_set():
                chunk = f.readline()
                if not chunk:
                    time.sleep(0.002)
                    continue
                now = time.time()
                buf += chunk
                if not buf.endswith("\n"):
                    continue  # a line still being written
                doc = json.loads(buf)
                buf = ""
                with self.lock:
                    self.seen.setdefault(str(doc["file"]["path"]), now)

    def get(self, path: str) -> Optional[float]:
        with self.lock:
            return self.seen.get(path)


def nearest_rank(xs: list[float], q: float) -> Optional[float]:
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def start_agent(tmp: str, url: str, state: str, watch: str, ship_interval: str) -> subprocess.Popen[bytes]:
    if not ship_interval:
        return c.start_agent(tmp, url, state, watch)
    conf = os.path.join(tmp, "agent.conf")
    with open(conf, "w", encoding="ascii") as f:
        f.write(f"[agent]\nship_interval = {ship_interval}\n")
    log = open(os.path.join(tmp, "agent.log"), "ab")  # closed below, the child keeps it
    env = {**os.environ, "RAREWRITE_ENROLLMENT_SECRET": procs.SECRET}
    args = ["agent", "run", "--collector", url, "--state-dir", state, "--watch", watch, "--config", conf]
    p = subprocess.Popen(
        [*procs.RAREWRITE, *args], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and p.poll() is None:
        if c.status(state).get("state") == "running":
            return p
        time.sleep(0.05)
    procs.stop(p)
    raise RuntimeError("agent did not start (see agent.log)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=50, help="writes (default 50)")
    ap.add_argument("--quick", action="store_true", help="5 writes (smoke test)")
    ap.add_argument("--settle", default="1s", help="collector settle time (default 1s)")
    ap.add_argument("--interval", type=float, default=1.0, help="mean seconds between writes (default 1)")
    ap.add_argument("--ship-interval", default="", help="agent ship_interval (default: the agent's, 1s)")
    ap.add_argument(
        "--wait", type=float, default=30.0, help="seconds to wait for the last alerts (default 30)"
    )
    a = ap.parse_args()
    if a.quick:
        a.n = 5
    m = c.machine()
    c.print_machine(m)
    base_doc: dict[str, Any] = {"bench": "latency", "quick": a.quick, "machine": m}
    if os.geteuid() != 0:
        print("skipped: needs root (fanotify, setpriv)")
        c.emit({**base_doc, "skipped": "needs root"})
        return 0
    os.makedirs("/srv", exist_ok=True)
    base = tempfile.mkdtemp(prefix="rw-bench-latency-", dir="/srv")
    tmp = tempfile.mkdtemp(prefix="rw-latency-")
    binp, www = os.path.join(base, "bin"), os.path.join(base, "www")
    os.makedirs(binp)
    os.makedirs(www)
    os.chmod(base, 0o755)  # noqa: S103 - www-data must reach the writer
    os.chmod(binp, 0o755)  # noqa: S103
    shutil.chown(www, 33, 33)
    nginx = os.path.join(binp, "nginx")
    shutil.copy("/bin/dash", nginx)
    alerts = os.path.join(tmp, "alerts.ndjson")
    tail = Tail(alerts)
    tail.start()
    writes: list[tuple[str, float]] = []  # (path, mtime)
    agent: Optional[subprocess.Popen[bytes]] = None
    try:
        extra = ("--schedule", "continuous", "--settle", a.settle, "--alerts-file", alerts)
        with procs.collector(tmp, *extra) as col:
            agent = start_agent(tmp, col.url, os.path.join(tmp, "agent"), www, a.ship_interval)
            time.sleep(1.0)  # the agent's first shipment (enrollment) is done
            for i in range(a.n):
                path = os.path.join(www, f"w{i:04d}.php")
                # the writer stays a moment so its /proc entry is there to read
                script = f"printf '<?php // %s ?>' $$ > {path}; sleep 0.2"
                subprocess.run([*c.AS_WWW, nginx, "-c", script], check=True, timeout=60)
                writes.append((path, os.stat(path).st_mtime_ns / 1e9))
                # jittered, so writes fall at every phase of the agent's and collector's 1 s ticks
                time.sleep(max(0.0, a.interval * random.uniform(0.5, 1.5) - 0.2))  # noqa: S311
            deadline = time.monotonic() + a.wait
            while time.monotonic() < deadline and any(tail.get(p) is None for p, _ in writes):
                time.sleep(0.05)
    finally:
        procs.stop(agent)
        tail.stop.set()
        shutil.rmtree(base, ignore_errors=True)
    lat = [seen - t for p, t in writes if (seen := tail.get(p)) is not None]
    missed = sum(1 for p, _ in writes if tail.get(p) is None)
    summary = {
        "writes": len(writes),
        "alerts": len(lat),
        "missed": missed,
        "settle": a.settle,
        "interval_s": a.interval,
        "ship_interval": a.ship_interval or "agent default (1s)",
        "median_s": c.median(lat),
        "p99_s": nearest_rank(lat, 0.99),
        "min_s": min(lat) if lat else None,
        "max_s": max(lat) if lat else None,
    }
    c.table(
        ["writes", "alerts", "missed", "settle", "median_s", "p99_s", "min_s", "max_s"],
        [
            [
                summary["writes"],
                summary["alerts"],
                missed,
                a.settle,
                *(
                    ("-" if summary[k] is None else summary[k])
                    for k in ("median_s", "p99_s", "min_s", "max_s")
                ),
            ]
        ],
    )
    shutil.rmtree(tmp, ignore_errors=True)
    c.emit({**base_doc, "summary": summary, "latencies_s": [round(x, 4) for x in lat]})
    return 0 if not missed else 1


if __name__ == "__main__":
    raise SystemExit(main())
