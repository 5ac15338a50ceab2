"""The analyst's first questions, answered on the host when a detailed
event's facts are read (1 s after the write): does a package own the file
(and does it differ from the packaged one), is it in a web root and would
the server execute it, what is in it, and which web request wrote it.

Only detailed events get here (a pair's first few in the agent's hour: the
ones an alert can show), so the cost is per candidate, not per event. Then,
for ``followup`` after the write, the requests for the new file (the
attacker calling the shell) and late log lines of the write's window go to
the collector as ``req`` notes (:mod:`agent.shared.wire.context`).

A container's file is judged by the host's servers and packages only when
the container sees it at the host's path; else only its content is read.
"""

from __future__ import annotations

import bisect
import logging
import os
import re
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from agent.sensor.enrich import servers
from agent.sensor.enrich.accesslog import AccessLogs, Request, normal_path, url_path
from agent.sensor.enrich.content import ContentScanner
from agent.sensor.enrich.packages import PackageIndex
from agent.sensor.enrich.webroots import Placement, WebRoot, WebRoots
from agent.sensor.outbox import Candidate
from agent.shared.clock import Clock
from agent.shared.config.schema import EnrichConfig
from agent.shared.errors import ConfigError
from agent.shared.text import visible
from agent.shared.wire.context import MAX_NOTE_REQS, MAX_REQS, MAX_SIGNALS, MAX_URL

log = logging.getLogger("rarewrite.enrich")

MAX_WATCHES = 2000  # new files whose follow-up requests are watched (the oldest go first)
WRITE_METHODS = frozenset(("POST", "PUT", "PATCH"))
# writers whose file outside every known root makes the agent look for a new site at once
WEB_SERVERS = ("nginx", "apache", "httpd", "php", "lsphp", "lighttpd", "caddy", "uwsgi", "gunicorn", "java",
               "node")  # fmt: skip


def _web_server(name: Optional[str]) -> bool:
    return bool(name) and str(name).startswith(WEB_SERVERS)


def _uploads(raw: bytes) -> bool:
    return b'"POST ' in raw or b'"PUT ' in raw or b'"PATCH ' in raw


def _escaped(raw: bytes) -> bool:
    return b"%" in raw or b"\\x" in raw


def _watch_key(url: str) -> str:
    """The URL path a request for ``url`` (a file's, decoded) comes out as
    from url_path(): a name that is not UTF-8 as its request decodes."""
    return normal_path(url.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))


_CUTS = (("ip", 64), ("m", 32), ("url", MAX_URL), ("ua", 1024), ("ref", MAX_URL), ("log", 4096))


BACKFILL_BYTES = 1 << 20  # of a log found while running: read from this far before its end
REDISCOVER_S = 30.0  # the web servers' configs are read again this often (web_roots = auto)
MAX_FOLLOWUPS = 64  # requests for one new file sent as follow-ups, at most
MAX_WRITES = 20_000
WRITES_KEEP_MS = 15 * 60_000
REQUESTS_PER_S = 200  # detailed events a second that get their requests (a burst of sessions must not)


@dataclass
class _Watch:
    ts_ms: int
    exe: Optional[bytes]
    path: Optional[bytes]
    url: str
    logs: Optional[frozenset[str]]
    read_upto: int  # the access logs' sequence number when the event was enriched: later ones are new
    late: int = 0  # late write-method lines of the write's window sent so far
    followups: int = 0  # requests for the file sent so far


def text(s: str, limit: int) -> str:
    """``s`` as the wire takes it: UTF-8 (a file name's undecodable bytes as
    ``\\xNN``, as alerts show them), at most ``limit`` characters."""
    return (s if s.isascii() else str(visible(s.encode("utf-8", "surrogateescape"))))[:limit]


def request_map(r: Request, in_window: bool) -> dict[str, Any]:
    """One access-log request as a wire ``<req>``, cut to the wire's bounds."""
    m: dict[str, Any] = {"ts": max(0, r.ts_ms), "st": max(0, min(r.status, 999)), "n": max(0, r.bytes_sent)}
    for key, value in zip(("ip", "m", "url", "ua", "ref", "log"),
                          (r.client, r.method, r.url, r.user_agent, r.referer, r.log)):  # fmt: skip
        if value:
            m[key] = value
    for key, limit in _CUTS:
        if key in m:
            m[key] = text(m[key], limit)
    m["w"] = in_window
    return m


