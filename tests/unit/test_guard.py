"""The connection guard's bookkeeping, with fake transports: who is evicted
at a cap, who is never, and the header deadline's clock."""

from __future__ import annotations

import asyncio
from typing import Any

from agent.collector.guard import ConnectionGuard, Limits
from agent.shared.clock import FakeClock
from agent.shared.ratelimit import RateLimiter


class FakeTransport:
    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.aborted = False
        self.written: list[bytes] = []

    def get_extra_info(self, name: str) -> Any:
        return (self.peer, 1234) if name == "peername" else None

    def abort(self) -> None:
        self.aborted = True

    def write(self, data: bytes) -> None:
        self.written.append(data)


class Inner(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data


def _guard(**limits: Any) -> tuple[ConnectionGuard, list[float]]:
    now = [100.0]
    guard = ConnectionGuard(Inner, Limits(**limits), RateLimiter(FakeClock(0), 5, 60.0), lambda: now[0])
    return guard, now


def _connect(guard: ConnectionGuard, peer: str = "10.0.0.1") -> tuple[Any, FakeTransport]:
    conn, t = guard(), FakeTransport(peer)
    conn.connection_made(t)  # type: ignore[arg-type]
    return conn, t


def test_at_the_peer_cap_the_least_recently_active_idle_connection_goes_never_a_busy_one() -> None:
    guard, _ = _guard(max_connections=100, max_per_peer=3)
    busy, t_busy = _connect(guard)
    busy.data_received(b"POST / HTTP/1.1\r\nHost: x\r\n\r\nbody")  # header complete: in a request
    idle, t_idle = _connect(guard)
    slow, t_slow = _connect(guard)
    slow.data_received(b"GET / HT")
    idle.data_received(b"G")  # idle becomes the more recently active
    _, t_new = _connect(guard)
    assert (t_busy.aborted, t_slow.aborted, t_idle.aborted, t_new.aborted) == (False, True, False, False)
    _, t_other = _connect(guard, "10.0.0.2")  # another address has its own cap
    assert not t_other.aborted and guard.per_peer["10.0.0.1"] == 3
    assert busy.inner.data.endswith(b"body")  # everything reaches aiohttp's protocol


def test_when_every_held_connection_is_busy_the_new_one_is_refused() -> None:
    guard, _ = _guard(max_connections=2, max_per_peer=10)
    for peer in ("a", "b"):
        c, _ = _connect(guard, peer)
        c.data_received(b"GET / HTTP/1.1\r\n\r\n")
    _, t = _connect(guard, "c")
    assert t.aborted and guard.closed["total_cap"] == 1 and len(guard.live) == 2


def test_the_header_deadline_runs_from_connect_and_from_the_first_byte_after_an_answer() -> None:
    guard, now = _guard(header_timeout_s=10.0)
    conn, t = _connect(guard)
    conn.data_received(b"GET / HTTP/1.1\r\n")
    now[0] += 5
    conn.data_received(b"Host: x\r")
    now[0] += 4
    conn.data_received(b"\n\r\n")  # complete, at 9 s: no deadline while aiohttp works
    now[0] += 60
    assert guard.sweep() == 0
    conn.inner.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")  # answered: idle, aiohttp's keep-alive
    now[0] += 600
    assert guard.sweep() == 0 and not t.aborted
    conn.data_received(b"GET")  # a new header starts its own 10 s
    now[0] += 10
    assert guard.sweep() == 1 and t.aborted and guard.closed["header_timeout"] == 1
