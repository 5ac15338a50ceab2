"""The collector's HTTP server against BAD-INPUTS.md C1-C17, on a real socket."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import msgpack
import pytest
from aiohttp import web

from agent.collector.server import make_app
from agent.collector.storage.base import AgentRecord
from agent.collector.storage.sqlite import CollectorStore
from agent.shared import wire
from agent.shared.clock import SystemClock
from agent.shared.config.schema import CollectorConfig, Config
from agent.shared.errors import StoreError
from agent.shared.rule import Rule

SECRET = "test-enrollment-secret-0123456789"
NOW = int(time.time() * 1000)
MAX_BODY = 256 << 10


class Server:
    """The real app on 127.0.0.1:<free port>, served by a loop in a thread."""

    def __init__(self, cfg: Config, store: CollectorStore, outputs: Optional[list[Any]] = None) -> None:
        self.store = store
        self.loop = asyncio.new_event_loop()
        self.app = make_app(cfg, store, SECRET, SystemClock(), outputs)
        self.runner = web.AppRunner(self.app, access_log=None, auto_decompress=False)
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = self.runner.addresses[0][1]
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: Optional[dict[str, str]] = None,
        chunked: bool = False,
    ) -> tuple[int, dict[str, str], bytes]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        try:
            c.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
            r = c.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            c.close()

    def enroll(self, agent_id: str, host: str = "") -> str:
        doc = {"enrollment_secret": SECRET, "agent_id": agent_id, "host_name": host or f"host-{agent_id}"}
        st, _, body = self.request("POST", "/api/v1/enroll", json.dumps(doc).encode())
        assert st == 200, body
        key: str = json.loads(body)["api_key"]
        return key

    def post_batch(
        self, key: Optional[str], body: bytes, **headers: str
    ) -> tuple[int, dict[str, str], bytes]:
        h = {"Content-Type": "application/msgpack", **headers}
        if key is not None:
            h["Authorization"] = f"Bearer {key}"
        return self.request("POST", "/api/v1/batches", body, h)

    def healthy(self) -> bool:
        return self.request("GET", "/healthz")[0] == 200


def cfg_for(tmp: Path, **kw: Any) -> Config:
    base = CollectorConfig(db=str(tmp / "c.db"), max_body=MAX_BODY, read_timeout_ms=600, rate_limit=10_000)
    return Config(collector=replace(base, **kw))


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Server]:
    store = CollectorStore(str(tmp_path / "c.db"))
    s = Server(cfg_for(tmp_path), store)
    yield s
    s.stop()
    store.close()


def doc(agent_id: str, seq: int = 1, **over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "v": 1,
        "batch_id": os.urandom(16).hex(),
        "epoch": "e" * 32,
        "seq": seq,
        "agent_id": agent_id,
        "host_name": "h",
        "sent_at": int(time.time() * 1000),  # now, not at import: a stale sent_at is a clock_skew gap
        "events": [
            {"ts": NOW - 1000, "action": "creation", "exe": b"/usr/sbin/nginx", "path": b"/var/www/a.php"}
        ],
    }
    d.update(over)
    return d


def pack(d: Any) -> bytes:
    return bytes(msgpack.packb(d, use_bin_type=True))


def rows(s: Server) -> list[Any]:
    return s.store.rows(Rule(), NOW)


@pytest.fixture
def keyed(srv: Server) -> tuple[Server, str]:
    key = srv.enroll("good-1")
    st, _, body = srv.post_batch(key, pack(doc("good-1")))
    assert (st, json.loads(body)) == (200, {"status": "stored", "notes": True})  # it takes notes
    return srv, key


def test_enroll_and_ingest(keyed: tuple[Server, str]) -> None:
    srv, _ = keyed
    assert [(r.cc, r.agent_ids, r.host_names) for r in rows(srv)] == [(1, ("good-1",), ("host-good-1",))]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (json.dumps({"enrollment_secret": "wrong", "agent_id": "x", "host_name": "h"}).encode(), 401),
        (json.dumps({"agent_id": "x", "host_name": "h"}).encode(), 401),
        (json.dumps({"enrollment_secret": SECRET, "agent_id": "x"}).encode(), 400),
        (json.dumps({"enrollment_secret": SECRET, "agent_id": "bad id/..", "host_name": "h"}).encode(), 400),
        (json.dumps({"enrollment_secret": SECRET, "agent_id": "x", "host_name": "a\nb"}).encode(), 400),
        (json.dumps({"enrollment_secret": SECRET, "agent_id": "x", "host_name": "\ud800"}).encode(), 400),
        (json.dumps([SECRET]).encode(), 400),
        (b"{" * 60000, 400),  # RecursionError in the JSON parser
        (b"\xff\xfe garbage", 400),
        (b"{" * 100000, 413),
    ],
)
def test_enroll_rejects(srv: Server, body: bytes, status: int) -> None:
    assert srv.request("POST", "/api/v1/enroll", body)[0] == status
    assert srv.healthy()
    assert srv.store.list_agents() == []


# Raw msgpack for what msgpack.packb will not write.
HDR = pack(doc("good-1"))
CASES: list[tuple[str, bytes]] = [
    ("truncated", HDR[:-3]),
    ("trailing bytes", HDR + b"\xc0"),
    ("reserved 0xc1", b"\xc1"),
    ("array of 2^32", b"\xdd\xff\xff\xff\xff"),
    ("map of 2^32", b"\xdf\xff\xff\xff\xff"),
    ("deep nesting", b"\x91" * 3000 + b"\xc0"),
    ("ext type", b"\xd4\x01\x00"),
    ("timestamp ext -1 len 3", b"\xc7\x03\xff\x00\x00\x00"),
    ("timestamp ext -1 valid", b"\xd6\xff\x00\x00\x00\x01"),
    ("int map key", b"\x81\x01\x02"),
    ("duplicate key", b"\x82\xa1v\x01\xa1v\x01"),
    ("empty map", b"\x80"),
    ("not a map", pack([1, 2, 3])),
    ("unknown version", pack(doc("good-1", v=99))),
    ("pid as str", pack(doc("good-1", events=[{**doc("x")["events"][0], "pid": "12"}]))),
    ("negative ts", pack(doc("good-1", events=[{**doc("x")["events"][0], "ts": -5}]))),
    ("int >= 2^63", pack(doc("good-1", events=[{**doc("x")["events"][0], "ts": 2**63}]))),
    ("NaN", pack(doc("good-1", events=[{**doc("x")["events"][0], "ts": float("nan")}]))),
    ("empty path", pack(doc("good-1", events=[{**doc("x")["events"][0], "path": b""}]))),
    ("negative count delta", pack(doc("good-1", events=[], counts=[[b"/e", b"/p", [NOW, -1]]]))),
    ("too many records", pack(doc("good-1", events=[], counts=[[b"/e", b"/p", [NOW] + [0] * 20_000]]))),
    ("seq zero", pack(doc("good-1", seq=0))),
    ("bad batch_id", pack(doc("good-1", batch_id="XYZ"))),
    ("no records", pack(doc("good-1", events=[]))),
    ("random bytes", os.urandom(4096)),
]


@pytest.mark.parametrize(("name", "body"), CASES, ids=[c[0] for c in CASES])
def test_batch_rejects_400(keyed: tuple[Server, str], name: str, body: bytes) -> None:
    srv, key = keyed
    before = rows(srv)
    st, _, out = srv.post_batch(key, body)
    assert st == 400, (name, out)
    err = json.loads(out)["error"]
    assert isinstance(err, str) and err
    if name == "unknown version":
        assert "supported: 1" in err
    if name in ("pid as str", "negative ts", "int >= 2^63", "empty path"):
        assert err.startswith("events[0].")
    assert srv.healthy()
    assert rows(srv) == before


def test_c1_body_over_cap(keyed: tuple[Server, str]) -> None:
    srv, key = keyed
    before = rows(srv)
    assert srv.post_batch(key, b"\x00" * (MAX_BODY + 1))[0] == 413

    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_BODY // 4096 + 2):
            yield b"\x00" * 4096

    h = {"Authorization": f"Bearer {key}", "Content-Type": "application/msgpack"}
    try:
        st = srv.request("POST", "/api/v1/batches", chunks(), h, chunked=True)[0]
    except (ConnectionError, http.client.HTTPException):
        st = 413  # closed while we were still sending: the server did not read it all
    assert st == 413
    assert srv.healthy() and rows(srv) == before


def test_c2_slow_body_times_out(keyed: tuple[Server, str]) -> None:
    srv, key = keyed
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    try:
        s.sendall(
            f"POST /api/v1/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Length: 1000\r\n\r\nabc".encode()
        )
        reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408")
        while s.recv(4096):
            pass  # the server closes the connection
    finally:
        s.close()
    assert srv.healthy()


def test_c3_credentials(keyed: tuple[Server, str], caplog: pytest.LogCaptureFixture) -> None:
    srv, key = keyed
    body = pack(doc("good-1", seq=2))
    caplog.set_level(logging.WARNING, "rarewrite.collector.security")
    for _ in range(20):
        assert srv.post_batch(None, body)[0] == 401
    assert srv.post_batch("A" * 43, body)[0] == 401
    assert srv.request("POST", "/api/v1/batches", body, {"Authorization": "Bearer"})[0] == 401
    assert srv.request("POST", "/api/v1/batches", body, {"Authorization": "Basic Zm9vOmJhcg=="})[0] == 401
    srv.store.revoke("good-1")
    assert srv.post_batch(key, body)[0] == 401
    again = json.dumps({"enrollment_secret": SECRET, "agent_id": "good-1", "host_name": "h"}).encode()
    assert srv.request("POST", "/api/v1/enroll", again, {"Content-Type": "application/json"})[0] == 403
    lines = [r for r in caplog.records if "auth_failed" in r.getMessage()]
    assert 1 <= len(lines) <= 6  # rate-limited
    assert srv.healthy()
    assert len(rows(srv)) == 1


def test_c4_identity_mismatch(keyed: tuple[Server, str], caplog: pytest.LogCaptureFixture) -> None:
    srv, key = keyed
    srv.enroll("victim-2")
    caplog.set_level(logging.WARNING, "rarewrite.collector.security")
    st, _, _ = srv.post_batch(
        key, pack(doc("victim-2", seq=2, events=[{**doc("x")["events"][0], "path": b"/z"}]))
    )
    assert st == 403
    assert any("agent_identity_mismatch" in r.getMessage() for r in caplog.records)
    assert [r.path for r in rows(srv)] == [b"/var/www/a.php"]


def test_c5_c6_duplicates_and_gaps(keyed: tuple[Server, str]) -> None:
    srv, key = keyed
    d = doc("good-1", seq=2, events=[{**doc("x")["events"][0], "path": b"/b"}])
    assert json.loads(srv.post_batch(key, pack(d))[2])["status"] == "stored"
    assert json.loads(srv.post_batch(key, pack(d))[2])["status"] == "duplicate"
    status, _, body = srv.post_batch(key, pack({**d, "batch_id": "0" * 32}))[:3]
    assert status == 409 and b"new epoch" in body  # a used seq under another batch id: nothing stored
    assert [r.cc for r in rows(srv)] == [1, 1]
    out = srv.post_batch(key, pack(doc("good-1", seq=7)))[2]
    assert json.loads(out)["status"] == "stored"
    assert [g.reason for g in srv.store.gaps_overlapping(0, int(time.time() * 1000) + 10_000)] == [
        "possible_loss"
    ]


def test_c14_hostile_strings_stored_as_bytes(
    keyed: tuple[Server, str], caplog: pytest.LogCaptureFixture
) -> None:
    srv, key = keyed
    path = b"/var/www/\xff\xfe\n\x1b[31m" + b"x" * 4000
    exe = b"/proc/123/exe (deleted)"
    d = doc(
        "good-1",
        seq=2,
        events=[{"ts": NOW - 5, "action": "creation", "exe": exe, "path": path, "cmd": "a\nb"}],
    )
    assert srv.post_batch(key, pack(d))[0] == 200
    assert (exe, path) in {(r.executable, r.path) for r in rows(srv)}
    # a bad batch whose error echoes nothing raw into the logs
    caplog.set_level(logging.INFO, "rarewrite.collector")
    srv.post_batch(key, pack(doc("good-1", seq=3, host_name="\x1b[2J\n" * 100)))
    for r in caplog.records:
        assert "\x1b" not in r.getMessage() and "\n" not in r.getMessage()


def test_c15_flood_is_rate_limited(tmp_path: Path) -> None:
    store = CollectorStore(str(tmp_path / "c.db"))
    srv = Server(cfg_for(tmp_path, rate_limit=3), store)
    try:
        k1, k2 = srv.enroll("flood-1"), srv.enroll("calm-2")
        statuses = [srv.post_batch(k1, pack(doc("flood-1", seq=i)))[0:2] for i in range(1, 9)]
        limited = [h for st, h in statuses if st == 429]
        assert limited and all(int(h["Retry-After"]) >= 1 for h in limited)
        assert srv.post_batch(k2, pack(doc("calm-2")))[0] == 200
        assert srv.healthy()
    finally:
        srv.stop()
        store.close()


def test_c16_gzip(keyed: tuple[Server, str]) -> None:
    srv, key = keyed
    good = gzip.compress(pack(doc("good-1", seq=2, events=[{**doc("x")["events"][0], "path": b"/gz"}])))
    assert srv.post_batch(key, good, **{"Content-Encoding": "gzip"})[0] == 200
    bomb = gzip.compress(b"\x00" * (MAX_BODY * 64))
    assert len(bomb) < MAX_BODY
    before = rows(srv)
    assert srv.post_batch(key, bomb, **{"Content-Encoding": "gzip"})[0] == 413
    assert srv.post_batch(key, b"not gzip", **{"Content-Encoding": "gzip"})[0] == 400
    assert srv.post_batch(key, good, **{"Content-Encoding": "br"})[0] == 415
    assert srv.healthy() and rows(srv) == before


class FullStore(CollectorStore):
    """A store whose disk is full at commit."""

    full = False

    def ingest(self, agent: AgentRecord, batch: wire.Batch, now_ms: int, terms: object = ()) -> str:
        if self.full:
            raise StoreError("collector database: ingest failed: database or disk is full")
        return super().ingest(agent, batch, now_ms)

    def check(self) -> None:
        if self.full:
            raise StoreError("disk full")
        super().check()


def test_c17_store_full_is_503(tmp_path: Path) -> None:
    store = FullStore(str(tmp_path / "c.db"))
    srv = Server(cfg_for(tmp_path), store)
    try:
        key = srv.enroll("a-1")
        store.full = True
        st, h, _ = srv.post_batch(key, pack(doc("a-1")))
        assert st == 503 and "Retry-After" in h
        assert srv.request("GET", "/healthz")[0] == 503
        store.full = False
        assert srv.healthy()
        assert srv.post_batch(key, pack(doc("a-1")))[0] == 200
    finally:
        srv.stop()
        store.close()


def test_concurrent_junk_and_half_sent_request(keyed: tuple[Server, str]) -> None:
    srv, key = keyed
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(b"POST /api/v1/batches HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc")
    out: list[int] = []
    threads = [
        threading.Thread(target=lambda: out.append(srv.post_batch(key, os.urandom(2048))[0]))
        for _ in range(50)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s.close()
    assert sorted(set(out)) == [400]
    assert srv.healthy()


def test_metrics(keyed: tuple[Server, str]) -> None:
    srv, key = keyed
    srv.post_batch(key, b"\xc1")
    st, _, body = srv.request("GET", "/metrics")
    text = body.decode()
    assert st == 200
    for name in (
        'rarewrite_collector_batches_total{status="stored"} 1',
        "rarewrite_collector_events_total 1",
        'rarewrite_collector_rejects_total{code="400"} 1',
        "rarewrite_collector_agents 1",
        "rarewrite_collector_alerts_total 0",
        "process_resident_memory_bytes",
    ):
        assert name in text


def test_metrics_are_what_promtool_accepts(keyed: tuple[Server, str]) -> None:
    """Prometheus' own linter (Debian's prometheus package; .ci/run installs
    it) has nothing to say: every family has HELP and TYPE, counters end in
    _total and only counters do, the content type names the format version."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    srv, key = keyed
    srv.post_batch(key, b"\xc1")  # a reject, so the labelled families have samples
    st, headers, body = srv.request("GET", "/metrics")
    assert st == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    lint = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )
    assert (lint.returncode, lint.stdout + lint.stderr) == (0, b"")
    names = {line.split()[2] for line in body.decode().splitlines() if line.startswith("# HELP")}
    types = {line.split()[2] for line in body.decode().splitlines() if line.startswith("# TYPE")}
    assert names == types and "rarewrite_collector_alerts_total" in names


