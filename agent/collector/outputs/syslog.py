"""Alerts as RFC 5424 syslog messages over a unix socket, UDP or TCP."""

from __future__ import annotations

import os
import re
import select
import socket
import time
from typing import Any, Optional

from agent import __version__
from agent.collector.outputs.base import QueuedOutput, Retry
from agent.collector.outputs.stdout import alert_field
from agent.shared.config.converters import split_syslog_address
from agent.shared.config.schema import SYSLOG_FACILITIES
from agent.shared.text import dumps

# rule severity -> RFC 5424 severity: low notice(5), medium warning(4), high err(3), critical crit(2)
SYSLOG_SEVERITY = {"low": 5, "medium": 4, "high": 3, "critical": 2}
DGRAM_MAX = 60_000  # larger datagrams are refused by UDP (65507) or truncated by receivers
STREAM_MAX = 1 << 20
_NOT_PRINTUSASCII = re.compile(r"[^!-~]")


def _syslog_msg_json(alert: dict[str, Any], limit: int) -> bytes:
    """The alert as ASCII JSON with no control byte (json escapes < 0x20 and,
    with ensure_ascii, > 0x7e except DEL, escaped here). Past ``limit`` the
    original events and gaps are left out and ``rarewrite.truncated`` is set."""
    text = dumps(alert).replace("\x7f", "\\u007f")
    if len(text) > limit:
        slim = dict(alert)
        rw = dict(slim.get("rarewrite") or {})
        rw.pop("events", None)
        rw.pop("gaps", None)
        rw["truncated"] = True
        slim["rarewrite"] = rw
        text = dumps(slim).replace("\x7f", "\\u007f")
    return text.encode("ascii")


def syslog_timestamp(t: float) -> str:
    """RFC 5424 TIMESTAMP: UTC with microseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1e6) % 1_000_000:06d}Z"


class SyslogOutput(QueuedOutput):
    """RFC 5424: ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID alert
    [origin software="rarewrite" swVersion="V"] JSON``, PRI = facility * 8 +
    severity from the alert (low notice, medium warning, high err, critical
    crit). ``address``: a unix datagram socket path (``/dev/log``),
    ``udp://HOST:PORT`` or ``tcp://HOST:PORT`` (octet counting: ``LEN SP
    MSG``). The connection is made when first needed and made again after
    any failure."""

    kind = "syslog"

    def __init__(
        self,
        address: str = "/dev/log",
        name: str = "syslog",
        facility: str = "auth",
        app_name: str = "rarewrite",
        timeout_s: float = 5.0,
        queue_max: int = 10_000,
        backoff_max_s: float = 30.0,
    ) -> None:
        self.address = address
        self.scheme, self.host, self.port = split_syslog_address(address)
        self.facility = SYSLOG_FACILITIES[facility]
        self.app_name = app_name
        self.timeout_s = timeout_s
        self.hostname = _NOT_PRINTUSASCII.sub("_", socket.gethostname())[:255] or "-"
        self._sock: Optional[socket.socket] = None
        super().__init__(name, queue_max, backoff_max_s)

    def format(self, alert: dict[str, Any], now: Optional[float] = None) -> bytes:
        severity = SYSLOG_SEVERITY.get(str(alert_field(alert, "kibana", "alert", "severity")), 4)
        stamp = syslog_timestamp(self._clock.now_ms() / 1000 if now is None else now)
        head = (
            f"<{self.facility * 8 + severity}>1 {stamp} "
            f"{self.hostname} {self.app_name} {os.getpid()} alert "
            f'[origin software="rarewrite" swVersion="{__version__}"] '
        ).encode("ascii")
        limit = (STREAM_MAX if self.scheme == "tcp" else DGRAM_MAX) - len(head)
        return head + _syslog_msg_json(alert, limit)

    def _connect(self) -> socket.socket:
        if self.scheme == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                s.settimeout(self.timeout_s)
                s.connect(self.host)
            except OSError:
                s.close()
                raise
            return s
        if self.scheme == "udp":
            family, kind, proto, _, addr = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0]
            s = socket.socket(family, kind, proto)
            try:
                s.settimeout(self.timeout_s)
                s.connect(addr)
            except OSError:
                s.close()
                raise
            return s
        return socket.create_connection((self.host, self.port), timeout=self.timeout_s)

    def _stale(self, s: socket.socket) -> bool:
        """A TCP peer that closed (or sent anything: it never should) needs a new connection."""
        if self.scheme != "tcp":
            return False
        readable, _, _ = select.select([s], [], [], 0)
        if not readable:
            return False
        try:
            return s.recv(4096, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def deliver(self, alert: dict[str, Any]) -> None:
        msg = self.format(alert)
        frame = f"{len(msg)} ".encode("ascii") + msg if self.scheme == "tcp" else msg
        try:
            if self._sock is not None and self._stale(self._sock):
                self.disconnect()
            if self._sock is None:
                self._sock = self._connect()
            self._sock.sendall(frame)
        except OSError as e:
            self.disconnect()
            raise Retry(f"{self.address}: {e}") from None

    def disconnect(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
