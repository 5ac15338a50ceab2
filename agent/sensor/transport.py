"""The agent's HTTP seam: a Transport posts one body and returns the reply;
:class:`HttpTransport` is the real one, :class:`FakeTransport` the one for
unit tests."""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Optional, Protocol

from agent import __version__
from agent.shared.errors import ShipError

MAX_RESPONSE = 64 << 10  # a collector reply larger than this is garbage


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


USER_AGENT = f"rarewrite-agent/{__version__}"


class FakeTransport:
    """A transport for unit tests (httpx's MockTransport idea): ``handler``
    answers each request; every request is kept in ``sent``."""

    def __init__(self, handler: Callable[[str, bytes, Mapping[str, str]], Response]) -> None:
        self.handler = handler
        self.sent: list[tuple[str, bytes, dict[str, str]]] = []

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Response:
        self.sent.append((url, body, dict(headers)))
        return self.handler(url, body, headers)
