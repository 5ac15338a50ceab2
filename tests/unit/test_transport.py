"""The HTTP transport against real sockets: a reply that trickles or is
too large is a failure (the batch stays), never a hang."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from agent.sensor.transport import MAX_RESPONSE, HttpTransport
from agent.shared.errors import ShipError


def _serve(reply: bytes, trickle: float) -> Iterator[str]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    stop = threading.Event()

    def run() -> None:
        conn, _ = srv.accept()
        with conn, contextlib.suppress(OSError):  # the client hangs up on us: that is the point
            got = b""
            while not got.endswith(b"body"):  # all of the request: unread bytes at close reset the reply
                more = conn.recv(65536)
                if not more:
                    break
                got += more
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(reply)
            conn.sendall(head)
            if not trickle:
                conn.sendall(reply)
                conn.recv(1)  # wait for the client to hang up: closing first could reset it
                return
            for i in range(len(reply)):
                if stop.is_set():
                    return
                conn.sendall(reply[i : i + 1])
                time.sleep(trickle)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}/api/v1/batches"
    finally:
        stop.set()
        srv.close()
        t.join(5)


@pytest.fixture
def trickling() -> Iterator[str]:
    yield from _serve(b"x" * 100, 0.3)


@pytest.fixture
def huge() -> Iterator[str]:
    yield from _serve(b"y" * (MAX_RESPONSE + 10), 0)


def test_a_trickling_reply_fails_within_twice_the_timeout(trickling: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(ShipError, match="took longer"):
        HttpTransport(timeout=1.0).post(trickling, b"body", {})
    assert time.monotonic() - t0 < 5


def test_a_huge_reply_is_refused(huge: str) -> None:
    with pytest.raises(ShipError, match="larger than"):
        HttpTransport(timeout=5.0).post(huge, b"body", {})


def _keepalive_server(close_after_first: bool) -> tuple[str, list[int], socket.socket]:
    """Answers each request 200 with a length; counts connections. With
    ``close_after_first`` it hangs up on a kept-alive connection after one reply,
    as a collector does once its keep-alive timeout passes."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    accepted: list[int] = []

    def handle(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while True:
                data = b""
                while b"\r\n\r\n" not in data:
                    got = conn.recv(65536)
                    if not got:
                        return
                    data += got
                head, _, rest = data.partition(b"\r\n\r\n")
                length = int(
                    next(
                        h.split(b":")[1]
                        for h in head.split(b"\r\n")
                        if h.lower().startswith(b"content-length")
                    )
                )
                while len(rest) < length:
                    rest += conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                if close_after_first:
                    return

    def run() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            accepted.append(1)
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=run, daemon=True).start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}/api/v1/batches", accepted, srv


def test_posts_share_one_kept_alive_connection() -> None:
    url, accepted, srv = _keepalive_server(close_after_first=False)
    t = HttpTransport(timeout=5.0)
    try:
        for _ in range(3):
            r = t.post(url, b"body", {"Content-Type": "application/msgpack"})
            assert (r.status, r.body) == (200, b"ok")
        assert len(accepted) == 1
    finally:
        t.close()
        srv.close()


def test_a_connection_the_collector_closed_is_replaced_once() -> None:
    url, accepted, srv = _keepalive_server(close_after_first=True)
    t = HttpTransport(timeout=5.0)
    try:
        assert t.post(url, b"one", {}).status == 200
        time.sleep(0.1)  # the server has hung up meanwhile
        assert t.post(url, b"two", {}).status == 200
        assert len(accepted) == 2
    finally:
        t.close()
        srv.close()


def test_a_refused_connection_is_a_ship_error() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(ShipError, match="ConnectionRefusedError"):
        HttpTransport(timeout=2.0).post(f"http://127.0.0.1:{port}/x", b"body", {})
