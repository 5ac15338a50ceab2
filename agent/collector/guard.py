"""Connections the collector holds: caps, a header deadline, eviction.

aiohttp has no deadline for a request's header (a client that sends one
byte a second holds its connection until the keep-alive timeout) and no cap
on connections, so a few hundred slow or idle sockets exhaust the process's
descriptors and the agents cannot ship. :class:`ConnectionGuard` sits between
the listening socket and aiohttp's protocol and keeps, per connection, which
part of a request it is in:

- ``waiting``: connected, or answered, and nothing of the next request yet;
- ``header``: part of a header has arrived (the deadline runs);
- ``busy``: the header is complete; aiohttp reads the body within
  ``read_timeout`` and answers.

A connection gets ``header_timeout`` from its start (or from the first byte
after an answer) to complete its header; a fresh connection that sends
nothing in that time is closed too. At the caps (total and per peer address)
a new connection evicts the least recently active connection that is not
busy — idle keep-alive and slow-header sockets go first, so an agent that
connects while an attacker holds thousands of sockets is still served; only
when every held connection is busy is the new one refused. Idle keep-alive
connections are left to aiohttp's keep-alive timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, cast

from agent.shared.ratelimit import RateLimiter

security = logging.getLogger("rarewrite.collector.security")

_END = b"\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100"


@dataclass(frozen=True)
class Limits:
    max_connections: int = 10_000
    max_per_peer: int = 1_000
    header_timeout_s: float = 10.0


class ConnectionGuard:
    """A protocol factory wrapping aiohttp's (``runner.server``); see the module doc."""

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        limits: Limits,
        log_limiter: RateLimiter,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.factory = factory
        self.limits = limits
        self.clock = clock
        self.log_limiter = log_limiter
        self.live: OrderedDict[_Guarded, None] = OrderedDict()  # least recently active first
        self.per_peer: Counter[str] = Counter()
        self.closed: Counter[str] = Counter()  # connections we closed, by reason

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self)

    # ---------------------------------------------------------- bookkeeping

    def admit(self, conn: _Guarded) -> bool:
        """Make room for ``conn`` (evicting idle ones); False: refuse it."""
        if self.per_peer[conn.peer] >= self.limits.max_per_peer:
            if not self._evict(conn.peer):
                return self._refuse(conn, "peer_cap")
        if len(self.live) >= self.limits.max_connections:
            if not self._evict(None):
                return self._refuse(conn, "total_cap")
        self.live[conn] = None
        self.per_peer[conn.peer] += 1
        return True

    def _evict(self, peer: Optional[str]) -> bool:
        for old in self.live:
            if old.state != "busy" and (peer is None or old.peer == peer):
                self.closed["evicted"] += 1
                self._log("evicted", old.peer)
                self.gone(old)  # now, not at its connection_lost: the next admit must not pick it again
                old.abort()
                return True
        return False

    def _refuse(self, conn: _Guarded, why: str) -> bool:
        self.closed[why] += 1
        self._log(why, conn.peer)
        return False

    def touched(self, conn: _Guarded) -> None:
        if conn in self.live:
            self.live.move_to_end(conn)

    def gone(self, conn: _Guarded) -> None:
        if conn in self.live:
            del self.live[conn]
            self.per_peer[conn.peer] -= 1
            if self.per_peer[conn.peer] <= 0:
                del self.per_peer[conn.peer]

    def sweep(self) -> int:
        """Close connections past their header deadline; how many."""
        now = self.clock()
        late = [c for c in self.live if c.deadline is not None and now >= c.deadline]
        for c in late:
            self.closed["header_timeout"] += 1
            self._log("header_timeout", c.peer)
            self.gone(c)
            c.abort()
        return len(late)

    async def run(self, every_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            self.sweep()

    def _log(self, why: str, peer: str) -> None:
        self.log_limiter.log(
            security,
            logging.WARNING,
            f"conn:{why}",
            "event=connection_closed reason=%s peer=%r connections=%d",
            why,
            peer,
            len(self.live),
        )


class _Guarded(asyncio.Protocol):
    """One connection: forwards everything to aiohttp's protocol, watching
    where in a request it is."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard
        self.inner: Optional[Any] = None
        self.transport: Optional[asyncio.BaseTransport] = None
        self.peer = "?"
        self.state = "waiting"
        self.deadline: Optional[float] = None
        self._tail = b""

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else "?"
        if not self.guard.admit(self):
            self.transport = None
            transport.abort()  # type: ignore[attr-defined]
            return
        self.deadline = self.guard.clock() + self.guard.limits.header_timeout_s
        self.inner = self.guard.factory()
        # aiohttp uses write, writelines and what __getattr__ forwards
        self.inner.connection_made(cast(asyncio.BaseTransport, _Transport(transport, self)))

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            return
        self.guard.touched(self)
        if self.state != "busy":
            if self.deadline is None:  # the first byte of a request after an answer
                self.deadline = self.guard.clock() + self.guard.limits.header_timeout_s
            seen = self._tail + data
            if _END in seen:
                self.state, self.deadline, self._tail = "busy", None, b""
            else:
                self.state, self._tail = "header", seen[-3:]
        self.inner.data_received(data)

    def answered(self, data: Any) -> None:
        """aiohttp wrote to the client: the request was answered (an interim
        ``100 Continue`` aside), the next bytes start a new header."""
        if self.state == "busy" and not bytes(data[:12]).startswith(_CONTINUE):
            self.state, self.deadline, self._tail = "waiting", None, b""
            self.guard.touched(self)

    def eof_received(self) -> Optional[bool]:
        return self.inner.eof_received() if self.inner is not None else None

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.inner is None:
            return
        self.guard.gone(self)
        inner, self.inner, self.transport = self.inner, None, None
        inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


class _Transport:
    """The real transport, telling its connection when an answer is written."""

    def __init__(self, real: asyncio.BaseTransport, conn: _Guarded) -> None:
        self._real = real
        self._conn = conn

    def write(self, data: Any) -> None:
        self._conn.answered(data)
        self._real.write(data)  # type: ignore[attr-defined]

    def writelines(self, chunks: Any) -> None:
        chunks = list(chunks)
        if chunks:
            self._conn.answered(chunks[0])
        self._real.writelines(chunks)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)
