"""Text helpers shared by every part: bytes from the file system as text and back,
ISO 8601 times both ways, JSON for logs and alerts, URLs with their secrets
hidden."""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import os
import re
import time
from typing import Any, Optional


def render(value: Optional[bytes]) -> Optional[str]:
    """Bytes from the file system as str, undecodable bytes kept as surrogates.

    ``json.dumps`` (ASCII mode) escapes the surrogates, so the output round-
    trips through ``fsencode`` and no raw control byte reaches a log or alert.
    """
    return None if value is None else os.fsdecode(value)


def visible(value: Optional[bytes]) -> Optional[str]:
    """Bytes from the file system as valid Unicode for alert outputs: UTF-8 as
    it is, each undecodable byte written ``\\xNN`` (visible; a strict JSON
    decoder takes it, where a lone surrogate is refused). Not lossless on its
    own: :func:`raw_base64` gives the exact bytes beside it."""
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("utf-8", "backslashreplace")


def raw_base64(value: Optional[bytes]) -> Optional[str]:
    """The exact bytes, base64, when :func:`visible` had to escape some; else None."""
    if value is None:
        return None
    try:
        value.decode("utf-8")
        return None
    except UnicodeDecodeError:
        return base64.b64encode(value).decode("ascii")


def to_bytes(value: Optional[str]) -> Optional[bytes]:
    """The inverse of :func:`render` for text that came from JSON."""
    if value is None:
        return None
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate outside the escape range
        return value.encode("utf-8", "surrogatepass")


def parse_timestamp(value: Any) -> int:
    """ISO 8601 (any offset, any fraction) or epoch milliseconds, to whole ms
    (Elasticsearch's date precision; finer digits are cut, not rounded)."""
    ms = _timestamp(value)
    if not 0 <= ms <= MAX_TS_MS:
        raise ValueError(f"@timestamp out of range: {value!r}")
    return ms


MAX_TS_MS = (1 << 53) - 1  # what the wire carries


def _timestamp(value: Any) -> int:
    if isinstance(value, bool) or value is None:
        raise ValueError("no @timestamp")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError("@timestamp is not a number")
        return int(value)
    if not isinstance(value, str):
        raise ValueError("@timestamp is not a string")
    text = value.strip()
    if text.isdigit() and len(text) > 4:  # epoch_millis; "2025" is a year, as in strict_date_optional_time
        return int(text)
    if text.isdigit():
        text += "-01-01T00:00:00"
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    frac = ""
    head, dot, tail = text.replace(",", ".", 1).partition(".")  # ISO 8601 allows a decimal comma
    if dot:
        digits = len(tail) - len(tail.lstrip("0123456789"))
        frac, zone = tail[:digits], tail[digits:]
        text = head + zone
    t = dt.datetime.fromisoformat(text)
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    whole = (t - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) // dt.timedelta(seconds=1)
    return whole * 1000 + int((frac + "000")[:3])


PG_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(db: str) -> bool:
    """True when ``db`` names a PostgreSQL database (a libpq URL), not a SQLite file."""
    return db.startswith(PG_SCHEMES)


def redact(db: str) -> str:
    """``db`` for logs: a URL's password (userinfo or ``password=``) replaced by ``***``."""
    if not is_postgres(db):
        return db
    return redact_url(db)


def redact_url(url: str) -> str:
    """``url`` for logs and ``config check``: the password of its userinfo
    and any ``password=`` query value replaced by ``***``."""
    if "://" not in url:
        return url
    scheme, _, rest = url.partition("://")
    netloc, sep, tail = rest.partition("/")
    if "@" in netloc:
        userinfo, _, hostpart = netloc.rpartition("@")
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{hostpart}"
    tail = re.sub(r"(?i)(^|[?&])(password=)[^&]*", r"\1\2***", tail)
    return f"{scheme}://{netloc}{sep}{tail}"


def url_for_logs(url: str) -> str:
    """``url`` for logs and ``config check``: :func:`redact_url`, and its path
    and query cut to ``/***`` (a webhook's token often lives there)."""
    safe = redact_url(url)
    if "://" not in safe:
        return safe
    scheme, _, rest = safe.partition("://")
    netloc, sep, tail = rest.partition("/")
    netloc, qsep, _ = netloc.partition("?")
    return f"{scheme}://{netloc}/***" if (tail.strip("/") or qsep) else f"{scheme}://{netloc}{sep}"


def iso(ms: int) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC with milliseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def dumps(doc: Any) -> str:
    """JSON for logs, files and outputs: ASCII only, so newlines, ANSI ESC and
    undecodable bytes (surrogates from events.render) arrive escaped."""
    return json.dumps(doc, ensure_ascii=True, sort_keys=True, separators=(",", ":"))
