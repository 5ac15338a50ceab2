"""Tiny converters for config values (supervisor's habit): each takes the text
of one value and returns it converted or raises ``ValueError`` with a clear
message, which the loader prefixes with file, section and key."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*\Z")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, None: 1000}
_SIZE = re.compile(r"\s*(\d+)\s*([KMG]i?B?|B)?\s*\Z", re.IGNORECASE)


def duration_ms(text: str) -> int:
    """``90s``, ``15m``, ``1h``, ``2d``, ``500ms``; a bare number is seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (use a number with ms, s, m, h or d, e.g. 90s, 1h)")
    ms = int(float(m.group(1)) * _UNIT_MS[m.group(2)])
    if ms <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return ms


def size_bytes(text: str) -> int:
    """``512``, ``64KiB``, ``8MiB``, ``1G``: powers of 1024."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (e.g. 8MiB, 512KiB)")
    unit = (m.group(2) or "B").upper()[:1]
    return int(m.group(1)) * {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit]


def size_between(lo: int, hi: int) -> Callable[[str], int]:
    """A size (as :func:`size_bytes`) within [lo, hi] bytes."""

    def convert(text: str) -> int:
        value = size_bytes(text)
        if not lo <= value <= hi:
            raise ValueError(f"{text.strip()} is out of range (allowed {lo} to {hi} bytes)")
        return value

    return convert


def integer(lo: int, hi: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
        if not lo <= value <= hi:
            raise ValueError(f"{value} is out of range (allowed {lo} to {hi})")
        return value

    return convert


def boolean(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "yes", "true", "on"):
        return True
    if t in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (use yes or no)")


def choice(*allowed: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        t = text.strip()
        if t not in allowed:
            raise ValueError(f"{t!r} is not allowed (choose one of: {', '.join(allowed)})")
        return t

    return convert


def words(text: str) -> tuple[str, ...]:
    """One item a line (commas also separate); blank lines ignored."""
    return tuple(w.strip() for line in text.splitlines() for w in line.split(",") if w.strip())


def text(value: str) -> str:
    return value.strip()


def nonempty_words(text_: str) -> tuple[str, ...]:
    items = words(text_)
    if not items:
        raise ValueError("must list at least one item")
    return items


def abs_paths(text_: str) -> tuple[str, ...]:
    items = words(text_)
    bad = [p for p in items if not p.startswith("/")]
    if bad:
        raise ValueError(f"paths must be absolute: {', '.join(bad)}")
    return tuple(os.path.normpath(p) if p != "/" else p for p in items)


def nonempty_paths(text_: str) -> tuple[str, ...]:
    items = abs_paths(text_)
    if not items:
        raise ValueError("must list at least one absolute path")
    return items


def path(text_: str) -> str:
    t = text_.strip()
    if t and not t.startswith("/"):
        raise ValueError(f"{t!r} must be an absolute path")
    return t


def url(text_: str) -> str:
    t = text_.strip()
    if not t:
        return t
    parts = urlsplit(t)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{t!r} is not an http:// or https:// URL")
    return t.rstrip("/")


def plain_http_elsewhere(url_: str) -> bool:
    """Is ``url_`` plain http:// to a host other than this one? (Alerts, keys
    and file names would cross the network in clear.)"""
    parts = urlsplit(url_)
    if parts.scheme != "http":
        return False
    host = (parts.hostname or "").lower()
    if host in {"localhost", "::1"}:
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name: it may resolve anywhere


def agent_id(text_: str) -> str:
    """Empty (made on first start) or what the collector accepts as an id."""
    from agent.shared.wire.format import valid_agent_id  # lazily: config stays free of msgpack

    t = text_.strip()
    if t and not valid_agent_id(t):
        raise ValueError(f"{t!r} is not an agent id (1-128 of A-Z a-z 0-9 . _ : @ -)")
    return t


def host_name(text_: str) -> str:
    """Empty (this host's name) or 1-255 printable characters."""
    t = text_.strip()
    if t and (len(t) > 255 or any(ord(ch) < 32 or ord(ch) == 127 for ch in t)):
        raise ValueError(f"{t!r} is not a host name (1-255 printable characters)")
    return t


def listen(text_: str) -> str:
    t = text_.strip()
    host, sep, port = t.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{t!r} is not HOST:PORT (e.g. 127.0.0.1:8787)")
    return t


_APP_NAME = re.compile(r"[!-~]{1,48}\Z")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # an RFC 9110 token


def required_path(text_: str) -> str:
    t = path(text_)
    if not t:
        raise ValueError("must be an absolute path")
    return t


def required_url(text_: str) -> str:
    t = url(text_)
    if not t:
        raise ValueError("must be an http:// or https:// URL")
    return t


def header_name(text_: str) -> str:
    t = text_.strip()
    if not _HEADER_NAME.match(t):
        raise ValueError(f"{t!r} is not an HTTP header name (e.g. X-Rarewrite-Token)")
    return t


def app_name(text_: str) -> str:
    t = text_.strip()
    if not _APP_NAME.match(t):
        raise ValueError(f"{t!r} must be 1 to 48 printable ASCII characters without spaces")
    return t


def split_syslog_address(text_: str) -> tuple[str, str, int]:
    """``/dev/log`` -> ("unix", path, 0); ``udp://h:p`` / ``tcp://h:p`` -> (scheme, host, port)."""
    t = text_.strip()
    if t.startswith("/"):
        return "unix", t, 0
    scheme, sep, rest = t.partition("://")
    host, colon, port = rest.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if (
        scheme not in ("udp", "tcp")
        or not sep
        or not colon
        or not host
        or not port.isdigit()
        or not 0 < int(port) < 65536
    ):
        raise ValueError(f"{t!r} is not a unix socket path, udp://HOST:PORT or tcp://HOST:PORT")
    return scheme, host, int(port)


def syslog_address(text_: str) -> str:
    split_syslog_address(text_)
    return text_.strip()


def subset(text_: str, allowed: Sequence[str]) -> tuple[str, ...]:
    items = nonempty_words(text_)
    bad = [i for i in items if i not in allowed]
    if bad:
        raise ValueError(f"{', '.join(bad)} not allowed (choose from: {', '.join(allowed)})")
    return items


_WEB_ROOT = re.compile(r"(/[^:@]*)(?::([a-z0-9*.,]+))?(?:@(/\S*))?\Z", re.IGNORECASE)
ACCESS_LOG_FORMATS = ("combined", "common", "vhost_combined")


def web_root_specs(text_: str) -> tuple[str, ...]:
    """``auto`` (the web servers' own configs) and/or ``DIR[:EXT,EXT][@/URL]``
    entries, e.g. ``/srv/shop:php,phtml@/shop`` (split at white space only:
    the commas belong to the extension list)."""
    items = tuple(text_.split())
    bad = [w for w in items if w != "auto" and not _WEB_ROOT.match(w)]
    if bad:
        raise ValueError(f"{', '.join(bad)}: write auto or DIR[:EXT,EXT][@/URL] (e.g. /srv/site:php,phtml)")
    return items


def access_log_specs(text_: str) -> tuple[tuple[str, str], ...]:
    """One log a line: ``auto`` (the logs the server configs name), or ``PATH
    [FORMAT]``: FORMAT is combined (the default), common, vhost_combined, an
    nginx log_format string ($remote_addr ...) or an Apache LogFormat one (%h ...)."""
    out = []
    for raw_line in text_.strip().splitlines():
        line = raw_line.strip()
        if not line:
            continue
        log_path, _, fmt = line.partition(" ")
        fmt = fmt.strip().strip("'\"") or ("" if log_path == "auto" else "combined")
        if log_path == "auto":
            if fmt:
                raise ValueError("auto takes no format (the server configs name each log's)")
        elif not log_path.startswith("/"):
            raise ValueError(f"{log_path!r}: a log path must be absolute (or auto)")
        elif fmt not in ACCESS_LOG_FORMATS and "$" not in fmt and "%" not in fmt:
            raise ValueError(
                f"{fmt!r}: a format is {', '.join(ACCESS_LOG_FORMATS)}, "
                "an nginx log_format string or an Apache LogFormat string"
            )
        out.append((log_path, fmt))
    return tuple(out)