class DroppingOutput:
    """An output whose queue has dropped alerts (what a dead webhook does)."""

    name = "soc"
    dropped = 7

    def emit(self, alerts: Any) -> None:
        pass

    def close(self) -> None:
        pass


def test_metrics_count_alerts_dropped_by_an_output(tmp_path: Path) -> None:
    store = CollectorStore(str(tmp_path / "c.db"))
    srv = Server(cfg_for(tmp_path), store, [DroppingOutput()])
    try:
        st, _, body = srv.request("GET", "/metrics")
        assert st == 200 and 'rarewrite_collector_output_dropped_total{output="soc"} 7' in body.decode()
    finally:
        srv.stop()
        store.close()


def test_unknown_route_and_method(srv: Server) -> None:
    assert srv.request("GET", "/api/v1/batches")[0] == 405
    assert srv.request("GET", "/nope")[0] == 404


def test_struct_sanity() -> None:
    # the 2^32 claims above really are what they say
    assert struct.unpack(">I", b"\xff\xff\xff\xff")[0] == 2**32 - 1


SERVE = """
import sys
from agent.shared.config.schema import Config, CollectorConfig
from agent.shared.rule import Rule
from agent.collector.service import serve
port, db, alerts, cert, key = sys.argv[1:6]
cc = CollectorConfig(listen="127.0.0.1:" + port, db=db, schedule="continuous", settle_ms=1, alerts_file=alerts,
                     tls_cert=cert, tls_key=key)
sys.exit(serve(Config(collector=cc), "s3cret-s3cret"))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_proc(tmp_path: Path, port: int, cert: str = "", key: str = "") -> Any:
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    args = [
        sys.executable,
        "-c",
        SERVE,
        str(port),
        str(tmp_path / "s.db"),
        str(tmp_path / "alerts.ndjson"),
        cert,
        key,
    ]
    with open(tmp_path / f"serve-{port}.log", "w") as log:
        return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_up(conn_factory: Any, proc: Any) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert proc.poll() is None, "collector exited"
        c = conn_factory()
        try:
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.1)
        finally:
            c.close()
    raise AssertionError("collector did not come up")


def test_serve_continuous_alerts_and_sigterm(tmp_path: Path) -> None:
    import signal

    port = _free_port()
    proc = _serve_proc(tmp_path, port)
    try:
        _wait_up(lambda: http.client.HTTPConnection("127.0.0.1", port, timeout=5), proc)
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        body = {"enrollment_secret": "s3cret-s3cret", "agent_id": "a-1", "host_name": "web-1"}
        c.request("POST", "/api/v1/enroll", json.dumps(body))
        key = json.loads(c.getresponse().read())["api_key"]
        now = int(time.time() * 1000)
        d = doc(
            "a-1",
            sent_at=now,
            events=[{"ts": now - 2000, "action": "creation", "exe": b"/e", "path": b"/p\n"}],
        )
        c.request("POST", "/api/v1/batches", pack(d), {"Authorization": f"Bearer {key}"})
        assert c.getresponse().status == 200
        alerts = tmp_path / "alerts.ndjson"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (alerts.exists() and b'"file"' in alerts.read_bytes()):
            time.sleep(0.2)
        docs = [json.loads(line) for line in alerts.read_text().splitlines()]
        # the new agent's enrollment (a health alert), then the rule's alert
        assert [d["rule"]["id"] for d in docs] == ["rarewrite-sensor-health", Rule().rule_id]
        assert docs[0]["rarewrite"]["health"]["kind"] == "agent_enrolled"
        assert docs[1]["file"]["path"] == "/p\n"
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_serve_tls(tmp_path: Path) -> None:
    import shutil
    import ssl
    import subprocess

    if not shutil.which("openssl"):
        pytest.skip("no openssl to make a certificate")
    cert, key = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = _free_port()
    proc = _serve_proc(tmp_path, port, cert, key)
    ctx = ssl.create_default_context(cafile=cert)
    try:
        _wait_up(lambda: http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=ctx), proc)
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            plain.request("GET", "/healthz")
            plain.getresponse()
        plain.close()
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