class Enricher:
    """``enricher(candidate)``: the ``ctx`` map of a detailed event (None when
    nothing is known); :meth:`poll`: the follow-up notes due."""

    def __init__(
        self,
        cfg: EnrichConfig,
        clock: Clock,
        packages: Optional[PackageIndex] = None,
        roots: Optional[WebRoots] = None,
        logs: Optional[AccessLogs] = None,
        content: Optional[ContentScanner] = None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.packages = packages
        self.roots = roots
        self.logs = logs
        self.content = content
        self._watches: OrderedDict[str, list[_Watch]] = OrderedDict()  # URL path -> its new files
        self._recent: deque[_Watch] = deque()  # watches still inside their write window
        self._n_watches = 0
        self._seq = 0
        # () -> (roots, logs) found again, or None: nothing changed (web_roots = auto)
        self.rediscover: Optional[Callable[[], Optional[servers.Found]]] = None
        self._next_discovery = clock.monotonic() + REDISCOVER_S
        self._last_discovery = clock.monotonic()
        self._armed_until = -1.0  # monotonic: until then every log line is parsed (see arm)
        self._watch_gen = 0  # bumped when the watched URLs change
        self._leaves: Optional[tuple[int, Optional[Callable[[bytes], bool]]]] = None
        self._unmatched: list[tuple[int, Request]] = []  # (seq, request) read, not yet matched by poll
        self._second, self._budget = -1, 0
        # the uploads (POST, PUT, PATCH) of the last WRITES_KEEP_MS, by time: few, even on a busy site
        self._writes: list[tuple[int, int, Request]] = []
        self.counters = {"enriched": 0, "followup_notes": 0, "watches_dropped": 0, "requests_skipped": 0}

    # ------------------------------------------------------------ the event

    def __call__(self, cand: Candidate) -> Optional[dict[str, Any]]:
        ctx: dict[str, Any] = {}
        at_host_path = cand.path is None or cand.path == cand.host_path
        if self.packages is not None and at_host_path and self.packages.available():
            own = self.packages.owner(cand.host_path, cand.stat)
            pkg: dict[str, Any] = {"own": own is not None}
            if own is not None:
                pkg.update(mgr=text(own.manager, 16), name=text(own.package, 256))
                if own.differs is not None:
                    pkg["diff"] = own.differs
            ctx["pkg"] = pkg
        place = self.roots.place(cand.host_path) if self.roots is not None and at_host_path else None
        if place is None and at_host_path and _web_server(cand.process_name) and self._may_rediscover():
            place = self.roots.place(cand.host_path) if self.roots is not None else None
        if self.roots is not None and at_host_path:
            ctx["root"] = _root_map(place)
        if self.content is not None:
            signals = self.content.scan(cand.host_path, cand.stat)
            if signals is not None:
                ctx["sig"] = [text(sig, 128) for sig in signals[:MAX_SIGNALS]]
        if self.logs is not None and self._take():
            ctx["req"] = self._write_requests(cand, place)
        if ctx:
            self.counters["enriched"] += 1
        return ctx or None

    def _write_requests(self, cand: Candidate, place: Optional[Placement]) -> list[dict[str, Any]]:
        """The requests logged within the window of the write, the likeliest
        writer first (a method that uploads, then the nearest in time); the
        file is watched for what comes after."""
        if self.logs is None:
            return []
        self.poll_logs()
        logs = _log_paths(place)
        window = self.cfg.request_window_ms
        # the nearest that upload (from their own index: few), then the nearest others
        ts = cand.ts_ms
        i = bisect.bisect_left(self._writes, (ts - window,))
        j = bisect.bisect_left(self._writes, (ts + window + 1,))
        writes = [r for _, _, r in self._writes[i:j] if logs is None or r.log in logs]
        best = sorted(writes, key=lambda r: abs(r.ts_ms - ts))[:MAX_REQS]
        if len(best) < MAX_REQS:
            near = self.logs.nearest(ts, window, MAX_REQS * 2, logs)
            best += [r for r in near if r.method not in WRITE_METHODS][: MAX_REQS - len(best)]
        if place is not None:
            exe = cand.executable or None  # as the wire takes it: nil, never empty
            self._watch(_Watch(cand.ts_ms, exe, cand.path or None, _watch_key(place.url), logs, self._seq))
        return [request_map(r, True) for r in best]

    def _take(self) -> bool:
        """One of this second's REQUESTS_PER_S; counted when there is none left."""
        now = int(self.clock.monotonic())
        if now != self._second:
            self._second, self._budget = now, REQUESTS_PER_S
        if self._budget <= 0:
            self.counters["requests_skipped"] += 1
            return False
        self._budget -= 1
        return True

    # -------------------------------------------------------------- after it

    def _watch(self, w: _Watch) -> None:
        self._watch_gen += 1
        self._watches.setdefault(w.url, []).append(w)
        self._watches.move_to_end(w.url)
        self._recent.append(w)
        self._n_watches += 1
        while self._n_watches > MAX_WATCHES:
            _, dropped = self._watches.popitem(last=False)
            self._watch_gen += 1
            self._n_watches -= len(dropped)
            self.counters["watches_dropped"] += len(dropped)

    def arm(self) -> None:
        """A detailed event was just stored: parse every log line for a while
        (its writing request is logged at its end, after the write). Unarmed,
        only lines naming a watched file are parsed, or none: a busy site's
        log costs the reading, not the parsing."""
        self._armed_until = self.clock.monotonic() + 2 * self.cfg.request_window_ms / 1000 + 2

    def _line_filter(self) -> Optional[Callable[[bytes], bool]]:
        """What a raw line must hold to be parsed now: everything while armed;
        else an upload (its request may be read before the event: a burst);
        with watches, also a watched file's name, or any escape (%, \\x: a
        name a client or the server encoded)."""
        if self.clock.monotonic() < self._armed_until:
            return None
        if not self._watches:
            return _uploads
        if self._leaves is None or self._leaves[0] != self._watch_gen:
            names = {u.rsplit("/", 1)[-1].encode("utf-8", "replace") for u in self._watches} - {b""}
            if len(names) > 256:
                self._leaves = (self._watch_gen, None)
            else:
                named = re.compile(b"|".join(re.escape(n) for n in sorted(names))).search
                keep = lambda raw: _uploads(raw) or _escaped(raw) or bool(named(raw))  # noqa: E731
                self._leaves = (self._watch_gen, keep)
        return self._leaves[1]

    def poll_logs(self) -> list[Request]:
        """The requests logged since the last call."""
        if self.logs is None:
            return []
        self.logs.line_filter = self._line_filter()
        self.logs.poll()
        self._seq, new = self.logs.since(self._seq)
        first = self._seq - len(new) + 1
        self._unmatched.extend((first + i, r) for i, r in enumerate(new))
        for i, r in enumerate(new):
            if r.method in WRITE_METHODS:
                bisect.insort(self._writes, (r.ts_ms, first + i, r))
        if self._writes:  # the oldest go: past WRITES_KEEP_MS before the newest, or past MAX_WRITES
            old = bisect.bisect_left(self._writes, (self._writes[-1][0] - WRITES_KEEP_MS,))
            del self._writes[: max(old, len(self._writes) - MAX_WRITES)]
        return new

    def poll(self) -> list[dict[str, Any]]:
        """The ``req`` notes of requests logged since the last poll that ask
        for a watched new file, or fall in a recent write's window and were
        not sent with it; watches past ``followup`` are dropped."""
        self._maybe_rediscover()
        if self.logs is None:
            return []
        self.poll_logs()
        new, self._unmatched = self._unmatched, []
        self._expire(self.clock.now_ms())
        found: dict[int, tuple[_Watch, list[dict[str, Any]]]] = {}
        window = self.cfg.request_window_ms
        for seq, r in new:
            for w in self._watches.get(url_path(r.url), ()):
                if seq > w.read_upto and r.ts_ms >= w.ts_ms - 1000 and (w.logs is None or r.log in w.logs):
                    if w.followups < MAX_FOLLOWUPS:  # an attacker's script calling it all day is not all sent
                        w.followups += 1
                        found.setdefault(id(w), (w, []))[1].append(request_map(r, False))
            if r.method not in WRITE_METHODS:
                continue  # a late line can only change the answer if it could be the upload
            for w in self._recent:
                late = seq > w.read_upto and abs(r.ts_ms - w.ts_ms) <= window and w.late < MAX_REQS
                if late and (w.logs is None or r.log in w.logs) and url_path(r.url) != w.url:
                    w.late += 1
                    found.setdefault(id(w), (w, []))[1].append(request_map(r, True))
        notes = [
            {"ts": w.ts_ms, "exe": w.exe, "path": w.path, "kind": "req", "reqs": reqs[i : i + MAX_NOTE_REQS]}
            for w, reqs in found.values()
            for i in range(0, len(reqs), MAX_NOTE_REQS)
        ]
        self.counters["followup_notes"] += len(notes)
        return notes

    def _expire(self, now_ms: int) -> None:
        # a log line can be written a little after its window (a slow response)
        while self._recent and self._recent[0].ts_ms + 2 * self.cfg.request_window_ms < now_ms:
            self._recent.popleft()
        until = now_ms - self.cfg.followup_ms
        for url in [u for u, ws in self._watches.items() if ws[0].ts_ms < until]:
            keep = [w for w in self._watches[url] if w.ts_ms >= until]
            self._n_watches -= len(self._watches[url]) - len(keep)
            if keep:
                self._watches[url] = keep
            else:
                del self._watches[url]
                self._watch_gen += 1

    def _may_rediscover(self) -> bool:
        """Look again now (at most every 5 s) for a web server's file outside
        every root: its site may have just started."""
        if self.rediscover is None or self.clock.monotonic() < self._last_discovery + 5:
            return False
        self._maybe_rediscover(force=True)
        return True

    def _maybe_rediscover(self, force: bool = False) -> None:
        """Every REDISCOVER_S (or ``force``), the servers again (a site started
        or reconfigured after the agent): new roots and logs are taken up (a
        new log from BACKFILL_BYTES before its end: the request that sent us
        here is in it), the logs followed go on where they are."""
        now = self.clock.monotonic()
        if self.rediscover is None or (now < self._next_discovery and not force):
            return
        self._next_discovery = now + REDISCOVER_S
        self._last_discovery = now
        try:
            found = self.rediscover()
            if found is None:
                return
            roots, logs = found
            if tuple(roots) != (self.roots.roots if self.roots is not None else ()):
                self.roots = WebRoots(roots)
                _log_targets(roots, logs)
            if self.logs is None:
                self.logs = _follow(self.cfg, logs, BACKFILL_BYTES)
            else:
                self.logs.add(logs, BACKFILL_BYTES)
        except Exception as e:  # noqa: BLE001 - a config or log we cannot read must not stop the sensor
            log.warning("event=rediscovery_failed error=%r", repr(e)[:300])

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counters)
        out["watches"] = self._n_watches
        out["web_roots"] = len(self.roots) if self.roots is not None else 0
        if self.logs is not None:  # a few: heartbeats carry at most 100 counters in all
            out["access_log_lines"] = self.logs.counters.get("lines", 0)
            out["access_log_unparsed"] = self.logs.counters.get("unparsed", 0)
        if self.content is not None:
            out["content_not_scanned"] = sum(self.content.skipped.values())
        return out


