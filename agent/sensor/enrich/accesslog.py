"""Web server access logs, followed by polling and kept for a few minutes, so
an alert can name the request that wrote a file and the requests made for it.

``compile_format`` turns an nginx ``log_format`` or an Apache ``LogFormat``
(or the names ``combined``, ``common``, ``vhost_combined``, ``main``) into a
line parser. ``AccessLogs`` follows (path, format) logs like ``tail -F`` does,
from their end at start, and keeps the parsed requests for ``keep_s`` seconds
of log time, at most ``max_requests`` of them, sorted by time.

Rotation: a log renamed away is read on until the new file at its path has
data (the server writes the old one until it reopens), or for
ROTATE_GRACE_S; copytruncate is seen as a size below the offset (lines
written between the copy and the truncation are the rotation's loss).

Bounds: one ``os.stat`` per log per poll when nothing changed; at most
``read_per_poll`` bytes read per poll over all logs (the rest waits for the
next); a line longer than ``max_line`` bytes is dropped; fields are cut
(MAX_URL, MAX_HEADER...), so a kept request is at most about 3.4 kB; only
regular files are opened, with O_NONBLOCK, so a FIFO cannot block; a line
regex fails in time linear in the line. Not thread-safe: poll and query
from one thread.
"""

from __future__ import annotations

import bisect
import calendar
import collections
import itertools
import logging
import os
import re
import stat
import time
from collections.abc import Collection, Sequence
from typing import Callable, NamedTuple, Optional, Union
from urllib.parse import unquote

log = logging.getLogger("rarewrite.enrich")

__all__ = ["NAMED_FORMATS", "AccessLogs", "Request", "compile_format", "url_path"]


class Request(NamedTuple):
    ts_ms: int  # the log line's time, ms since the epoch (UTC)
    client: str  # client address ($remote_addr / %h / %a)
    method: str  # "" when the request line is malformed ("-" or garbage)
    url: str  # the request target as logged (path + query), "" when malformed
    status: int  # 0 when absent
    bytes_sent: int  # 0 when "-" / absent
    referer: str  # "" when "-" / absent
    user_agent: str  # "" when "-" / absent
    log: str  # the log file it came from


NAMED_FORMATS = {
    # nginx's built-in "combined" writes the very same text as Apache's.
    "combined": '%h %l %u %t "%r" %>s %b "%{Referer}i" "%{User-Agent}i"',
    "common": '%h %l %u %t "%r" %>s %b',
    "vhost_combined": '%v:%p %h %l %u %t "%r" %>s %O "%{Referer}i" "%{User-Agent}i"',
    # the "main" of the nginx.conf that RHEL's and nginx.org's packages ship
    "main": '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent '
    '"$http_referer" "$http_user_agent" "$http_x_forwarded_for"',
}

Parser = Callable[[str, str], Optional[Request]]  # (line, log path) -> Request

# Fields are cut to these lengths (chars), so that a flood of long requests
# costs at most about 3.4 kB a kept request, not max_line.
MAX_URL = 2048
MAX_HEADER = 512  # referer, user agent
MAX_CLIENT = 64
MAX_METHOD = 32

# ---------------------------------------------------------------- formats

_QUOTED = r'[^"\\]*(?:\\.[^"\\]*)*'  # a quoted value; \" and \xHH escapes inside
_TIME_LOCAL = r"\d\d/[A-Za-z]{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}"
_TIME_ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)"
_NUMBER = r"\d{1,18}|-"  # bounded: int() of a long digit string is slow, past 4300 an error
_BARE = '[^\\s"{}]*'  # an unquoted value (the servers escape any quote in it), a class to add to
_UNQUOTED = {"uri_path": '[^\\s"?{}]*'}  # $uri$is_args$args
_EPOCH = r"\d{1,16}(?:\.\d{1,9})?"


class _Field(NamedTuple):
    role: str  # a group of the line regex, "" for a field only skipped over
    prio: int  # of two fields with one role, the lower is used
    pattern: str  # "" for "a token, or a quoted string when quoted"
    kind: str = ""  # for the time: which clock it is written in
    pre: str = ""  # regex text around the group (Apache's %t brings its brackets)
    post: str = ""


_Token = Union[str, _Field]

