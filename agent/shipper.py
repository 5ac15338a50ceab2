"""Enroll with the collector, send the outbox, back off, ack.

Delivery is at-least-once with exactly-once effect: a batch leaves the
outbox only after a 2xx, and its bytes (seq and batch id included) never
change once formed, so a resend after a crash is a duplicate by name at the
collector. TLS is verified by default and a TLS failure is a failure like
any other: there is no fallback to plain HTTP.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import json
import logging
import os
import random
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Optional, Protocol

from agent import __version__
from agent.clock import Clock
from agent.errors import EnrollError, ShipError
from agent.store import AgentStore

log = logging.getLogger("rarewrite.shipper")

MAX_RESPONSE = 64 << 10  # a collector reply larger than this is garbage
BUSY_WAIT_S = 5.0  # the longest the shipper holds back for a busy reader before it sends one batch


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes


class Transport(Protocol):
    """The HTTP seam; tests use FakeTransport, everything else HttpTransport."""

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Response:
        """POST and return the reply; raise ShipError when no reply came."""


# What a kept-alive connection the collector has closed meanwhile raises,
# over plain TCP and over TLS (with or without a close_notify first).
_STALE = (
    http.client.RemoteDisconnected,
    ConnectionResetError,
    BrokenPipeError,
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
)


class HttpTransport:
    """One kept-alive connection per collector through the standard library's
    http.client: verified TLS, timeouts, a capped reply, no redirects and no
    proxy or netrc from the environment. (requests and urllib3 cost the agent
    7 MB of its RSS for one POST endpoint.)"""

    def __init__(
        self,
        timeout: float = 30.0,
        ca_bundle: str = "",
        client_cert: str = "",
        client_key: str = "",
    ) -> None:
        self.timeout = timeout
        self._ca_bundle = ca_bundle
        self._client_cert = client_cert
        self._client_key = client_key
        self._ctx: Optional[ssl.SSLContext] = None
        self._conn: Optional[http.client.HTTPConnection] = None
        self._origin: Optional[tuple[str, str, int]] = None

    def _context(self) -> ssl.SSLContext:
        if self._ctx is None:
            ctx = ssl.create_default_context(cafile=self._ca_bundle or None)  # verifies name and chain
            if self._client_cert:
                ctx.load_cert_chain(self._client_cert, self._client_key or None)
            self._ctx = ctx
        return self._ctx

    def _connection(self, scheme: str, host: str, port: int) -> http.client.HTTPConnection:
        origin = (scheme, host, port)
        if self._conn is not None and self._origin == origin:
            return self._conn
        self.close()
        if scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=self.timeout, context=self._context()
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        self._conn, self._origin = conn, origin
        return conn

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Response:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ShipError(f"not an http(s) URL: {url!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            raise ShipError(f"bad port in {url!r}: {e}") from None
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        for attempt in (1, 2):
            conn = self._connection(parts.scheme, parts.hostname, port)
            reused = conn.sock is not None
            try:
                conn.request("POST", path, body=body, headers=dict(headers))
                reply = conn.getresponse()
            except _STALE as e:
                self.close()
                if reused and attempt == 1:
                    continue  # the collector closed a kept-alive connection: once more on a new one
                raise ShipError(f"{type(e).__name__}: {_short(e)}") from None
            except (OSError, http.client.HTTPException, ValueError) as e:
                self.close()
                raise ShipError(f"{type(e).__name__}: {_short(e)}") from None
            return self._read(url, conn, reply)
        raise ShipError(f"no reply from {url}")  # not reached: the second attempt returns or raises

    def _read(self, url: str, conn: http.client.HTTPConnection, reply: http.client.HTTPResponse) -> Response:
        limit = 2 * self.timeout  # a reply that trickles is a failure too: whole reply, not per read
        late = threading.Event()
        sock = conn.sock

        def give_up() -> None:
            late.set()
            if sock is not None:  # wakes the blocked read (a close alone would not)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        timer = threading.Timer(limit, give_up)
        timer.start()
        try:
            data = reply.read(MAX_RESPONSE + 1)
        except Exception as e:  # noqa: BLE001 - whatever the shut socket raises
            self.close()
            if late.is_set():
                raise ShipError(f"reply from {url} took longer than {limit:.0f} s") from None
            raise ShipError(f"reading the reply from {url}: {type(e).__name__}: {_short(e)}") from None
        finally:
            timer.cancel()
        if late.is_set():
            self.close()
            raise ShipError(f"reply from {url} took longer than {limit:.0f} s")
        if len(data) > MAX_RESPONSE:
            self.close()
            raise ShipError(f"reply from {url} larger than {MAX_RESPONSE} bytes")
        if not reply.isclosed() or reply.will_close:
            self.close()  # body left unread or no length, or the collector said close: not reusable
        return Response(reply.status, dict(reply.getheaders()), data)

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
        self._conn, self._origin = None, None


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def retry_after(headers: Mapping[str, str], now_s: float) -> Optional[float]:
    """Seconds from a Retry-After header (delta seconds or an HTTP date)."""
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(min(int(value), 3600))
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, min(when - now_s, 3600.0))


class Backoff:
    """Exponential backoff with full jitter on the monotonic clock."""

    def __init__(self, base: float = 0.5, cap: float = 300.0, rng: Optional[random.Random] = None) -> None:
        self.base, self.cap, self.failures = base, cap, 0
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not a secret

    def next_delay(self) -> float:
        self.failures += 1
        return self.rng.uniform(self.base, min(self.cap, self.base * 2**self.failures))

    def reset(self) -> None:
        self.failures = 0


@dataclass(frozen=True)
class Identity:
    agent_id: str
    host_name: str


class Shipper:
    """Moves the outbox to the collector. ``ship_once`` is one step, ``run``
    loops until told to stop."""

    def __init__(
        self,
        store: AgentStore,
        transport: Transport,
        collector_url: str,
        state_dir: str,
        identity: Identity,
        secret: str,
        clock: Clock,
        batch_max_records: int = 5000,
        backoff_max_s: float = 300.0,
    ) -> None:
        self.store = store
        self.transport = transport
        self.url = collector_url.rstrip("/")
        self.key_path = os.path.join(state_dir, "api_key")
        self.identity = identity
        self.secret = secret
        self.clock = clock
        self.batch_max = batch_max_records
        self.backoff = Backoff(cap=backoff_max_s)
        self.not_before = 0.0  # monotonic time before which nothing is sent
        self.reachable: Optional[bool] = None
        self.last_success_ms: Optional[int] = None
        self.last_error: Optional[str] = None
        self.counters = {"batches_sent": 0, "records_sent": 0, "duplicates": 0, "refused": 0, "failures": 0}
        self._key: Optional[str] = None
        self._sending = threading.Lock()

    # -------------------------------------------------------------- enrollment

    def api_key(self) -> str:
        if self._key is None:
            self._key = self._load_key() or self.enroll()
        return self._key

    def _load_key(self) -> Optional[str]:
        try:
            with open(self.key_path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return None
        if doc.get("agent_id") != self.identity.agent_id or doc.get("host_name") != self.identity.host_name:
            return None  # a new identity enrolls anew
        key = doc.get("api_key")
        return key if isinstance(key, str) else None

    def enroll(self) -> str:
        """POST /api/v1/enroll; the key is kept in the state dir, mode 0600."""
        body = json.dumps(
            {
                "enrollment_secret": self.secret,
                "agent_id": self.identity.agent_id,
                "host_name": self.identity.host_name,
            }
        ).encode()
        try:
            r = self.transport.post(
                self.url + "/api/v1/enroll", body, {"Content-Type": "application/json", "User-Agent": _UA}
            )
        except ShipError:
            self.reachable = False
            raise
        self.reachable = True
        if r.status == 403:
            raise EnrollError("the collector refused enrollment (HTTP 403): this agent id was revoked")
        if r.status == 401:
            raise EnrollError("the collector refused enrollment (HTTP 401): check the enrollment secret")
        if r.status != 200:
            raise ShipError(f"enrollment failed: HTTP {r.status}")
        try:
            key = json.loads(r.body)["api_key"]
            if not isinstance(key, str) or not key:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise ShipError("enrollment reply holds no api_key") from None
        tmp = self.key_path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(
                {"agent_id": self.identity.agent_id, "host_name": self.identity.host_name, "api_key": key}, f
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.key_path)
        log.info("event=enrolled agent_id=%s host_name=%r", self.identity.agent_id, self.identity.host_name)
        return key

    # -------------------------------------------------------------- shipping

    def ship_once(self) -> bool:
        """Send one batch if there is one and the backoff allows; True when a
        batch was acknowledged. EnrollError propagates (fatal). One send at a
        time: the shutdown flush may run while the shipper thread still waits
        for an answer."""
        with self._sending:
            return self._ship_once()

    def _ship_once(self) -> bool:
        if self.clock.monotonic() < self.not_before:
            return False
        lease = self.store.lease(
            self.identity.agent_id, self.identity.host_name, self.store.next_batch_limit(self.batch_max)
        )
        if lease is None:
            return False
        try:
            headers = {
                "Content-Type": "application/msgpack",
                "Authorization": f"Bearer {self.api_key()}",
                "User-Agent": _UA,
            }
            r = self.transport.post(self.url + "/api/v1/batches", lease.body, headers)
        except EnrollError:
            raise
        except ShipError as e:
            # with no key yet the error came from enroll(), which set reachable itself
            self._failed(str(e), None, reached=False if self._key is not None else None)
            return False
        if 200 <= r.status < 300:
            self.store.ack(lease)
            self.backoff.reset()
            self.reachable, self.last_error = True, None
            self.last_success_ms = self.clock.now_ms()
            self.counters["batches_sent"] += 1
            self.counters["records_sent"] += lease.n
            if b"duplicate" in r.body:
                self.counters["duplicates"] += 1
            return True
        self.reachable = True
        if r.status == 401:  # key unknown or revoked: enroll again (osquery's node_invalid)
            self._key = None
            try:
                os.unlink(self.key_path)
            except FileNotFoundError:
                pass
            self._failed("collector does not know our key; enrolling again", None)
        elif r.status in (400, 413):
            reason = r.body[:300].decode("utf-8", "replace")
            self.counters["refused"] += 1
            log.warning(
                "event=batch_refused status=%d seq=%d records=%d reason=%r",
                r.status,
                lease.seq,
                lease.n,
                reason,
            )
            self.store.split(lease, f"HTTP {r.status}: {reason}")
        else:
            self._failed(f"HTTP {r.status}", retry_after(r.headers, self.clock.now_ms() / 1000))
        return False

    def _failed(self, why: str, wait: Optional[float], reached: Optional[bool] = None) -> None:
        self.counters["failures"] += 1
        if reached is not None:  # not from the text: "ConnectionError: HTTPConnectionPool..." has "HTTP"
            self.reachable = reached
        delay = wait if wait is not None else self.backoff.next_delay()
        if wait is not None:
            self.backoff.failures += 1
        self.not_before = self.clock.monotonic() + delay
        if why != self.last_error:
            log.warning("event=ship_failed error=%r retry_in=%.1fs", why, delay)
        self.last_error = why

    def run(
        self, stop: threading.Event, interval: float = 1.0, busy: Optional[threading.Event] = None
    ) -> None:
        """Ship until ``stop`` is set; a fatal EnrollError ends the loop.

        While ``busy`` is set (the reader is in a burst) the loop waits, at
        most BUSY_WAIT_S at a time, so that it does not take the GIL from
        the reader: the events are safe in the outbox and leave right after.
        """
        held = 0.0
        while not stop.is_set():
            if busy is not None and busy.is_set() and held < BUSY_WAIT_S:
                stop.wait(0.1)
                held += 0.1
                continue
            held = 0.0
            try:
                if self._key is None and self.clock.monotonic() >= self.not_before:
                    self.api_key()  # enroll now, not at the first event: a wrong secret fails at start (A13)
                shipped = False
                while self.ship_once() and not stop.is_set():
                    shipped = True
                    if busy is not None and busy.is_set():
                        break
                if shipped and self.store.depth() == 0:
                    self.store.shrink_connection()  # all sent: this thread's page cache can go
            except EnrollError:
                raise
            except ShipError as e:
                self._failed(str(e), None)
            except Exception as e:
                log.exception("event=shipper_error error=%r", str(e))
                self._failed(str(e), None)
            stop.wait(max(0.05, min(interval, self.not_before - self.clock.monotonic())))

    def drain(self, deadline_s: float) -> bool:
        """Ship until the outbox is empty or the monotonic deadline passes."""
        while self.clock.monotonic() < deadline_s:
            if self.store.depth() == 0:
                return True
            if not self.ship_once():
                wait = max(
                    0.05, min(self.not_before - self.clock.monotonic(), deadline_s - self.clock.monotonic())
                )
                self.clock.sleep(min(wait, 1.0))
        return self.store.depth() == 0


_UA = f"rarewrite-agent/{__version__}"


class FakeTransport:
    """A transport for unit tests (httpx's MockTransport idea): ``handler``
    answers each request; every request is kept in ``sent``."""

    def __init__(self, handler: Callable[[str, bytes, Mapping[str, str]], Response]) -> None:
        self.handler = handler
        self.sent: list[tuple[str, bytes, dict[str, str]]] = []

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Response:
        self.sent.append((url, body, dict(headers)))
        return self.handler(url, body, headers)
