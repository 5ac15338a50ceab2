#!/usr/bin/env python3
"""Bytes on the wire per matching event (issue 3), measured for real.

A collector (``rarewrite collector serve``) and ``rarewrite agent replay``
talk through a counting TCP proxy on loopback; the proxy parses each HTTP
request, keeps the batch bodies, and counts request bytes (headers + body)
and response bytes. The batches are decoded to report records per batch and
the detail/count split. Afterwards ``collector evaluate`` must return exactly
the rows of the independent SQL oracle (tests.support.fleet), so the figure
is for an exact pipeline.

Fleets (one agent each, all events matching, timestamps spread over the hour
ending at T, in time order as a live agent sees them):
  repeat: P pairs x E events each (default 200 x 50), plus 20 rare pairs
          (1-4 events) so the rule has rows to check;
  unique: U unique pairs, one event each (default 10,000).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import tempfile
import threading
import time
import uuid
from typing import Any

import _common as c
import msgpack

from tests.support import fleet as fl
from tests.support import procs

EXE = "/usr/sbin/nginx"


class CountingProxy:
    """Loopback TCP proxy; records every HTTP request from the client side."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.requests: list[dict[str, Any]] = []  # path, head, body bytes
        self.down_bytes = 0
        self.up_bytes = 0
        self.connections = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._up, args=(client, server), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client), daemon=True).start()

    def _down(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    self.down_bytes += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _hang_up(src, dst)

    def _up(self, src: socket.socket, dst: socket.socket) -> None:
        buf = b""
        try:
            while data := src.recv(65536):
                with self._lock:
                    self.up_bytes += len(data)
                dst.sendall(data)
                buf += data
                buf = self._parse(buf)
        except OSError:
            pass
        finally:
            _hang_up(src, dst)

    def _parse(self, buf: bytes) -> bytes:
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return buf
            head = buf[: end + 4]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if len(buf) < end + 4 + length:
                return buf
            body = buf[end + 4 : end + 4 + length]
            path = head.split(b" ", 2)[1].decode("latin-1")
            with self._lock:
                self.requests.append({"path": path, "head": len(head), "body": body})
            buf = buf[end + 4 + length :]


def make_fleet(kind: str, at_ms: int, pairs: int, per_pair: int, unique: int, seed: int) -> fl.Fleet:
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    # one agent id per fleet: both fleets ship to one collector, and an id is enrolled once
    agent = str(uuid.uuid5(uuid.UUID(int=rng.getrandbits(128)), kind))
    host = f"web-{kind}"
    docs: list[dict[str, Any]] = []

    def doc(path: str) -> dict[str, Any]:
        return {
            "@timestamp": fl.iso(at_ms - rng.randint(0, fl.HOUR - 1)),
            "event": {"type": ["creation"], "action": "creation", "category": ["file"]},
            "host": {"name": host, "os": {"type": "linux"}},
            "agent": {"id": agent},
            "user": {"name": "www-data", "id": "33"},
            "process": {"name": "nginx", "executable": EXE, "pid": rng.randint(1000, 99999)},
            "file": {"path": path},
        }

    base = "/var/www/html/wp-content/uploads/2026/11"
    if kind == "repeat":
        for k in range(pairs):
            docs += [doc(f"{base}/cache/page-{k:05d}.html") for _ in range(per_pair)]
        for k in range(20):
            docs += [doc(f"{base}/rare-{k:03d}.php") for _ in range(rng.randint(1, 4))]
    else:
        docs += [doc(f"{base}/upload-{k:06d}-{rng.getrandbits(32):08x}.php") for k in range(unique)]
    docs.sort(key=lambda d: d["@timestamp"])  # a live agent sees events in time order
    return fl.Fleet(at_ms, [agent], [host], [docs])


def run_fleet(kind: str, fleet: fl.Fleet, tmp: str, col: procs.Collector) -> dict[str, Any]:
    proxy = CountingProxy(col.port)
    try:
        path = fleet.write(os.path.join(tmp, kind))[0]
        t0 = time.monotonic()
        r = procs.replay(
            path,
            f"http://127.0.0.1:{proxy.port}",
            os.path.join(tmp, f"state-{kind}"),
            fleet.agents[0],
            fleet.hosts[0],
        )
        elapsed = time.monotonic() - t0
        if r.returncode != 0:
            raise RuntimeError(f"replay {kind} failed: {r.stderr[-2000:]}")
        time.sleep(0.2)  # let the proxy threads record the last response
    finally:
        proxy.close()
    batches = [q for q in proxy.requests if q["path"].startswith("/api/v1/batches")]
    n_events = n_count_times = 0
    records_per_batch = []
    for q in batches:
        b = msgpack.unpackb(q["body"], raw=False)
        ev = len(b.get("events", []))
        ct = sum(len(x[2]) for x in b.get("counts", []))
        n_events += ev
        n_count_times += ct
        records_per_batch.append(ev + ct + len(b.get("gaps", [])))
    matching = len(fleet.docs[0])
    body = sum(len(q["body"]) for q in batches)
    heads = sum(q["head"] for q in batches)
    other_up = sum(q["head"] + len(q["body"]) for q in proxy.requests if q not in batches)
    rows = c.evaluate(col.db, fleet.at_ms, tmp)
    rows = [x for x in rows if x["host.name"] == fleet.hosts]  # one collector serves both fleets
    got = {fl.row_tuple(x) for x in rows}
    want = fl.oracle_rows(fleet)
    return {
        "fleet": kind,
        "matching_events": matching,
        "pairs": len({d["file"]["path"] for d in fleet.docs[0]}),
        "batches": len(batches),
        "records_per_batch_median": c.median(records_per_batch),
        "records_per_batch_max": max(records_per_batch, default=0),
        "detail_events": n_events,
        "count_times": n_count_times,
        "batch_body_bytes": body,
        "batch_header_bytes": heads,
        "other_request_bytes": other_up,
        "response_bytes": proxy.down_bytes,
        "upstream_bytes_total": proxy.up_bytes,
        "body_bytes_per_event": body / matching,
        "upstream_bytes_per_event": proxy.up_bytes / matching,
        "connections": proxy.connections,
        "replay_s": elapsed,
        "rows": len(rows),
        "rows_equal_oracle": got == want and len(rows) == len(want),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=200, help="repeating pairs (default 200)")
    ap.add_argument("--per-pair", type=int, default=50, help="events per repeating pair (default 50)")
    ap.add_argument("--unique", type=int, default=10_000, help="unique pairs (default 10,000)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    a = ap.parse_args()
    if a.quick:
        a.pairs, a.per_pair, a.unique = 10, 20, 200
    m = c.machine()
    c.print_machine(m)
    at_ms = (int(time.time() * 1000) // 1000) * 1000
    tmp = tempfile.mkdtemp(prefix="rw-wire-")
    results = []
    try:
        with procs.collector(tmp) as col:
            for kind in ("repeat", "unique"):
                f = make_fleet(kind, at_ms, a.pairs, a.per_pair, a.unique, a.seed)
                results.append(run_fleet(kind, f, tmp, col))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cols = [
        ("fleet", "fleet"),
        ("events", "matching_events"),
        ("pairs", "pairs"),
        ("batches", "batches"),
        ("rec/batch", "records_per_batch_median"),
        ("detail", "detail_events"),
        ("counts", "count_times"),
        ("body B", "batch_body_bytes"),
        ("body B/ev", "body_bytes_per_event"),
        ("wire B/ev", "upstream_bytes_per_event"),
        ("resp B", "response_bytes"),
        ("rows", "rows"),
        ("=oracle", "rows_equal_oracle"),
    ]
    print(
        f"fleet sizes: repeat {a.pairs} pairs x {a.per_pair} events + 20 rare pairs; unique {a.unique} pairs"
    )
    c.table([h for h, _ in cols], [[r[k] for _, k in cols] for r in results])
    print("wire B/ev = every byte the agent sent (enroll, HTTP headers, batch bodies) / matching events")
    c.emit({"bench": "wire_bytes", "machine": m, "quick": a.quick, "fleets": results})
    return 0 if all(r["rows_equal_oracle"] for r in results) else 1


def _hang_up(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


if __name__ == "__main__":
    raise SystemExit(main())
