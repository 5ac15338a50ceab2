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
MAX_MESSAGE = 8192  # rsyslog's and syslog-ng's default message size: larger ones are cut
MIN_MESSAGE = 1024  # below this not even the alert's core fields fit
_NOT_PRINTUSASCII = re.compile(r"[^!-~]")
# What an alert keeps when even its shortened form is too long for the receiver.
_CORE = (
    "@timestamp",
    "alert",
    "event",
    "rule",
    "kibana",
    "host",
    "agent",
    "process",
    "file",
    "cc",
    "agent_count",
)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _json(doc: Any) -> str:
    """ASCII JSON with no control byte (json escapes < 0x20 and, with
    ensure_ascii, > 0x7e except DEL, escaped here)."""
    return dumps(doc).replace("\x7f", "\\u007f")


def _cut_strings(doc: Any, longest: int) -> Any:
    if isinstance(doc, str):
        return doc if len(doc) <= longest else doc[: max(0, longest - 3)] + "..."
    if isinstance(doc, dict):
        return {k: _cut_strings(v, longest) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_cut_strings(v, longest) for v in doc]
    return doc


def _syslog_msg_json(alert: dict[str, Any], limit: int) -> bytes:
    """The alert as one line of JSON of at most ``limit`` bytes, always whole:
    as it is if it fits; else without its original events and gaps; else its
    core fields only, with long strings shortened (``...``). Every shortened
    form says so: ``rarewrite.truncated`` is true."""
    text = _json(alert)
    if len(text) <= limit:
        return text.encode("ascii")
    slim = dict(alert)
    rw = {k: v for k, v in (slim.get("rarewrite") or {}).items() if k not in ("events", "gaps")}
    slim["rarewrite"] = {**rw, "truncated": True}
    text = _json(slim)
    longest = 4096
    core = {k: alert[k] for k in _CORE if k in alert}
    core["rarewrite"] = {"truncated": True}
    while len(text) > limit and longest >= 8:
        text = _json(_cut_strings(core, longest))
        longest //= 2
    return text.encode("ascii")


def syslog_timestamp(t: float) -> str:
    """RFC 5424 TIMESTAMP: UTC with microseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1e6) % 1_000_000:06d}Z"


def local_timestamp(t: float) -> str:
    """The local syslog TIMESTAMP (``Mmm dd hh:mm:ss``, local time), as glibc's syslog() writes it."""
    tm = time.localtime(t)
    return f"{_MONTHS[tm.tm_mon - 1]} {tm.tm_mday:2d} {time.strftime('%H:%M:%S', tm)}"


class SyslogOutput(QueuedOutput):
    """To a network receiver (``udp://HOST:PORT``, ``tcp://HOST:PORT`` with
    octet counting: ``LEN SP MSG``), RFC 5424: ``<PRI>1 TIMESTAMP HOSTNAME
    APP-NAME PROCID alert [origin software="rarewrite" swVersion="V"] JSON``.
    To the local socket (a unix datagram path, ``/dev/log`` by default) the
    local format that glibc's syslog() writes and every local daemon parses:
    ``<PRI>Mmm dd hh:mm:ss APP-NAME[PID]: JSON``. PRI = facility * 8 +
    severity from the alert (low notice, medium warning, high err, critical
    crit). A message never passes ``max_message`` bytes (the receiver's own
    limit; 8 KiB is rsyslog's default): a longer alert is shortened, never
    cut (see :func:`_syslog_msg_json`). The connection is made when first
    needed and made again after any failure."""

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
        max_message: int = MAX_MESSAGE,
    ) -> None:
        self.address = address
        self.scheme, self.host, self.port = split_syslog_address(address)
        self.facility = SYSLOG_FACILITIES[facility]
        self.app_name = app_name
        self.timeout_s = timeout_s
        self.max_message = max(MIN_MESSAGE, max_message)
        self.hostname = _NOT_PRINTUSASCII.sub("_", socket.gethostname())[:255] or "-"
        self._sock: Optional[socket.socket] = None
        super().__init__(name, queue_max, backoff_max_s)

    def format(self, alert: dict[str, Any], now: Optional[float] = None) -> bytes:
        severity = SYSLOG_SEVERITY.get(str(alert_field(alert, "kibana", "alert", "severity")), 4)
        t = self._clock.now_ms() / 1000 if now is None else now
        pri = self.facility * 8 + severity
        if self.scheme == "unix":
            head = f"<{pri}>{local_timestamp(t)} {self.app_name}[{os.getpid()}]: "
        else:
            head = (
                f"<{pri}>1 {syslog_timestamp(t)} {self.hostname} {self.app_name} {os.getpid()} alert "
                f'[origin software="rarewrite" swVersion="{__version__}"] '
            )
        raw = head.encode("ascii")
        return raw + _syslog_msg_json(alert, self.max_message - len(raw))

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