_NGINX_VARS = {
    "remote_addr": _Field("client", 0, ""),
    "realip_remote_addr": _Field("client", 1, ""),
    "msec": _Field("time", 0, _EPOCH, "sec"),
    "time_iso8601": _Field("time", 1, _TIME_ISO, "iso"),
    "time_local": _Field("time", 2, _TIME_LOCAL, "local"),
    "request": _Field("request", 0, ""),
    "request_method": _Field("method", 0, ""),
    "request_uri": _Field("uri_full", 0, ""),
    "uri": _Field("uri_path", 0, ""),
    "document_uri": _Field("uri_path", 1, ""),
    "args": _Field("args", 0, ""),
    "query_string": _Field("args", 1, ""),
    "status": _Field("status", 0, _NUMBER),
    "body_bytes_sent": _Field("bytes", 0, _NUMBER),
    "bytes_sent": _Field("bytes", 1, _NUMBER),
    "http_referer": _Field("referer", 0, ""),
    "http_user_agent": _Field("user_agent", 0, ""),
    # a few often written next to another field ($scheme://$host$request_uri)
    "scheme": _Field("", 9, r"[A-Za-z]*"),
    "host": _Field("", 9, r'[^\s/"]*'),
    "http_host": _Field("", 9, r'[^\s/"]*'),
    "server_name": _Field("", 9, r'[^\s/"]*'),
    "server_port": _Field("", 9, r"\d*|-"),
    "remote_port": _Field("", 9, r"\d*|-"),
    "request_time": _Field("", 9, r"[\d.]+|-"),
    "is_args": _Field("", 9, r"\??"),
}
_NGINX_VAR = re.compile(r"\$(?:\{([A-Za-z0-9_]+)\}|([A-Za-z0-9_]+))")

_APACHE_LETTERS = {
    "a": _Field("client", 0, ""),
    "h": _Field("client", 1, ""),
    "r": _Field("request", 0, ""),
    "m": _Field("method", 0, ""),
    "U": _Field("uri_path", 0, ""),
    "q": _Field("query", 0, ""),
    "b": _Field("bytes", 0, _NUMBER),
    "B": _Field("bytes", 0, _NUMBER),
    "O": _Field("bytes", 1, _NUMBER),
    "t": _Field("time", 2, _TIME_LOCAL, "local", r"\[", r"\]"),
}
_APACHE_OTHER = set("ACDefHIiklLnoPpRSTuvVX") | {"^ti", "^to"}
_APACHE_EPOCH = {"sec": "sec", "msec": "ms", "usec": "us"}
_APACHE_DIRECTIVE = re.compile(r"%([<>!,0-9]*)(?:\{([^}]*)\})?([<>!,0-9]*)(\^t[io]|[A-Za-z%])")


def compile_format(fmt: str) -> Callable[[str], Optional[Request]]:
    """A line parser for an access-log format: a name of ``NAMED_FORMATS``,
    an nginx ``log_format`` string or an Apache ``LogFormat`` string.

    The parser takes one line (no newline) and returns a ``Request`` with
    ``log=""``, or None when the line does not fit the format. Text after
    the last field is ignored, so a format that is a prefix of the real one
    still parses. Raises ValueError, saying why, for a format it cannot
    compile (among them one with no time field: a request must be placed
    in time)."""
    parse = _compile(fmt)
    return lambda line: parse(line, "")


def _compile(fmt: str) -> Parser:
    text = NAMED_FORMATS.get(fmt.strip(), fmt).replace('\\"', '"')  # as written in a config file
    if _NGINX_VAR.search(text):
        tokens = _nginx_tokens(text)
    elif "%" in text:
        tokens = _apache_tokens(text)
    else:
        raise ValueError(f"access log format {fmt!r}: no $variable or %directive in it")
    pattern, kinds = _line_regex(tokens)
    if "time" not in kinds:
        raise ValueError(
            f"access log format {fmt!r} has no time field ($time_local, $time_iso8601, $msec, %t, "
            "%{sec|msec|usec}t): its requests could not be placed in time"
        )
    try:
        regex = re.compile(pattern, re.ASCII)  # \d is 0-9, as int() will want
    except re.error as e:  # pragma: no cover - the pieces are escaped or ours
        raise ValueError(f"access log format {fmt!r}: {e}") from e
    return _parser(regex, set(kinds), _TO_MS[kinds["time"]])


def _nginx_tokens(text: str) -> list[_Token]:
    out: list[_Token] = []
    pos = 0
    for m in _NGINX_VAR.finditer(text):
        out.append(text[pos : m.start()])
        out.append(_NGINX_VARS.get(m.group(1) or m.group(2), _Field("", 9, "")))
        pos = m.end()
    out.append(text[pos:])
    return out


