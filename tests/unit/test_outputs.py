"""Alert outputs against real receivers: an HTTP server on loopback, syslog on
a unix datagram socket, UDP and TCP; NDJSON rotation; config validation."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pytest

from agent.collector.outputs import build_outputs, dropped_counts
from agent.collector.outputs.ndjson import NdjsonOutput
from agent.collector.outputs.stdout import StdoutOutput
from agent.collector.outputs.syslog import SyslogOutput
from agent.collector.outputs.webhook import WebhookOutput
from agent.shared.config.load import load
from agent.shared.config.schema import CollectorConfig, Config, OutputConfig
from agent.shared.errors import ConfigError

SECRET = "s3cret-token-value"


def alert(i: int, severity: str = "medium", **extra: Any) -> dict[str, Any]:
    return {
        "@timestamp": "2026-01-01T00:00:00.000Z",
        "kibana": {"alert": {"uuid": f"id-{i}", "severity": severity}},
        "rule": {"name": "Unusual File Creation by Web Server"},
        "file": {"path": f"/srv/www/f{i}.php"},
        "process": {"executable": "/usr/sbin/nginx"},
        "rarewrite": {"events": [{"process.command_line": "nginx -c 'x\ny\x1b[31m\x7f'"}]},
        **extra,
    }


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


# ------------------------------------------------------------------ NDJSON


def test_ndjson_rotates_before_a_write_would_pass_the_bound(tmp_path: Path) -> None:
    f = tmp_path / "alerts.ndjson"
    line_len = len(json.dumps(alert(0), sort_keys=True, separators=(",", ":")).encode()) + 1
    out = NdjsonOutput(str(f), "t", max_bytes=3 * line_len, keep=2)
    try:
        out.emit([alert(i) for i in range(3)])  # exactly at the bound: no rotation
        assert f.stat().st_size == 3 * line_len and not (tmp_path / "alerts.ndjson.1").exists()
        out.emit([alert(3)])  # would pass: rotate first
        assert f.stat().st_size == line_len
        assert (tmp_path / "alerts.ndjson.1").stat().st_size == 3 * line_len
        out.emit([alert(i) for i in range(4, 10)])  # one batch across two more rotations
    finally:
        out.close()
    ids = [
        [json.loads(x)["kibana"]["alert"]["uuid"] for x in p.read_text().splitlines()]
        for p in (f, Path(f"{f}.1"))
    ]
    assert ids == [["id-9"], ["id-6", "id-7", "id-8"]]
    assert (tmp_path / "alerts.ndjson.2").exists() and not (tmp_path / "alerts.ndjson.3").exists()
    assert all(p.stat().st_size <= 3 * line_len for p in tmp_path.iterdir())
    assert out.rotations == 3


def test_ndjson_reopens_an_existing_file_and_counts_its_size(tmp_path: Path) -> None:
    f = tmp_path / "a.ndjson"
    f.write_bytes(b"x" * 100 + b"\n")
    out = NdjsonOutput(str(f), "t", max_bytes=150, keep=1)
    out.emit([alert(1)])
    out.close()
    assert (tmp_path / "a.ndjson.1").read_bytes() == b"x" * 100 + b"\n"
    assert json.loads(f.read_text())["kibana"]["alert"]["uuid"] == "id-1"


def test_alerts_file_is_bounded_with_the_defaults(tmp_path: Path) -> None:
    cfg = Config(collector=CollectorConfig(alerts_file=str(tmp_path / "a.ndjson")))
    outs = build_outputs(cfg)
    try:
        assert [(o.name, o.max_bytes, o.keep) for o in outs if isinstance(o, NdjsonOutput)] == [
            ("alerts_file", 100 << 20, 5)
        ]
    finally:
        for o in outs:
            o.close()


def test_stdout_json_format() -> None:
    buf = io.StringIO()
    StdoutOutput(buf, fmt="json").emit([alert(1)])
    assert json.loads(buf.getvalue())["kibana"]["alert"]["uuid"] == "id-1"
    buf = io.StringIO()
    StdoutOutput(buf).emit([alert(1)])
    assert buf.getvalue().startswith("ALERT ") and buf.getvalue().count("\n") == 1


def test_stdout_summary_shows_the_first_rules_counts_only_where_an_alert_has_them() -> None:
    buf = io.StringIO()
    first = alert(1, rarewrite={"cc": 2, "gap_on_other_agents": False})
    new_terms = alert(2, rarewrite={"first_seen": "2026-01-01T00:00:00.000Z"})
    StdoutOutput(buf).emit([first, new_terms])
    one, two = buf.getvalue().splitlines()
    assert " cc=2 gap_on_other_agents=false " in one
    assert "cc=" not in two and "gap_on_other_agents=" not in two and 'id="id-2"' in two


# ------------------------------------------------------------------ webhook


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True


class Receiver:
    """http.server on 127.0.0.1; answers from a script of statuses, then 200."""

    def __init__(self, port: int = 0) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.script: list[tuple[int, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status, headers = outer.script.pop(0) if outer.script else (200, {})
                outer.requests.append((dict(self.headers.items()), body))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = _Server(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def receiver(port: int = 0) -> Iterator[Receiver]:
    r = Receiver(port)
    try:
        yield r
    finally:
        r.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_webhook_posts_one_json_alert_with_the_secret_header() -> None:
    with receiver() as r:
        out = WebhookOutput(r.url, "hook", "X-Rarewrite-Token", SECRET, queue_max=10, backoff_max_s=0.2)
        try:
            out.emit([alert(1), alert(2)])
            assert wait_for(lambda: out.sent == 2)
        finally:
            out.close()
    assert [json.loads(b)["kibana"]["alert"]["uuid"] for _, b in r.requests] == ["id-1", "id-2"]
    headers = {k.lower(): v for k, v in r.requests[0][0].items()}
    assert headers["x-rarewrite-token"] == SECRET
    assert headers["content-type"] == "application/json"
    assert headers["x-rarewrite-alert-id"] == "id-1"
    assert SECRET not in repr(out)


def test_webhook_retries_a_503_then_succeeds_and_honours_retry_after() -> None:
    with receiver() as r:
        r.script = [(503, {"Retry-After": "1"}), (429, {}), (500, {})]
        out = WebhookOutput(r.url, "hook", queue_max=10, backoff_max_s=0.1)
        try:
            t0 = time.monotonic()
            out.emit([alert(1)])
            assert wait_for(lambda: out.sent == 1)
            took = time.monotonic() - t0
        finally:
            out.close()
    assert len(r.requests) == 4 and len({b for _, b in r.requests}) == 1  # the same alert each time
    assert out.counters() == {"sent": 1, "dropped": 0, "failed": 0, "retries": 3}
    assert took >= 1.0  # Retry-After: 1


def test_webhook_4xx_is_a_refusal_not_a_retry() -> None:
    with receiver() as r:
        r.script = [(400, {})]
        out = WebhookOutput(r.url, "hook", queue_max=10, backoff_max_s=0.1)
        try:
            out.emit([alert(1), alert(2)])
            assert wait_for(lambda: out.sent == 1 and out.failed == 1)
        finally:
            out.close()
    assert len(r.requests) == 2


def test_webhook_queue_drops_the_oldest_when_the_receiver_is_down() -> None:
    port = free_port()  # nothing listens there yet: connection refused
    out = WebhookOutput(f"http://127.0.0.1:{port}/hook", "hook", queue_max=3, backoff_max_s=0.1)
    try:
        t0 = time.monotonic()
        out.emit([alert(i) for i in range(10)])
        assert time.monotonic() - t0 < 0.5  # emit never waits for the network
        assert wait_for(lambda: out.retries >= 1)
        # one in flight (the first, or the oldest left), at most 3 waiting, the rest dropped oldest first
        assert out.dropped in (6, 7) and out.dropped + out.pending() == 9
        assert dropped_counts([out]) == {"hook": out.dropped}
        with receiver(port) as r:
            assert wait_for(lambda: out.sent + out.dropped == 10)
            ids = [json.loads(b)["kibana"]["alert"]["uuid"] for _, b in r.requests]
    finally:
        out.close()
    assert ids[-3:] == ["id-7", "id-8", "id-9"]
    assert len(ids) == 10 - out.dropped


def test_webhook_verifies_tls_by_default() -> None:
    # a plain-HTTP receiver on an https:// URL: the handshake fails, and is retried
    with receiver() as r:
        out = WebhookOutput(r.url.replace("http:", "https:"), "hook", queue_max=5, backoff_max_s=0.1)
        try:
            out.emit([alert(1)])
            assert wait_for(lambda: out.retries >= 1)
            assert out.sent == 0
        finally:
            out.close()


# ------------------------------------------------------------------ syslog

FRAME = re.compile(
    rb"<(\d+)>1 (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (\S+) (\S+) (\d+) (\S+) "
    rb'\[origin software="rarewrite" swVersion="[^"]+"\] (.*)\Z',
    re.DOTALL,
)


def parse5424(msg: bytes) -> dict[str, Any]:
    m = FRAME.match(msg)
    assert m, msg[:200]
    body = m.group(7)
    assert all(0x20 <= c < 0x7F for c in body), "control or non-ASCII byte in MSG"
    return {
        "pri": int(m.group(1)),
        "host": m.group(3).decode(),
        "app": m.group(4).decode(),
        "procid": int(m.group(5)),
        "msgid": m.group(6).decode(),
        "doc": json.loads(body),
    }


LOCAL = re.compile(rb"<(\d+)>([A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) (\S+)\[(\d+)\]: (.*)\Z", re.DOTALL)


def parse_local(msg: bytes) -> dict[str, Any]:
    """The local syslog format (what glibc's syslog() writes to /dev/log)."""
    m = LOCAL.match(msg)
    assert m, msg[:200]
    assert all(0x20 <= c < 0x7F for c in m.group(5)), "control or non-ASCII byte in MSG"
    return {"pri": int(m.group(1)), "app": m.group(3).decode(), "procid": int(m.group(4)), "msgid": "alert",
            "doc": json.loads(m.group(5))}  # fmt: skip


def check_frames(frames: list[bytes], facility: int, local: bool = False) -> None:
    got = [parse_local(f) if local else parse5424(f) for f in frames]
    assert [g["doc"]["kibana"]["alert"]["uuid"] for g in got] == ["id-1", "id-2"]
    assert [g["pri"] for g in got] == [facility * 8 + 4, facility * 8 + 3]  # medium warning, high err
    assert {(g["app"], g["procid"], g["msgid"]) for g in got} == {("rarewrite", os.getpid(), "alert")}
    cmd = got[0]["doc"]["rarewrite"]["events"][0]["process.command_line"]
    assert cmd == "nginx -c 'x\ny\x1b[31m\x7f'"  # escaped on the wire, intact after parsing


def test_syslog_unix_datagram(tmp_path: Path) -> None:
    path = str(tmp_path / "log.sock")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(path)
    rx.settimeout(5)
    out = SyslogOutput(path, "sys", facility="auth")
    try:
        out.emit([alert(1), alert(2, severity="high")])
        frames = [rx.recv(65536), rx.recv(65536)]
    finally:
        out.close()
        rx.close()
    check_frames(frames, 4, local=True)


def test_syslog_udp_and_a_too_large_alert_is_slimmed() -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(5)
    out = SyslogOutput(f"udp://127.0.0.1:{rx.getsockname()[1]}", "sys", facility="local0")
    try:
        out.emit([alert(1), alert(2, severity="high")])
        frames = [rx.recv(65536), rx.recv(65536)]
        out.emit([alert(3, rarewrite={"events": [{"x": "y" * 100_000}], "schedule": "continuous"})])
        big = parse5424(rx.recv(65536))
    finally:
        out.close()
        rx.close()
    check_frames(frames, 16)
    assert big["doc"]["rarewrite"] == {"schedule": "continuous", "truncated": True}


def read_octet_counted(conn: socket.socket, n: int) -> list[bytes]:
    buf, frames = b"", []
    while len(frames) < n:
        m = re.match(rb"(\d+) ", buf)
        if m and len(buf) >= m.end() + int(m.group(1)):
            end = m.end() + int(m.group(1))
            frames.append(buf[m.end() : end])
            buf = buf[end:]
            continue
        chunk = conn.recv(65536)
        assert chunk, "connection closed early"
        buf += chunk
    return frames


def test_syslog_tcp_octet_counting_and_reconnect() -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(5)
    out = SyslogOutput(f"tcp://127.0.0.1:{srv.getsockname()[1]}", "sys", facility="local7", backoff_max_s=0.1)
    try:
        out.emit([alert(1), alert(2, severity="high")])
        conn, _ = srv.accept()
        conn.settimeout(5)
        check_frames(read_octet_counted(conn, 2), 23)
        conn.close()  # the receiver restarts: the next alert goes over a new connection
        time.sleep(0.1)
        out.emit([alert(3)])
        conn2, _ = srv.accept()
        conn2.settimeout(5)
        assert parse5424(read_octet_counted(conn2, 1)[0])["doc"]["kibana"]["alert"]["uuid"] == "id-3"
        conn2.close()
    finally:
        out.close()
        srv.close()


def test_syslog_retries_until_the_socket_appears(tmp_path: Path) -> None:
    path = str(tmp_path / "late.sock")
    out = SyslogOutput(path, "sys", backoff_max_s=0.1)
    try:
        out.emit([alert(1)])
        assert wait_for(lambda: out.retries >= 1)
        rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        rx.bind(path)
        rx.settimeout(5)
        assert parse_local(rx.recv(65536))["doc"]["kibana"]["alert"]["uuid"] == "id-1"
        rx.close()
    finally:
        out.close()


# ------------------------------------------------------------------ config


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "collector.conf"
    p.write_text(text)
    return str(p)


def test_output_sections_are_converted_with_defaults(tmp_path: Path) -> None:
    secret = tmp_path / "hook.secret"
    secret.write_text(SECRET + "\n")
    conf = write(
        tmp_path,
        f"""
[output.archive]
type = ndjson
path = {tmp_path}/archive.ndjson
max_bytes = 1MiB

[output.soc]
type = webhook
url = https://soc.example/hook/
secret_header = X-Rarewrite-Token
secret_file = {secret}
timeout = 3s

[output.local]
type = syslog
address = udp://[::1]:514
facility = local0
""",
    )
    cfg = load([conf])
    opts = {o.name: (o.type, dict(o.options)) for o in cfg.outputs}
    assert opts["archive"] == (
        "ndjson",
        {"path": f"{tmp_path}/archive.ndjson", "max_bytes": 1 << 20, "keep": 5},
    )
    assert opts["soc"][1] == {
        "url": "https://soc.example/hook",
        "secret_header": "X-Rarewrite-Token",
        "secret_file": str(secret),
        "timeout": 3000,
        "queue_max": 10_000,
        "backoff_max": 60_000,
        "ca_bundle": "",
        "allow_plain_http": False,
    }
    assert opts["local"][1]["facility"] == "local0" and opts["local"][1]["app_name"] == "rarewrite"
    assert SECRET not in json.dumps(opts)
    outs = build_outputs(cfg)
    try:
        assert [type(o).__name__ for o in outs] == ["NdjsonOutput", "SyslogOutput", "WebhookOutput"]
    finally:
        for o in outs:
            o.close()


def test_output_section_problems_are_all_listed(tmp_path: Path) -> None:
    conf = write(
        tmp_path,
        """
[output.hook]
type = webhook
secret_header = X-Token
colour = blue

[output.sys]
type = syslog
facility = nope
address = udp://nohost

[output.file]
type = ndjson
keep = 0

[output.bird]
type = carrier-pigeon
""",
    )
    with pytest.raises(ConfigError) as e:
        load([conf])
    problems = e.value.problems
    expected = [
        "[output.bird] type: 'carrier-pigeon' is not an output type",
        "[output.file] keep: 0 is out of range",
        "[output.file] path: missing (required for type = ndjson)",
        "[output.hook] colour: unknown key for type = webhook",
        "[output.hook] url: missing (required for type = webhook)",
        "[output.hook] secret_header and secret_file: give both or neither",
        "[output.sys] facility: 'nope' is not allowed",
        "[output.sys] address: 'udp://nohost' is not a unix socket path",
    ]
    for want in expected:
        assert any(want in p and p.startswith(conf + ": ") for p in problems), (want, problems)
    assert len(problems) == len(expected)


def test_an_unreadable_secret_file_stops_the_build(tmp_path: Path) -> None:
    cfg = Config(
        outputs=(
            OutputConfig("ok", "ndjson", {"path": str(tmp_path / "a.ndjson")}),
            OutputConfig(
                "soc",
                "webhook",
                {"url": "https://x.example", "secret_header": "X-T", "secret_file": str(tmp_path / "none")},
            ),
        )
    )
    with pytest.raises(OSError, match=r"\[output.soc\]"):
        build_outputs(cfg)