def _root_map(place: Optional[Placement]) -> dict[str, Any]:
    if place is None:
        return {"in": False}
    return {
        "in": True,
        "srv": text(place.root.server, 16),
        "dir": place.root.root or None,
        "url": text(place.url, MAX_URL),
        "exec": place.executable,
    }


def _log_paths(place: Optional[Placement]) -> Optional[frozenset[str]]:
    """The logs of the server block that serves the file (None: every log)."""
    if place is None or not place.root.access_logs:
        return None
    return frozenset(p for p, _ in place.root.access_logs)


# ------------------------------------------------------------------ building


def build_enricher(cfg: EnrichConfig, clock: Clock) -> Optional[Enricher]:
    """The agent's enricher (None when ``[enrich] enabled = no``); raises
    ConfigError listing every web root and log format it cannot use."""
    if not cfg.enabled:
        return None
    problems: list[str] = []
    running = servers.running_configs()
    roots, logs = servers.targets(cfg, running, problems)
    if problems:
        raise ConfigError(problems)
    enricher = Enricher(
        cfg,
        clock,
        packages=PackageIndex() if cfg.packages else None,
        roots=WebRoots(roots),
        logs=_follow(cfg, logs),
        content=(
            ContentScanner(max_bytes=cfg.content_max_bytes, files_per_s=cfg.content_rate,
                           yara_rules_dir=cfg.yara_rules or None)
            if cfg.content else None
        ),
    )  # fmt: skip
    if "auto" in cfg.web_roots:
        discovery = servers.Discovery(cfg, clock.monotonic)
        discovery.started_with(running)  # the next looks parse again only what changed
        enricher.rediscover = discovery
    if enricher.packages is not None:
        enricher.packages.owner(b"/")  # the index is built now, not in the sensor's loop at a first event
    _log_targets(roots, logs)
    return enricher


def _follow(cfg: EnrichConfig, logs: Sequence[tuple[str, str]], backfill: int = 0) -> Optional[AccessLogs]:
    keep_s = max(900.0, 2 * cfg.request_window_ms / 1000)
    return AccessLogs(logs, keep_s=keep_s, backfill=backfill) if logs else None


def _log_targets(roots: Sequence[WebRoot], logs: Sequence[tuple[str, str]]) -> None:
    log.info(
        "event=enrichment web_roots=%s access_logs=%s",
        ",".join(os.fsdecode(r.root) for r in roots[:20]) or "none",
        ",".join(p for p, _ in logs[:20]) or "none",
    )
