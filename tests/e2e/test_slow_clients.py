"""Slow and idle clients against a real `collector serve`: a header deadline,
connection caps that evict idle sockets rather than refuse agents, and a
descriptor limit raised past the usual 1024."""

from __future__ import annotations

import contextlib
import resource
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from tests.support import fleet, procs

PARTIAL = b"POST /api/v1/batches HTTP/1.1\r\nHost: collector\r\nX-Slow: "


def _config(tmp: Path, **keys: str) -> str:
    path = tmp / "collector.conf"
    path.write_text("[collector]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))
    return str(path)


def _closed_within(s: socket.socket, seconds: float, trickle: bool) -> float | None:
    """Seconds until the server closes ``s`` (sending a byte every 0.2 s if
    ``trickle``), or None if still open after ``seconds``."""
    start = time.monotonic()
    s.settimeout(0.2)
    while time.monotonic() - start < seconds:
        try:
            if trickle:
                s.sendall(b"a")
            if s.recv(4096) == b"":
                return time.monotonic() - start
        except socket.timeout:
            continue
        except OSError:  # reset
            return time.monotonic() - start
    return None


def test_a_slow_or_silent_header_is_closed_at_the_deadline_not_kept_alive(tmp_path: Path) -> None:
    conf = _config(tmp_path, header_timeout="1s", idle_timeout="30s")
    with procs.collector(str(tmp_path), "--config", conf) as c:
        with socket.create_connection(("127.0.0.1", c.port)) as slow:
            slow.sendall(PARTIAL)
            took = _closed_within(slow, 15, trickle=True)
        assert took is not None and took < 6, took  # aiohttp alone: 75 s (its keep-alive timeout)
        with socket.create_connection(("127.0.0.1", c.port)) as silent:
            took = _closed_within(silent, 15, trickle=False)
        assert took is not None and took < 6, took
        # A kept-alive connection that was answered is idle, not slow: it stays
        # open past the header deadline, and its next request is served.
        with requests.Session() as s:
            assert s.get(c.url + "/healthz", timeout=5).status_code == 200
            time.sleep(2.5)
            assert s.get(c.url + "/healthz", timeout=5).status_code == 200
        metrics = requests.get(c.url + "/metrics", timeout=5).text
        assert 'rarewrite_collector_connections_closed_total{reason="header_timeout"} 2' in metrics


@contextlib.contextmanager
def _held(port: int, idle: int, slow: int) -> Iterator[list[socket.socket]]:
    """``idle`` connections that never send, ``slow`` that trickle a header."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    socks: list[socket.socket] = []
    stop = threading.Event()
    try:
        for _ in range(idle):
            socks.append(socket.create_connection(("127.0.0.1", port)))
        trickling = []
        for _ in range(slow):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(PARTIAL)
            trickling.append(s)
        socks += trickling

        def trickle() -> None:
            while not stop.wait(0.5):
                for s in trickling:
                    with contextlib.suppress(OSError):
                        s.send(b"a")

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        yield socks
    finally:
        stop.set()
        for s in socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_agents_keep_shipping_while_thousands_of_idle_and_slow_connections_are_held(tmp_path: Path) -> None:
    f = fleet.generate(11, n_agents=2, n_pairs=40, noise=20, at_ms=time.time_ns() // 1_000_000)
    paths = f.write(str(tmp_path / "fleet"))
    # The collector starts with the usual soft limit of 1024 descriptors; it raises its own.
    with procs.collector(str(tmp_path), nofile=1024) as c, _held(c.port, idle=2000, slow=200):
        for i, path in enumerate(paths):
            r = procs.replay(path, c.url, str(tmp_path / f"state-{i}"), f.agents[i], f.hosts[i])
            assert r.returncode == 0, r.stderr[-2000:]
        got = procs.evaluate(c.db, f.at_ms)
        metrics = requests.get(c.url + "/metrics", timeout=10).text
    assert {fleet.row_tuple(r) for r in got} == fleet.oracle_rows(f)
    # 2,200 from one address against a per-address cap of 1,000: room was made
    # by closing idle ones, never by refusing the agents.
    evicted = next(
        line for line in metrics.splitlines() if 'connections_closed_total{reason="evicted"}' in line
    )
    assert int(evicted.rsplit(" ", 1)[1]) >= 1200
    assert "Too many open files" not in c.log_text()
