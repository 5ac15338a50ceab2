"""Where alerts go: one small interface and four outputs.

- :class:`NdjsonOutput`: one JSON document a line, fsync per batch, rotated
  to ``path.1`` ... ``path.keep`` before a write would pass ``max_bytes``.
- :class:`StdoutOutput`: a readable one-line summary, or the full JSON.
- :class:`WebhookOutput`: one JSON alert per HTTP POST, with a secret header.
- :class:`SyslogOutput`: RFC 5424 to a unix datagram socket, UDP, or TCP
  (octet-counting framing, RFC 6587).

The network outputs never block the schedule: ``emit`` puts the alerts on a
bounded in-memory queue that a background thread drains, retrying with
exponential backoff and jitter; when the queue is full the oldest waiting
alert is dropped and counted (``dropped``). ``close`` gives the thread a few
seconds to deliver what is left and says how many alerts it could not.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import re
import select
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Optional, Protocol, TextIO

import requests

from agent import __version__
from agent.collector.evaluate import dumps
from agent.config import OUTPUT_KEYS, REQUIRED, SYSLOG_FACILITIES, Config, split_syslog_address

log = logging.getLogger("rarewrite.collector.outputs")

DEFAULT_MAX_BYTES = 100 << 20
DEFAULT_KEEP = 5
DRAIN_S = 5.0  # how long close() lets a queued output deliver what is left
DROP_LOG_EVERY_S = 60.0
RETRY_AFTER_MAX_S = 3600.0


class Output(Protocol):
    name: str

    def emit(self, alerts: Sequence[dict[str, Any]]) -> None:
        """Deliver one batch of alert documents; raise OSError on failure."""

    def close(self) -> None: ...


# ------------------------------------------------------------------ NDJSON


class NdjsonOutput:
    """Appends one JSON document a line; fsync once per batch (and before a
    rotation). Before a line would take the file past ``max_bytes`` the file
    is rotated: ``path.(keep-1)`` -> ``path.keep`` ... ``path`` -> ``path.1``
    (atomic renames, the directory fsynced), the oldest is overwritten. A
    single line longer than ``max_bytes`` gets a file of its own."""

    def __init__(
        self, path: str, name: str = "ndjson", max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP
    ) -> None:
        if max_bytes < 1 or keep < 1:
            raise ValueError("max_bytes and keep must be at least 1")
        self.name = name
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.rotations = 0
        self._fd = -1
        self._size = 0
        self._open()

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._size = os.fstat(self._fd).st_size

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
            self._size += n

    def _rotate(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        for i in range(self.keep - 1, 0, -1):
            src = f"{self.path}.{i}"
            if os.path.exists(src):
                os.replace(src, f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")
        self._open()
        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        self.rotations += 1
        log.info("event=alerts_file_rotated output=%r path=%r keep=%d", self.name, self.path, self.keep)

    def emit(self, alerts: Sequence[dict[str, Any]]) -> None:
        if not alerts:
            return
        if self._fd < 0:
            self._open()  # a rotation that failed half-way left it closed
        pending: list[bytes] = []
        pending_len = 0
        for a in alerts:
            line = (dumps(a) + "\n").encode("ascii")
            if self._size + pending_len + len(line) > self.max_bytes and self._size + pending_len > 0:
                if pending:
                    self._write(b"".join(pending))
                    pending, pending_len = [], 0
                self._rotate()
            pending.append(line)
            pending_len += len(line)
        if pending:
            self._write(b"".join(pending))
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ stdout


def _field(doc: dict[str, Any], *path: str) -> Any:
    cur: Any = doc
    for p in path:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(p)
    return cur


class StdoutOutput:
    """``summary``: one readable key=value line per alert, every value
    JSON-escaped; ``json``: the full alert document, one a line."""

    def __init__(self, stream: Optional[TextIO] = None, name: str = "stdout", fmt: str = "summary") -> None:
        self.name = name
        self.stream = stream if stream is not None else sys.stdout
        self.fmt = fmt

    def emit(self, alerts: Sequence[dict[str, Any]]) -> None:
        for a in alerts:
            if self.fmt == "json":
                self.stream.write(dumps(a) + "\n")
                continue
            fields = (
                ("time", a.get("@timestamp")),
                ("rule", _field(a, "rule", "name")),
                ("host", _field(a, "host", "name")),
                ("agent", _field(a, "agent", "id")),
                ("exe", _field(a, "process", "executable")),
                ("path", _field(a, "file", "path")),
                ("cc", a.get("cc")),
                ("gap_on_other_agents", _field(a, "rarewrite", "gap_on_other_agents")),
                ("id", _field(a, "alert", "id")),
            )
            self.stream.write("ALERT " + " ".join(f"{k}={dumps(v)}" for k, v in fields) + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


# ------------------------------------------------------------------ queued network outputs


class Retry(Exception):
    """A delivery that may work later; ``after`` is the receiver's Retry-After."""

    def __init__(self, reason: str, after: Optional[float] = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.after = after


class Permanent(Exception):
    """A delivery that will never work (the receiver refused this alert)."""


class QueuedOutput:
    """A bounded queue drained by one background thread.

    ``emit`` never blocks on the network. Up to ``queue_max`` alerts wait;
    one more may be in flight. A full queue drops its oldest waiting alert
    and counts it in ``dropped``. A failed delivery (:class:`Retry`) is
    retried, oldest first, after ``min(backoff_max, 0.5 s * 2**n)`` scaled by a
    random factor in [0.5, 1] (or the receiver's Retry-After); a
    :class:`Permanent` failure is logged, counted in ``failed`` and skipped.
    Subclasses implement :meth:`deliver` and may override :meth:`disconnect`.
    """

    kind = "queued"

    def __init__(self, name: str, queue_max: int, backoff_max_s: float) -> None:
        self.name = name
        self.queue_max = queue_max
        self.backoff_max_s = backoff_max_s
        self.sent = 0
        self.dropped = 0
        self.failed = 0
        self.retries = 0
        self._q: deque[dict[str, Any]] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._wake = threading.Event()
        self._last_drop_log = -DROP_LOG_EVERY_S
        self._drops_unlogged = 0
        self._thread = threading.Thread(target=self._run, name=f"rw-output-{name}", daemon=True)
        self._thread.start()

    # the interface

    def emit(self, alerts: Sequence[dict[str, Any]]) -> None:
        dropped = 0
        with self._cv:
            if self._closing:
                raise OSError(f"output {self.name} is closed")
            for a in alerts:
                if len(self._q) >= self.queue_max:
                    self._q.popleft()
                    dropped += 1
                self._q.append(a)
            self.dropped += dropped
            self._cv.notify()
        if dropped:
            self._log_drops(dropped)

    def pending(self) -> int:
        with self._cv:
            return len(self._q)

    def counters(self) -> dict[str, int]:
        return {"sent": self.sent, "dropped": self.dropped, "failed": self.failed, "retries": self.retries}

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._wake.set()
        self._thread.join(DRAIN_S)
        left = self.pending()
        if self._thread.is_alive() or left:
            log.warning(
                "event=output_closed_undelivered output=%r type=%s undelivered=%d", self.name, self.kind, left
            )
        self.disconnect()

    # for subclasses

    def deliver(self, alert: dict[str, Any]) -> None:
        raise NotImplementedError

    def disconnect(self) -> None:
        return None

    # the worker

    def _log_drops(self, n: int) -> None:
        now = time.monotonic()
        with self._cv:
            self._drops_unlogged += n
            if now - self._last_drop_log < DROP_LOG_EVERY_S:
                return
            n, self._drops_unlogged, self._last_drop_log = self._drops_unlogged, 0, now
        log.warning(
            "event=output_queue_full output=%r type=%s dropped=%d dropped_total=%d queue_max=%d",
            self.name,
            self.kind,
            n,
            self.dropped,
            self.queue_max,
        )

    def _backoff(self, attempt: int) -> float:
        cap = min(self.backoff_max_s, 0.5 * (2 ** min(attempt, 30)))
        return float(cap * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not crypto

    def _run(self) -> None:
        item: Optional[dict[str, Any]] = None
        attempt = 0
        while True:
            with self._cv:
                while item is None and not self._q:
                    if self._closing:
                        return
                    self._cv.wait()
                if item is None:
                    item = self._q.popleft()
            try:
                self.deliver(item)
            except Retry as e:
                self.retries += 1
                if attempt == 0:
                    log.warning(
                        "event=output_retrying output=%r type=%s reason=%r", self.name, self.kind, e.reason
                    )
                delay = min(e.after, RETRY_AFTER_MAX_S) if e.after is not None else self._backoff(attempt)
                attempt += 1
                if self._closing:
                    return  # closing and the receiver still fails: what is left stays undelivered
                self._wake.wait(delay)
                continue
            except Permanent as e:
                self.failed += 1
                log.error("event=output_refused output=%r type=%s reason=%r", self.name, self.kind, str(e))
            except Exception as e:  # a bug must not kill the thread and silently stop the output
                self.failed += 1
                log.exception("event=output_error output=%r type=%s error=%r", self.name, self.kind, str(e))
            else:
                self.sent += 1
                if attempt:
                    log.info(
                        "event=output_recovered output=%r type=%s attempts=%d", self.name, self.kind, attempt
                    )
            item = None
            attempt = 0


# ------------------------------------------------------------------ webhook


def _retry_after(value: Optional[str]) -> Optional[float]:
    """Retry-After as seconds (delta-seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    v = value.strip()
    if v.isdigit():
        return float(v)
    try:
        when = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class WebhookOutput(QueuedOutput):
    """One alert per ``POST url``: body the alert document as JSON
    (``Content-Type: application/json``), header ``X-Rarewrite-Alert-Id`` the
    alert id (stable: a receiver can deduplicate), plus ``secret_header:
    <secret>`` when configured. 2xx is delivered; a connection error, a
    timeout, 408, 429 and 5xx are retried (Retry-After honoured, up to an
    hour); any other status (and a redirect, never followed, so the secret
    header never travels elsewhere) is a refusal: logged, counted in
    ``failed``, skipped. TLS is verified (the system store, or ``ca_bundle``)."""

    kind = "webhook"

    def __init__(
        self,
        url: str,
        name: str = "webhook",
        secret_header: str = "",
        secret: str = "",
        timeout_s: float = 10.0,
        queue_max: int = 10_000,
        backoff_max_s: float = 60.0,
        ca_bundle: str = "",
    ) -> None:
        if secret and ("\r" in secret or "\n" in secret or "\0" in secret):
            raise ValueError("the webhook secret must be one line")
        self.url = url
        self.timeout_s = timeout_s
        self._session = requests.Session()
        self._session.headers.update(
            {"Content-Type": "application/json", "User-Agent": f"rarewrite-collector/{__version__}"}
        )
        if secret_header:
            self._session.headers[secret_header] = secret
        self._verify: Any = ca_bundle or True
        super().__init__(name, queue_max, backoff_max_s)

    def __repr__(self) -> str:  # never the headers: one holds the secret
        return f"WebhookOutput(name={self.name!r}, url={self.url!r})"

    def deliver(self, alert: dict[str, Any]) -> None:
        body = dumps(alert).encode("ascii")
        alert_id = _field(alert, "alert", "id")
        headers = {"X-Rarewrite-Alert-Id": str(alert_id)} if alert_id else {}
        try:
            r = self._session.post(
                self.url,
                data=body,
                headers=headers,
                timeout=self.timeout_s,
                verify=self._verify,
                allow_redirects=False,
            )
        except requests.RequestException as e:
            raise Retry(f"{type(e).__name__}: {e}") from None
        with r:
            if 200 <= r.status_code < 300:
                return
            if r.status_code in (408, 429) or r.status_code >= 500:
                raise Retry(f"HTTP {r.status_code}", _retry_after(r.headers.get("Retry-After")))
            raise Permanent(f"HTTP {r.status_code}")

    def disconnect(self) -> None:
        self._session.close()


# ------------------------------------------------------------------ syslog

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
        severity = SYSLOG_SEVERITY.get(str(_field(alert, "kibana", "alert", "severity")), 4)
        head = (
            f"<{self.facility * 8 + severity}>1 {syslog_timestamp(time.time() if now is None else now)} "
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


# ------------------------------------------------------------------ building


def _opts(kind: str, options: Any) -> dict[str, Any]:
    """An output section's options with the defaults filled in (config.load
    already does; this covers an OutputConfig made by hand)."""
    out = dict(options)
    for key, (convert, default) in OUTPUT_KEYS[kind].items():
        if key not in out:
            if default is not REQUIRED:
                out[key] = default
        elif isinstance(out[key], str) and out[key] != default:
            out[key] = convert(out[key])  # converters take their own output back unchanged
    return out


def read_secret(path: str) -> str:
    """The webhook secret: the file's first line, stripped; OSError if unusable."""
    with open(path, encoding="utf-8") as f:
        secret = f.readline().strip()
    if not secret:
        raise OSError(f"{path}: the webhook secret file is empty")
    return secret


def build_one(name: str, kind: str, options: Any) -> Output:
    o = _opts(kind, options)
    if kind == "ndjson":
        return NdjsonOutput(o["path"], name, o["max_bytes"], o["keep"])
    if kind == "stdout":
        return StdoutOutput(name=name, fmt=o["format"])
    if kind == "webhook":
        secret = read_secret(o["secret_file"]) if o["secret_file"] else ""
        return WebhookOutput(
            o["url"],
            name,
            o["secret_header"],
            secret,
            o["timeout"] / 1000.0,
            o["queue_max"],
            o["backoff_max"] / 1000.0,
            o["ca_bundle"],
        )
    if kind == "syslog":
        return SyslogOutput(
            o["address"],
            name,
            o["facility"],
            o["app_name"],
            o["timeout"] / 1000.0,
            o["queue_max"],
            o["backoff_max"] / 1000.0,
        )
    raise ValueError(f"{kind!r} is not an output type")


def build_outputs(cfg: Config) -> list[Output]:
    """The outputs the config asks for; raises OSError if one cannot be made
    (a file that cannot be opened, an unreadable secret): none is left running."""
    outs: list[Output] = []
    try:
        if cfg.collector.alerts_file:
            outs.append(NdjsonOutput(cfg.collector.alerts_file, "alerts_file"))
        if cfg.collector.alerts_stdout:
            outs.append(StdoutOutput())
        for o in cfg.outputs:
            try:
                outs.append(build_one(o.name, o.type, o.options))
            except (OSError, ValueError, KeyError) as e:
                raise OSError(f"[output.{o.name}]: {e}") from e
    except OSError:
        for out in outs:
            out.close()
        raise
    for out in outs:
        log.info("event=output_ready output=%r %s", out.name, _describe(out))
    return outs


def _describe(out: Output) -> str:
    if isinstance(out, NdjsonOutput):
        return f"type=ndjson path={out.path!r} max_bytes={out.max_bytes} keep={out.keep}"
    if isinstance(out, WebhookOutput):
        return f"type=webhook url={out.url!r} queue_max={out.queue_max}"
    if isinstance(out, SyslogOutput):
        return f"type=syslog address={out.address!r} facility={out.facility}"
    return f"type={type(out).__name__}"


def emit_all(outputs: Sequence[Output], alerts: Sequence[dict[str, Any]]) -> None:
    """Give every output the batch; one failing output does not stop the others."""
    for out in outputs:
        try:
            out.emit(alerts)
        except OSError as e:
            log.error("event=output_failed output=%r alerts=%d error=%r", out.name, len(alerts), str(e))


def dropped_counts(outputs: Sequence[Output]) -> dict[str, int]:
    """output name -> alerts dropped by a full queue, for /metrics
    (``rarewrite_collector_output_dropped_total{output=...}``)."""
    return {out.name: int(getattr(out, "dropped", 0)) for out in outputs if hasattr(out, "dropped")}