def _apache_tokens(text: str) -> list[_Token]:
    text = text.replace("\\t", "\t").replace("\\n", "\n")
    out: list[_Token] = []
    pos = 0
    for m in _APACHE_DIRECTIVE.finditer(text):
        out.append(_literal(text, pos, m.start()))
        out.append(_apache_field(m.group(1) + m.group(3), m.group(2), m.group(4)))
        pos = m.end()
    out.append(_literal(text, pos, len(text)))
    return out


def _literal(text: str, start: int, end: int) -> str:
    if "%" in text[start:end]:
        raise ValueError(f"access log format {text!r}: a % that starts no directive at {text[start:end]!r}")
    return text[start:end]


def _apache_field(mods: str, arg: Optional[str], letter: str) -> _Token:
    if letter == "%":
        return "%"
    if letter == "s":
        return _Field("status", 0 if ">" in mods else 1, _NUMBER)
    if letter == "t" and arg is not None:
        unit = _APACHE_EPOCH.get(arg.split(":", 1)[-1])
        if unit is None:
            if arg.split(":", 1)[-1] in ("msec_frac", "usec_frac"):
                return _Field("", 9, r"\d+")
            raise ValueError(f"%{{{arg}}}t: only %t and %{{sec|msec|usec}}t are understood")
        return _Field("time", 0, _EPOCH, unit)
    if letter == "i" and arg is not None and arg.lower() in ("referer", "user-agent"):
        return _Field("referer" if arg.lower() == "referer" else "user_agent", 0, "")
    if letter == "a" and arg == "c":
        return _Field("client", 2, "")
    if letter in _APACHE_LETTERS:
        return _APACHE_LETTERS[letter]
    if letter in _APACHE_OTHER:
        return _Field("", 9, "")
    raise ValueError(f"%{letter}: not an Apache LogFormat directive")


def _line_regex(tokens: list[_Token]) -> tuple[str, dict[str, str]]:
    """The regex of a format's tokens (literal text and fields), and each
    captured role's kind. Of the fields with one role, the lowest prio is
    captured; the others are only skipped over."""
    chosen: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if isinstance(t, _Field) and t.role:
            j = chosen.get(t.role)
            if j is None or t.prio < _field(tokens[j]).prio:
                chosen[t.role] = i
    captured = set(chosen.values())
    stops = _stops(tokens)
    parts: list[str] = []
    run: list[str] = []  # fields with no text between them
    for i, t in enumerate(tokens):
        if isinstance(t, str):
            if t or i == len(tokens) - 1:
                parts.append(_atomic(run, len(parts)))
                run = []
            parts.append(re.escape(t))
            continue
        quoted = str(tokens[i - 1]).endswith('"') and str(tokens[i + 1]).startswith('"')
        generic = _UNQUOTED.get(t.role, _BARE).format(re.escape(stops.get(i, "")))
        pattern = t.pattern or (_QUOTED if quoted else generic)
        group = f"?P<{t.role}>" if i in captured else "?:"
        run.append(f"{t.pre}({group}{pattern}){t.post}")
    return "".join(parts), {role: _field(tokens[i]).kind for role, i in chosen.items()}


def _stops(tokens: list[_Token]) -> dict[int, str]:
    """Unquoted fields that share a word with another one ($a:$b:$c): all
    but the last end at the first of the text after them, so a line that
    does not fit fails in time of its length, not of its length to the
    power of the fields. (One such field, as $remote_addr:$remote_port,
    still finds the last ":" of an IPv6 address.)"""
    stops: dict[int, str] = {}
    word: list[int] = []  # the generic fields of this word
    for i, t in enumerate(tokens):
        if isinstance(t, _Field):
            quoted = str(tokens[i - 1]).endswith('"') and str(tokens[i + 1]).startswith('"')
            if not t.pattern and not quoted:
                word.append(i)
        elif any(c.isspace() for c in t) or i == len(tokens) - 1:
            for j in word[:-1]:
                after = str(tokens[j + 1])
                if after and not after[0].isspace():
                    stops[j] = after[0]
            word = []
    return stops


