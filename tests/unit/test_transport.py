"""The requests transport against real sockets: a reply that trickles or is
too large is a failure (the batch stays), never a hang."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from agent.errors import ShipError
from agent.shipper import MAX_RESPONSE, RequestsTransport


def _serve(reply: bytes, trickle: float) -> Iterator[str]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    stop = threading.Event()

    def run() -> None:
        conn, _ = srv.accept()
        with conn, contextlib.suppress(OSError):  # the client hangs up on us: that is the point
            conn.recv(65536)
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
        RequestsTransport(timeout=1.0).post(trickling, b"body", {})
    assert time.monotonic() - t0 < 5


def test_a_huge_reply_is_refused(huge: str) -> None:
    with pytest.raises(ShipError, match="larger than"):
        RequestsTransport(timeout=5.0).post(huge, b"body", {})
