#!/usr/bin/env python3
"""What alert enrichment costs (issue 17), per candidate and per alert,
side by side in one run on this machine.

- Agent, per detailed event (the only ones enriched: a pair's first few in
  the hour): the file facts alone (what every detailed event paid before)
  against facts plus the Enricher with real parts: this host's dpkg
  database, a web root, an access log holding ``--log-lines`` lines logged
  over 10 s around the writes (50,000: a site serving 5,000 requests a
  second, one in 100 a POST), the content scan of an 8 KiB PHP shell.
  Alternating, median of ``--runs``; the first call's package-index build
  is reported apart (it happens once per dpkg change).
- Wire: the bytes an event map grows by with its ``ctx``.
- Collector, per alert: ``run_continuous`` over ``--alerts`` fresh pairs in
  a SQLite store, their events with and without ``ctx`` and one follow-up
  note each: the alert documents' cost with enrichment against without.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import _common as c
import msgpack

from agent.collector import evaluate as ev
from agent.collector.storage.sqlite import CollectorStore
from agent.sensor.enrich.accesslog import AccessLogs
from agent.sensor.enrich.content import ContentScanner
from agent.sensor.enrich.context import Enricher, _Watch
from agent.sensor.enrich.packages import PackageIndex
from agent.sensor.enrich.webroots import WebRoot, WebRoots
from agent.sensor.facts import FactsReader
from agent.sensor.outbox import Candidate
from agent.shared import wire
from agent.shared.clock import SystemClock
from agent.shared.config.schema import EnrichConfig
from agent.shared.rule import Rule

EXE = b"/usr/sbin/php-fpm8.2"
SHELL = (b"<?php\n/* uploaded avatar */\n" + b"$a = 'lorem ipsum dolor sit amet';\n" * 220
         + b"if (isset($_POST['x'])) { echo shell_exec($_POST['x']); }\n")  # fmt: skip
T = 1_790_000_000_000


def _log_line(ms: int, i: int) -> str:
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(ms // 1000))
    method = "POST /comment.php" if i % 100 == 0 else f"GET /page.php?id={i}"
    return (f'198.51.100.{i % 250} - - [{stamp}] "{method} HTTP/1.1" 200 {i % 9000} '
            f'"https://site/" "Mozilla/5.0 (X11; Linux x86_64) Firefox/{i % 40}.0"\n')  # fmt: skip


def _site(tmp: Path, n_files: int, log_lines: int) -> tuple[list[Candidate], Path]:
    root = tmp / "www"
    (root / "uploads").mkdir(parents=True)
    now = int(time.time() * 1000)
    cands = []
    for i in range(n_files):
        p = root / "uploads" / f"shell{i}.php"
        p.write_bytes(SHELL)
        cands.append(Candidate(bytes(p), now, EXE, bytes(p), "php-fpm8.2"))
    log = tmp / "access.log"
    log.write_text("")
    return cands, log


def _enricher(tmp: Path, log: Path) -> Enricher:
    root = WebRoot("nginx", bytes(tmp / "www"), "/", ("php",), ((str(log), "combined"),), ())
    return Enricher(
        EnrichConfig(), SystemClock(), packages=PackageIndex(), roots=WebRoots([root]),
        logs=AccessLogs([(str(log), "combined")]), content=ContentScanner(files_per_s=1 << 30),
    )  # fmt: skip


def _per_call_us(fn: Callable[[Candidate], Any], cands: Sequence[Candidate]) -> float:
    start = time.perf_counter()
    for cand in cands:
        fn(cand)
    return (time.perf_counter() - start) / len(cands) * 1e6


def _tail_costs(tmp: Path, n: int) -> dict[str, float]:
    """What following a busy log costs a line: parsed (armed: just after a
    detailed event), filtered (files watched: only lines naming one are
    parsed), read past (nothing armed or watched)."""
    out = {}
    now = int(time.time() * 1000)
    text = "".join(_log_line(now + i, i) for i in range(n))
    for mode in ("parsed", "filtered", "read_past"):
        log = tmp / f"tail-{mode}.log"
        log.write_text("")
        enricher = _enricher(tmp, log)
        if mode == "parsed":
            enricher.arm()
        elif mode == "filtered":
            enricher._watch(_Watch(now, EXE, b"/x/shell.php", "/uploads/shell.php", None, 0))
        with log.open("a") as f:
            f.write(text)
        start = time.perf_counter()
        enricher.poll_logs()
        out[mode] = (time.perf_counter() - start) / n * 1e6
    return out


def agent_costs(tmp: Path, n: int, log_lines: int, runs: int) -> dict[str, Any]:
    cands, log = _site(tmp, n, log_lines)
    enricher = _enricher(tmp, log)
    enricher._take = lambda: True  # type: ignore[method-assign]  # every event looks its requests up (no 200/s cap)
    enricher.arm()  # as after a detailed event is stored: every line parsed
    now = int(time.time() * 1000)
    with log.open("a") as f:  # the site's traffic, logged after the agent started following it
        f.write("".join(_log_line(now - 3000 + i * 10_000 // log_lines, i) for i in range(log_lines)))
    start = time.perf_counter()
    enricher.packages.owner(cands[0].host_path)  # type: ignore[union-attr]
    index_build_s = time.perf_counter() - start
    enricher.poll_logs()
    facts = FactsReader(SystemClock(), 1 << 20)
    facts._take = lambda n: True  # type: ignore[method-assign]  # the per-second hash budget: not measured here
    only, both = [], []
    for _ in range(runs):
        enricher.packages._cache.clear()  # type: ignore[union-attr]  # each run asks afresh
        only.append(_per_call_us(lambda cand: facts(cand.host_path), cands))
        enricher.packages._cache.clear()  # type: ignore[union-attr]
        both.append(_per_call_us(lambda cand: (facts(cand.host_path), enricher(cand)), cands))
    parts = {
        "packages": _per_call_us(lambda cand: enricher.packages.owner(cand.host_path), cands),  # type: ignore[union-attr]
        "web_root": _per_call_us(lambda cand: enricher.roots.place(cand.host_path), cands),  # type: ignore[union-attr]
        "content": _per_call_us(lambda cand: enricher.content.scan(cand.host_path), cands),  # type: ignore[union-attr]
        "requests": _per_call_us(lambda cand: enricher._write_requests(cand, None), cands),
    }
    ctx = enricher(cands[0])
    tail = _tail_costs(tmp, log_lines)
    return {
        "tail_us_per_line": tail,
        "facts_us": statistics.median(only),
        "facts_and_enrichment_us": statistics.median(both),
        "parts_us": parts,
        "index_build_s": index_build_s,
        "ctx_bytes": len(msgpack.packb(ctx, use_bin_type=True)),
        "requests_in_ctx": len((ctx or {}).get("req", [])),
        "watches": enricher.status()["watches"],
    }


def _ingest(store: CollectorStore, n: int, with_ctx: bool, ctx: dict[str, Any]) -> None:
    store.enroll("a", "web-1", "hash-a", T)
    agent = store.agent_for_key("hash-a")
    assert agent is not None
    events, notes = [], []
    for i in range(n):
        path = b"/var/www/html/uploads/s%d.php" % i
        detail = {"pname": "php-fpm8.2", "uname": "www-data", "uid": "33", "etype": ["creation"]}
        if with_ctx:
            detail["ctx"] = ctx
            reqs = [dict(ctx["req"][0], ts=T + 5000, url=f"/uploads/s{i}.php", w=False)]
            notes.append((T + i, EXE, path, "req", msgpack.packb({"reqs": reqs}, use_bin_type=True)))
        events.append(wire.EventRecord(T + i, "creation", EXE, path, detail))
    batch = wire.Batch("b" * 32, "e" * 32, 1, "a", "web-1", T, tuple(events))
    store.ingest(agent, replace(wire.rows_of(batch), notes=tuple(notes)), T)


def collector_costs(tmp: Path, n: int, runs: int, ctx: dict[str, Any]) -> dict[str, Any]:
    rule = Rule()
    out: dict[str, list[float]] = {"plain": [], "enriched": []}
    size: dict[str, int] = {}
    for r in range(runs):
        for kind in ("plain", "enriched"):
            db = tmp / f"c-{kind}-{r}.db"
            store = CollectorStore(str(db))
            _ingest(store, n, kind == "enriched", ctx)
            start = time.perf_counter()
            docs = ev.run_continuous(store, rule, T + 60_000, 0)
            out[kind].append((time.perf_counter() - start) / max(1, len(docs)) * 1000)
            size[kind] = len(json.dumps(docs[0]))
            assert len(docs) == n, (kind, len(docs))
            store.close()
    return {
        "ms_per_alert": {k: statistics.median(v) for k, v in out.items()},
        "alert_doc_chars": size,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--files", type=int, default=500)
    p.add_argument("--log-lines", type=int, default=50_000)
    p.add_argument("--alerts", type=int, default=100)
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args()
    if a.quick:
        a.files, a.log_lines, a.alerts, a.runs = 20, 500, 10, 1
    m = c.machine()
    c.print_machine(m)
    tmp = Path(tempfile.mkdtemp(prefix="rw-enrich-"))
    try:
        agent = agent_costs(tmp, a.files, a.log_lines, a.runs)
        root = {"in": True, "srv": "nginx", "dir": b"/var/www/html", "url": "/uploads/s.php", "exec": True}
        ctx = {"pkg": {"own": False},
               "root": root,
               "sig": ["exec_call", "request_to_exec"],
               "req": [{"ts": T, "ip": "203.0.113.7", "m": "POST", "url": "/upload.php", "st": 200, "n": 28,
                        "ua": "Mozilla/5.0", "log": "/var/log/nginx/access.log", "w": True}]}  # fmt: skip
        collector = collector_costs(tmp, a.alerts, a.runs, ctx)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    doc = {"bench": "enrich_cost", "machine": m, "quick": a.quick, "files": a.files, "log_lines": a.log_lines,
           "alerts": a.alerts, "agent": agent, "collector": collector}  # fmt: skip
    f, fe = agent["facts_us"], agent["facts_and_enrichment_us"]
    cp, ce = collector["ms_per_alert"]["plain"], collector["ms_per_alert"]["enriched"]
    c.table(
        ["", "before (facts only / plain)", "with enrichment", "ratio"],
        [
            ["agent: per detailed event, us", f, fe, fe / f if f else None],
            ["collector: per alert, ms", cp, ce, ce / cp if cp else None],
        ],
    )
    tail = ", ".join(f"{k} {v:.2f}" for k, v in agent["tail_us_per_line"].items())
    print(f"following the access log, us a line: {tail}")
    parts = ", ".join(f"{k} {v:.1f} us" for k, v in agent["parts_us"].items())
    print(
        f"parts: {parts}; package index build {agent['index_build_s']:.3f} s once; ctx {agent['ctx_bytes']} B"
    )
    c.emit(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