def _atomic(run: list[str], n: int) -> str:
    """Fields written with no text between ($uri$is_args$args): split as
    the first way that fits, never tried again. Backtracking over every
    split of a line that does not fit would take time of its length to
    the power of the fields: an attacker writes the URL."""
    if len(run) < 2:
        return "".join(run)
    return f"(?=(?P<_run{n}>{''.join(run)}))(?P=_run{n})"


def _field(t: _Token) -> _Field:
    if not isinstance(t, _Field):  # pragma: no cover - chosen holds fields only
        raise TypeError(t)
    return t


# ----------------------------------------------------------- field values

# not calendar.month_abbr: that follows the locale, the logs do not
_MONTHS = {m: i + 1 for i, m in enumerate("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split())}
_TL = re.compile(r"(\d\d)/([A-Za-z]{3})/(\d{4}):(\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)")
_ISO = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?(?:Z|([+-])(\d\d):?(\d\d))")


def _local_ms(s: str) -> int:
    """``10/Oct/2000:13:55:36 -0700``: the second's start."""
    m = _TL.fullmatch(s)
    if m is None or m.group(2) not in _MONTHS:
        raise ValueError(s)
    d, mon, y, hh, mm, ss, sign, oh, om = m.groups()
    off = (int(oh) * 3600 + int(om) * 60) * (1 if sign == "+" else -1)
    return (calendar.timegm((int(y), _MONTHS[mon], int(d), int(hh), int(mm), int(ss))) - off) * 1000


def _iso_ms(s: str) -> int:
    m = _ISO.fullmatch(s)
    if m is None:
        raise ValueError(s)
    y, mon, d, hh, mm, ss, frac, sign, oh, om = m.groups()
    off = (int(oh) * 3600 + int(om) * 60) * (-1 if sign == "-" else 1) if sign else 0
    secs = calendar.timegm((int(y), int(mon), int(d), int(hh), int(mm), int(ss))) - off
    return secs * 1000 + (int((frac + "00")[:3]) if frac else 0)


def _epoch_ms(unit: str) -> Callable[[str], int]:
    def ms(s: str) -> int:
        whole, _, frac = s.partition(".")
        if unit == "us":
            return int(whole) // 1000
        if unit == "ms":
            return int(whole)
        return int(whole) * 1000 + (int((frac + "00")[:3]) if frac else 0)

    return ms


_TO_MS: dict[str, Callable[[str], int]] = {
    "local": _local_ms,
    "iso": _iso_ms,
    "sec": _epoch_ms("sec"),
    "ms": _epoch_ms("ms"),
    "us": _epoch_ms("us"),
}

_ESCAPE = re.compile(rb'\\(?:x([0-9A-Fa-f]{2})|u00([0-9A-Fa-f]{2})|(["\\])|([nrtbv]))')
_CONTROL = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"b": b"\b", b"v": b"\v"}


def _unescape_one(m: re.Match[bytes]) -> bytes:
    hexa = m.group(1) or m.group(2)
    if hexa:
        return bytes([int(hexa, 16)])
    return m.group(3) or _CONTROL[m.group(4)]


def _unescape(s: str) -> str:
    """Undo the log's escapes: nginx's \\xHH (and escape=json's \\u00HH),
    Apache's \\" \\\\ \\n and \\xhh. Escaped bytes are UTF-8 text again."""
    if "\\" not in s:
        return s
    return _ESCAPE.sub(_unescape_one, s.encode("utf-8", "surrogateescape")).decode("utf-8", "replace")


_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _request_line(s: str) -> tuple[str, str]:
    """``POST /upload.php?x=1 HTTP/1.1`` -> (method, target); ("", "") for
    anything else ("-", a TLS hello sent to port 80, ...)."""
    parts = _unescape(s).split(" ")
    if (len(parts) == 3 and parts[2].startswith("HTTP/")) or len(parts) == 2:
        if parts[1] and _METHOD.fullmatch(parts[0]):
            return parts[0], parts[1]
    return "", ""


def _method_url(g: dict[str, Optional[str]], roles: set[str]) -> tuple[str, str]:
    if "request" in roles:
        return _request_line(g["request"] or "")
    method = g.get("method") or ""
    url = _unescape(g.get("uri_full") or "")
    if url in ("", "-"):
        url = _unescape(g.get("uri_path") or "")
        url = "" if url == "-" else url
        args = g.get("args") or ""
        if args not in ("", "-"):
            url += "?" + _unescape(args)
        url += g.get("query") or ""  # Apache's %q brings its "?"
    return ("" if method == "-" else method), url


def _number(s: Optional[str]) -> int:
    return int(s) if s and s.isdigit() else 0


def _text(s: Optional[str]) -> str:
    return "" if not s or s == "-" else _unescape(s)


class _Same:
    """One object for each repeat: addresses, agents, referers, URLs and
    sizes repeat from line to line, and kept requests stay small if they
    share them. Bounded: cleared when full."""

    __slots__ = ("ints", "strs")

    def __init__(self) -> None:
        self.strs: dict[str, str] = {}
        self.ints: dict[int, int] = {}

    def s(self, v: str) -> str:
        if len(self.strs) >= 8192:
            self.strs.clear()
        return self.strs.setdefault(v, v)

    def i(self, v: int) -> int:
        if len(self.ints) >= 1024:
            self.ints.clear()
        return self.ints.setdefault(v, v)


def _parser(regex: re.Pattern[str], roles: set[str], to_ms: Callable[[str], int]) -> Parser:
    match = regex.match
    times: dict[str, int] = {}  # lines of one second share their time text
    same = _Same()

    def parse(line: str, log: str) -> Optional[Request]:
        m = match(line)
        if m is None:
            return None
        g = m.groupdict()
        t = g["time"] or ""
        ts = times.get(t)
        if ts is None:
            try:
                ts = to_ms(t)
            except (ValueError, KeyError, OverflowError):
                return None
            if len(times) >= 256:
                times.clear()
            times[t] = ts
        method, url = _method_url(g, roles)
        return Request(
            ts,
            same.s((g.get("client") or "")[:MAX_CLIENT]),
            same.s(method[:MAX_METHOD]),
            same.s(url[:MAX_URL]),
            same.i(_number(g.get("status"))),
            same.i(_number(g.get("bytes"))),
            same.s(_text(g.get("referer"))[:MAX_HEADER]),
            same.s(_text(g.get("user_agent"))[:MAX_HEADER]),
            log,
        )

    return parse


# --------------------------------------------------------------- url paths


def url_path(target: str) -> str:
    """A request target's path as a file lookup sees it: no scheme://host
    (absolute form), no ?query or #fragment, percent-decoded (UTF-8), with
    "//", "/./" and "/../" resolved as nginx and Apache do."""
    if target.startswith(("http://", "https://")):
        slash = target.find("/", target.index("//") + 2)
        target = target[slash:] if slash >= 0 else "/"
    for mark in "?#":
        cut = target.find(mark)
        if cut >= 0:
            target = target[:cut]
    if "%" in target:
        target = unquote(target, errors="replace")
    return _squash(target)


def normal_path(path: str) -> str:
    """``path`` with "//", "/./" and "/../" resolved, as url_path() leaves a
    request's path (for a path that is decoded already)."""
    return _squash(path)


def _squash(path: str) -> str:
    if not path.startswith("/") or ("//" not in path and "/." not in path):
        return path
    out: list[str] = []
    for seg in path.split("/"):
        if seg == "..":
            if out:
                out.pop()
        elif seg not in ("", "."):
            out.append(seg)
    tail = "/" if out and path.endswith(("/", "/.", "/..")) else ""
    return "/" + "/".join(out) + tail


# ---------------------------------------------------------------- tailing

_CHUNK = 1 << 20
ROTATE_GRACE_S = 30.0  # a renamed log is read this long if no new one fills up
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


class _File:
    """One open log file and where reading it got to."""

    __slots__ = ("buf", "dev", "eof", "fd", "ino", "offset", "retired_at", "skipping")

    def __init__(self, fd: int, st: os.stat_result, offset: int) -> None:
        self.fd, self.dev, self.ino, self.offset = fd, st.st_dev, st.st_ino, offset
        self.buf = b""  # a last line with no newline yet
        self.skipping = False  # inside an over-long line, up to its newline
        self.eof = False
        self.retired_at = 0.0

    def same(self, st: os.stat_result) -> bool:
        return st.st_ino == self.ino and st.st_dev == self.dev


class _Log:
    __slots__ = ("at_end", "cur", "old", "parse", "path", "warned")

    def __init__(self, path: str, parse: Parser) -> None:
        self.path, self.parse = path, parse
        self.cur: Optional[_File] = None  # the file at the path
        self.old: Optional[_File] = None  # the file it was, read until the writer moves on
        self.at_end = True  # the file there at start is read from its end
        self.warned = False


class _NotRegular(OSError):
    pass


class AccessLogs:
    """Requests from web server access logs, kept for ``keep_s`` seconds of
    log time (or the newest ``max_requests``), indexed by time."""

    def __init__(
        self,
        logs: Sequence[tuple[str, str]],
        keep_s: float = 900.0,
        max_requests: int = 50_000,
        max_line: int = 16384,
        read_per_poll: int = 4 << 20,
        clock: Callable[[], float] = time.time,
        backfill: int = 0,
    ) -> None:
        """Follow these (path, format) access logs from their current end
        (lines written before the agent started are not read), or from
        ``backfill`` bytes before it (a log found while the agent runs: the
        request that just wrote a file is in its last lines). Raises
        ValueError for a format that does not compile or a path listed twice."""
        if keep_s <= 0 or max_requests < 1 or max_line < 1 or read_per_poll < 1:
            raise ValueError("keep_s, max_requests, max_line and read_per_poll must be positive")
        paths = [p for p, _ in logs]
        if len(set(paths)) != len(paths):
            raise ValueError("an access log is listed twice")
        self._logs = []
        for path, fmt in logs:
            try:
                self._logs.append(_Log(path, _compile(fmt)))
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from e
        self._keep_ms = int(keep_s * 1000)
        self._max, self._max_line, self._per_poll = max_requests, max_line, read_per_poll
        self._clock = clock
        self._ts: list[int] = []  # sorted; _reqs[i] has time _ts[i]
        self._reqs: list[Request] = []
        self._arrived: collections.deque[Request] = collections.deque(maxlen=max_requests)
        self._seq = 0  # of the newest parsed request; _arrived[-1] has it
        self._cutoff = -(1 << 62)
        self._budget = 0
        self._next = 0  # the log read first, in turn, so one busy log cannot starve the rest
        keys = ("lines", "unparsed", "too_long", "rotated", "truncated", "unreadable", "dropped")
        self.counters: dict[str, int] = dict.fromkeys(keys, 0)
        self._start(self._logs, backfill)

    def _start(self, logs: Sequence[_Log], backfill: int) -> None:
        for lg in logs:
            st = self._stat(lg)
            if st is not None:
                self._open(lg, st)
                if lg.cur is not None and backfill > 0 and lg.cur.offset > 0:
                    lg.cur.offset = max(0, lg.cur.offset - backfill)
                    lg.cur.skipping = lg.cur.offset > 0  # from the first whole line on

    def add(self, logs: Sequence[tuple[str, str]], backfill: int = 0) -> list[str]:
        """Follow these logs too (the ones not followed yet), each from
        ``backfill`` bytes before its end; the others go on where they are.
        Returns the paths added; a format that does not compile is left out."""
        known = {lg.path for lg in self._logs}
        new = []
        for path, fmt in logs:
            if path in known:
                continue
            try:
                new.append(_Log(path, _compile(fmt)))
            except ValueError:
                continue
            known.add(path)
        self._logs.extend(new)
        self._start(new, backfill)
        return [lg.path for lg in new]

    @property
    def paths(self) -> list[str]:
        """The logs followed."""
        return [lg.path for lg in self._logs]

    def close(self) -> None:
        """Close every open log file (the object can poll again after)."""
        for lg in self._logs:
            for f in (lg.old, lg.cur):
                if f is not None:
                    os.close(f.fd)
            lg.old = lg.cur = None
            lg.at_end = False  # what appears after a close is read from its start

    # ------------------------------------------------------------ reading

    # A caller's cheap test of a raw line (None: every line is parsed): a
    # line it rejects is read past, never parsed, and counted as filtered.
    line_filter: Optional[Callable[[bytes], bool]] = None

    def poll(self) -> int:
        """Read what was appended since the last poll, from every log (at
        most read_per_poll bytes in all); returns the lines parsed."""
        self._budget = self._per_poll
        n = len(self._logs)
        parsed = 0
        for k in range(n):
            parsed += self._poll_log(self._logs[(self._next + k) % n])
        self._next = (self._next + 1) % max(n, 1)
        self._expire()
        return parsed

    def _poll_log(self, lg: _Log) -> int:
        st = self._stat(lg)
        parsed = self._read(lg, lg.old) if lg.old is not None else 0
        cur = lg.cur
        if cur is not None and (st is None or not cur.same(st)):
            parsed += self._read(lg, cur)
            if lg.old is None:  # renamed or removed: the server writes on to it until it reopens its logs
                self.counters["rotated"] += 1
                cur.retired_at = self._clock()
                lg.old, lg.cur = cur, None
        if lg.cur is None and st is not None:
            self._open(lg, st)
        cur = lg.cur
        if cur is not None and st is not None and cur.same(st):
            if st.st_size < cur.offset:  # copytruncate
                self.counters["truncated"] += 1
                cur.offset, cur.buf, cur.skipping = 0, b"", False
            if st.st_size > cur.offset:
                parsed += self._read(lg, cur)
        old = lg.old
        if old is not None and old.eof:
            moved_on = lg.cur is not None and lg.cur.offset > 0
            if moved_on or self._clock() - old.retired_at >= ROTATE_GRACE_S:
                parsed += self._finish(lg, old)
                lg.old = None
        return parsed

    def _stat(self, lg: _Log) -> Optional[os.stat_result]:
        try:
            return os.stat(lg.path)
        except FileNotFoundError:
            lg.at_end = False  # a log that appears later is new: read from its start
        except OSError as e:
            self._unreadable(lg, e)
        except ValueError as e:  # a NUL in the path: never a file
            self._unreadable(lg, OSError(str(e)))
        return None

    def _open(self, lg: _Log, st: os.stat_result) -> None:
        if lg.old is not None and lg.old.same(st):  # moved back to its path
            lg.cur, lg.old = lg.old, None
            return
        try:
            if not stat.S_ISREG(st.st_mode):
                raise _NotRegular("not a regular file")
            fd = os.open(lg.path, _OPEN_FLAGS)  # O_NONBLOCK: a FIFO swapped in after the stat cannot block
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise _NotRegular("not a regular file")
            except OSError:
                os.close(fd)
                raise
        except _NotRegular as e:
            lg.at_end = False  # the file that takes its place later is new
            self._unreadable(lg, e)
            return
        except OSError as e:
            self._unreadable(lg, e)
            return
        lg.cur = _File(fd, st, st.st_size if lg.at_end else 0)
        lg.at_end = lg.warned = False

    def _unreadable(self, lg: _Log, e: OSError) -> None:
        if not lg.warned:  # once until it reads again, not once a poll
            lg.warned = True
            self.counters["unreadable"] += 1
            log.warning("access log %s cannot be read, retrying: %s", lg.path, e)

    def _read(self, lg: _Log, f: _File) -> int:
        """Read f from its offset to its end, within the poll's budget."""
        parsed = 0
        f.eof = False
        while self._budget > 0:
            want = min(self._budget, _CHUNK)
            try:
                data = os.pread(f.fd, want, f.offset)
            except OSError as e:
                self._unreadable(lg, e)
                f.eof = True
                break
            f.offset += len(data)
            self._budget -= len(data)
            if data:
                parsed += self._feed(lg, f, data)
            if len(data) < want:
                f.eof = True
                break
        return parsed

    def _feed(self, lg: _Log, f: _File, data: bytes) -> int:
        if f.buf:
            data, f.buf = f.buf + data, b""
        lines = data.split(b"\n")
        tail = lines.pop()
        if f.skipping:
            if not lines:
                return 0  # still inside the over-long line
            del lines[0]  # its end
            f.skipping = False
        if len(tail) > self._max_line:  # counted now, skipped up to its newline
            self.counters["too_long"] += 1
            f.skipping, tail = True, b""
        f.buf = tail
        return self._parse(lg, lines)

    def _finish(self, lg: _Log, f: _File) -> int:
        """Close a file done with: a last line with no newline is a line."""
        os.close(f.fd)
        tail, f.buf = f.buf, b""
        return self._parse(lg, [tail]) if tail and not f.skipping else 0

    def _parse(self, lg: _Log, lines: list[bytes]) -> int:
        parse, path, max_line = lg.parse, lg.path, self._max_line
        keys, reqs, arrived = self._ts, self._reqs, self._arrived
        seen = bad = too_long = filtered = 0
        keep = self.line_filter
        for raw in lines:
            if len(raw) > max_line:
                too_long += 1
                continue
            if not raw:
                continue
            if keep is not None and not keep(raw):
                filtered += 1
                continue
            seen += 1
            r = parse(raw.decode("utf-8", "replace"), path)
            if r is None:
                bad += 1
                continue
            t = r.ts_ms
            if not keys or t >= keys[-1]:
                keys.append(t)
                reqs.append(r)
            else:  # servers log at a request's end, from several workers: nearly in order
                i = bisect.bisect_right(keys, t)
                keys.insert(i, t)
                reqs.insert(i, r)
            arrived.append(r)
        c = self.counters
        c["lines"] += seen
        c["unparsed"] += bad
        c["too_long"] += too_long
        c["filtered"] = c.get("filtered", 0) + filtered
        self._seq += seen - bad
        excess = len(keys) - self._max
        if excess > 0:
            del keys[:excess], reqs[:excess]
            c["dropped"] += excess
        return seen - bad

    def _expire(self) -> None:
        self._cutoff = cutoff = int(self._clock() * 1000) - self._keep_ms
        k = bisect.bisect_left(self._ts, cutoff)
        if k:
            del self._ts[:k], self._reqs[:k]
        arrived = self._arrived
        while arrived and arrived[0].ts_ms < cutoff:
            arrived.popleft()

    # ------------------------------------------------------------ queries

    def around(
        self, ts_ms: int, before_ms: int, after_ms: int, logs: Optional[Collection[str]] = None
    ) -> list[Request]:
        """Requests logged in [ts_ms - before_ms, ts_ms + after_ms] (both
        ends in), optionally only from these log paths, nearest first (of
        two as near, the earlier)."""
        i = bisect.bisect_left(self._ts, max(ts_ms - before_ms, self._cutoff))
        j = bisect.bisect_right(self._ts, ts_ms + after_ms)
        got = self._reqs[i:j]
        if logs is not None:
            wanted = frozenset(logs)
            got = [r for r in got if r.log in wanted]
        got.sort(key=lambda r: abs(r.ts_ms - ts_ms))
        return got

    def nearest(
        self, ts_ms: int, window_ms: int, k: int, logs: Optional[Collection[str]] = None
    ) -> list[Request]:
        """At most ``k`` requests within ``window_ms`` of ts_ms, nearest first,
        walking out from ts_ms: the cost is k (plus what ``logs`` leaves out),
        not the requests in the window (a busy site logs thousands a second)."""
        ts, reqs = self._ts, self._reqs
        wanted = None if logs is None else frozenset(logs)
        lo_end = bisect.bisect_left(ts, max(ts_ms - window_ms, self._cutoff))
        hi_end = bisect.bisect_right(ts, ts_ms + window_ms)
        j = bisect.bisect_left(ts, ts_ms, lo_end, hi_end)
        i = j - 1
        out: list[Request] = []
        while len(out) < k and (i >= lo_end or j < hi_end):
            if j >= hi_end or (i >= lo_end and ts_ms - ts[i] <= ts[j] - ts_ms):
                r, i = reqs[i], i - 1
            else:
                r, j = reqs[j], j + 1
            if wanted is None or r.log in wanted:
                out.append(r)
        return out

    def for_url(self, url_path: str, since_ms: int, logs: Optional[Collection[str]] = None) -> list[Request]:
        """Requests for this path (compared as ``url_path()`` reads a
        target; the argument is taken as decoded already) logged at or
        after since_ms, optionally only from these log paths, oldest first."""
        want = _squash(url_path)
        leaf = want.rstrip("/").rsplit("/", 1)[-1]
        wanted = None if logs is None else frozenset(logs)
        reqs = self._reqs
        out = []
        for k in range(bisect.bisect_left(self._ts, max(since_ms, self._cutoff)), len(reqs)):
            r = reqs[k]
            u = r.url
            if not u or (leaf not in u and "%" not in u):  # cheap: most requests are for other files
                continue
            if (wanted is None or r.log in wanted) and _path_of(u) == want:
                out.append(r)
        return out

    def since(self, after_seq: int) -> tuple[int, list[Request]]:
        """The newest sequence number and the requests parsed after
        after_seq that are still kept, oldest first. Every parsed request
        gets the next number (from 1), so ``seq, new = since(seq)`` after
        each poll sees each request once."""
        arrived = self._arrived
        first = self._seq - len(arrived) + 1
        n = len(arrived) - max(after_seq + 1 - first, 0)
        if n <= 0:
            return self._seq, []
        got = list(itertools.islice(reversed(arrived), n))
        got.reverse()
        return self._seq, [r for r in got if r.ts_ms >= self._cutoff]


_path_of = url_path  # for_url's argument has the name
