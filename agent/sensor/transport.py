"""The agent's HTTP seam: a Transport posts one body and returns the reply;
:class:`HttpTransport` is the real one, :class:`FakeTransport` the one for
unit tests."""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, Union

import requests
import requests.adapters

from agent import __version__
from agent.shared.errors import ShipError

MAX_RESPONSE = 64 << 10  # a collector reply larger than this is garbage
USER_AGENT = f"rarewrite-agent/{__version__}"


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes


class Transport(Protocol):
    """The HTTP seam; tests use FakeTransport, everything else HttpTransport."""

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Response:
        """POST and return the reply; raise ShipError when no reply came."""


# What a kept-alive connection the collector has closed meanwhile raises
# (under requests' ConnectionError), over plain TCP and over TLS (with or
# without a close_notify first): the request is sent once more, on a new one.
_STALE = (
    http.client.RemoteDisconnected,
    ConnectionResetError,
    BrokenPipeError,
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
)


class HttpTransport:
    """requests with one pooled Session: a kept-alive connection per collector,
    TLS verified (the system store or ``ca_bundle``; a client certificate for
    mutual TLS), no redirects, nothing taken from the environment (proxies,
    netrc, CA bundles) except the explicit ``proxy``, and a reply capped at
    MAX_RESPONSE bytes that must arrive whole within twice the timeout."""

    def __init__(
        self,
        timeout: float = 30.0,
        ca_bundle: str = "",
        client_cert: str = "",
        client_key: str = "",
        proxy: str = "",
    ) -> None:
        self.timeout = timeout
        self._verify: Union[str, bool] = ca_bundle or True
        self._cert: Union[str, tuple[str, str], None] = (
            (client_cert, client_key) if client_cert and client_key else client_cert or None
        )
        session = requests.Session()
        session.trust_env = False  # no HTTP(S)_PROXY, netrc or REQUESTS_CA_BUNDLE behind the admin's back
        session.proxies = {"http": proxy, "https": proxy} if proxy else {}
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        session.headers.update({"Accept-Encoding": "identity", "User-Agent": USER_AGENT})
        self._session = session

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Response:
        for attempt in (1, 2):
            try:
                reply = self._session.post(
                    url,
                    data=body,
                    headers=dict(headers),
                    timeout=self.timeout,
                    verify=self._verify,
                    cert=self._cert,
                    allow_redirects=False,
                    stream=True,
                )
            except requests.ConnectionError as e:
                if attempt == 1 and isinstance(_root(e), _STALE):
                    continue  # the collector closed a kept-alive connection: once more on a new one
                raise ShipError(_describe(e)) from None
            except (requests.RequestException, OSError, ValueError) as e:
                raise ShipError(_describe(e)) from None
            with reply:
                return self._read(url, reply)
        raise ShipError(f"no reply from {url}")  # not reached: the second attempt returns or raises

    def _read(self, url: str, reply: requests.Response) -> Response:
        limit = 2 * self.timeout  # a reply that trickles is a failure too: whole reply, not per read
        late = threading.Event()
        raw = reply.raw

        def give_up() -> None:
            late.set()
            sock = getattr(getattr(raw, "connection", None), "sock", None)
            if sock is not None:  # wakes the blocked read (a close alone would not)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        timer = threading.Timer(limit, give_up)
        timer.start()
        chunks: list[bytes] = []
        got = 0
        try:
            while got <= MAX_RESPONSE:
                chunk = raw.read(MAX_RESPONSE + 1 - got)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        except Exception as e:  # noqa: BLE001 - whatever the shut socket raises
            raw.close()
            if late.is_set():
                raise ShipError(f"reply from {url} took longer than {limit:.0f} s") from None
            raise ShipError(f"reading the reply from {url}: {_describe(e)}") from None
        finally:
            timer.cancel()
        if late.is_set():
            raw.close()
            raise ShipError(f"reply from {url} took longer than {limit:.0f} s")
        if got > MAX_RESPONSE:
            raw.close()  # not reusable: the rest of the body is still on the wire
            raise ShipError(f"reply from {url} larger than {MAX_RESPONSE} bytes")
        return Response(reply.status_code, dict(reply.headers), b"".join(chunks))

    def close(self) -> None:
        self._session.close()


def _root(e: BaseException) -> BaseException:
    """The innermost cause of ``e`` (requests wraps urllib3, which wraps the OSError)."""
    seen = {id(e)}
    while True:
        nxt = e.__cause__ or e.__context__
        if nxt is None and e.args and isinstance(e.args[0], BaseException):
            nxt = e.args[0]
        reason = getattr(e, "reason", None)
        if nxt is None and isinstance(reason, BaseException):
            nxt = reason
        if nxt is None or id(nxt) in seen:
            return e
        seen.add(id(nxt))
        e = nxt


def _describe(e: BaseException) -> str:
    root = _root(e)
    name = type(e).__name__ if root is e else f"{type(e).__name__} ({type(root).__name__})"
    return f"{name}: {_short(e)}"


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


class FakeTransport:
    """A transport for unit tests (httpx's MockTransport idea): ``handler``
    answers each request; every request is kept in ``sent``."""

    def __init__(self, handler: Callable[[str, bytes, Mapping[str, str]], Response]) -> None:
        self.handler = handler
        self.sent: list[tuple[str, bytes, dict[str, str]]] = []

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Response:
        self.sent.append((url, body, dict(headers)))
        return self.handler(url, body, headers)
