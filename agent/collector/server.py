"""The collector's HTTP server (aiohttp): enrollment, batch ingest, health, metrics.

Status codes of ``POST /api/v1/batches``, checked in this order:

- 413 when Content-Length is over ``max_body`` (before anything is read);
- 401 for a missing, malformed, unknown or revoked key;
- 429 with Retry-After when the agent is over its rate (token bucket);
- 415 for a Content-Encoding other than identity or gzip;
- 408 when the body does not arrive within ``read_timeout`` (connection closed);
- 413 when a streamed body or a gzip body, decompressed, passes ``max_body``
  (gzip is decompressed here with a hard output cap, never by aiohttp);
- 400 for any WireError, as JSON ``{"error": "<field path>: <reason>"}``; an
  unknown version lists the supported ones;
- 403 plus a WARNING on ``rarewrite.collector.security`` when the batch's
  agent_id is not the key's agent (nothing stored under either id);
- 503 when the store raises StoreError (nothing of the batch is stored);
- 200 ``{"status": "stored" | "duplicate"}`` after the durable commit.
- 409 when the batch's seq was already used in its epoch by another batch
  id (nothing stored): the agent starts a new epoch and sends it again.

``POST /api/v1/enroll`` answers 200 with a key, 401 for a wrong secret or an
unusable token (rate-limited per address), 403 for a revoked id, and 409 when
the id is enrolled and the request proves nothing (its current key as
``Authorization: Bearer``, an admin's reset, a token bound to the id): a
stolen fleet secret cannot take over an agent. ``POST /api/v1/heartbeat``
(the agent's key, JSON) keeps an agent from being reported silent.

Database work runs in threads: one writer thread (ingest, enroll, prune) so
writes never contend inside the process, and a small pool for reads, so the
event loop never blocks. Batch bodies are decoded and validated in one worker
process (started by :func:`serve`; :meth:`Collector.start_decoder`), which
hands the writer ready-to-insert rows (:func:`agent.shared.wire.decode_rows`): on two
cores, decoding and the SQLite writer run side by side instead of sharing one
GIL. Without the worker (tests, or if it dies) the read pool decodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import multiprocessing
import os
import re
import signal
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import Any, Optional, TypeVar

from aiohttp import web

from agent.collector import batch_time, health, responses, terms
from agent.collector.auth import TokenBuckets, bearer, is_enroll_token, key_hash, new_api_key, secret_ok
from agent.collector.guard import ConnectionGuard
from agent.collector.outputs import dropped_counts, emit_all
from agent.collector.outputs.base import Output
from agent.collector.storage.base import (
    ENROLL_BAD_TOKEN,
    ENROLL_NEW,
    ENROLL_REVOKED,
    ENROLL_TAKEN,
    AgentRecord,
    Store,
)
from agent.shared import wire
from agent.shared.clock import Clock
from agent.shared.config.schema import Config
from agent.shared.errors import StoreError, VersionError, WireError
from agent.shared.ratelimit import RateLimiter
from agent.shared.text import iso

log = logging.getLogger("rarewrite.collector.server")
security = logging.getLogger("rarewrite.collector.security")

R = TypeVar("R")
ENROLL_MAX_BODY = 64 << 10
ENROLL_FAILURES_PER_S = 2.0  # wrong secrets per client address, burst 10
_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f]{1,255}\Z")
_LABEL = re.compile(r"[^A-Za-z0-9_.:-]")


class Reject(Exception):
    """An HTTP error answer with a JSON reason."""

    def __init__(
        self, status: int, reason: str, close: bool = False, headers: Optional[dict[str, str]] = None
    ):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.close = close
        self.headers = headers or {}


class Collector:
    """Everything the handlers share."""

    def __init__(self, cfg: Config, store: Store, secret: str, clock: Clock, outputs: list[Output]) -> None:
        self.cfg = cfg
        self.store = store
        self.secret = secret
        self.clock = clock
        self.outputs = outputs
        self.max_body = cfg.collector.max_body
        self.read_timeout = cfg.collector.read_timeout_ms / 1000.0
        self.rates = TokenBuckets(cfg.collector.rate_limit)
        self.enroll_failures = TokenBuckets(ENROLL_FAILURES_PER_S, 10)
        self.auth_log = RateLimiter(clock, per_interval=5, interval_s=60.0)
        self.error_log = RateLimiter(clock, per_interval=5, interval_s=60.0)
        self.reads = ThreadPoolExecutor(4, thread_name_prefix="rw-read")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="rw-write")
        self.decoder: Optional[ProcessPoolExecutor] = None
        self.batches: Counter[str] = Counter()
        self.rejects: Counter[int] = Counter()
        self.events = 0
        self.alerts_emitted = 0
        self.run_stats: dict[str, int] = {}  # evaluate.RunStats of every run since start
        self.expired_reported: set[str] = set()  # exceptions whose expiry was logged
        self.guard: Optional[ConnectionGuard] = None  # set by serve: the connection caps
        self.started_ms = clock.now_ms()
        self.beats: dict[int, tuple[int, str]] = {}  # agent ref -> (time, health JSON), not yet stored
        self.beat_rates = TokenBuckets(1.0, 5)
        self.health_alerts: Counter[str] = Counter()  # kind -> sent since start
        self.health_raised: set[str] = set()  # health alert ids already recorded by this process
        self._emitting: Optional[asyncio.Lock] = None
        # ids of the rules whose alerts ask their agents to quarantine the file
        self.quarantining = frozenset(r.rule_id for r in (cfg.rule, *cfg.rules) if r.enabled and r.quarantine)

    def emitting(self) -> asyncio.Lock:
        """One emission at a time: the outputs are not made for two threads."""
        if self._emitting is None:
            self._emitting = asyncio.Lock()
        return self._emitting

    async def raise_health(self, docs: list[dict[str, Any]]) -> None:
        """Record health alerts and send the new ones to every output; a
        database error is logged (the alert is tried again with the next
        occasion, its id unchanged)."""
        docs = [d for d in docs if d["kibana"]["alert"]["uuid"] not in self.health_raised]
        if not docs or not self.cfg.collector.health_alerts:
            return
        try:
            new = set(await self.write(self.store.record_alerts, health.HEALTH_RULE_ID, health.items(docs)))
        except StoreError as e:
            self.error_log.log(log, logging.ERROR, "health", "event=health_alert_failed error=%r", str(e))
            return
        self.health_raised.update(d["kibana"]["alert"]["uuid"] for d in docs)
        fresh = [d for d in docs if d["kibana"]["alert"]["uuid"] in new]
        if fresh:
            async with self.emitting():
                await self.read(emit_all, self.outputs, fresh)
            for d in fresh:
                self.health_alerts[d["rarewrite"]["health"]["kind"]] += 1
                security.warning("event=health_alert %s", d["message"])

    async def emit(self, docs: list[dict[str, Any]]) -> None:
        """Documents to every output, one emission at a time."""
        if docs:
            async with self.emitting():
                await self.read(emit_all, self.outputs, docs)
            self.alerts_emitted += len(docs)

    async def store_heartbeats(self) -> None:
        beats, self.beats = self.beats, {}
        if beats:
            await self.write(self.store.heartbeats, [(ref, t, h) for ref, (t, h) in beats.items()])

    async def read(self, fn: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(self.reads, partial(fn, *args))

    async def write(self, fn: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(self.writer, partial(fn, *args))

    def start_decoder(self) -> None:
        """Start the decoding worker process (and wait until it runs)."""
        pool = ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"), initializer=_decoder_init
        )
        pool.submit(wire.decode_rows, b"").exception()  # spawn it now, not on the first batch
        self.decoder = pool

    async def decode(self, body: bytes) -> wire.RowBatch:
        """``wire.decode_rows(body)`` in the worker process (or the read pool)."""
        pool = self.decoder
        if pool is not None:
            try:
                return await asyncio.get_running_loop().run_in_executor(pool, wire.decode_rows, body)
            except BrokenProcessPool:
                # The worker died (killed, out of memory): start another one for
                # the next batches, decode this one here.
                log.error("event=decoder_died")
                if self.decoder is pool:
                    self.decoder = None
                    pool.shutdown(wait=False)
                    await asyncio.get_running_loop().run_in_executor(self.reads, self.start_decoder)
        return await self.read(wire.decode_rows, body)

    def close(self) -> None:
        self.reads.shutdown(wait=True)
        self.writer.shutdown(wait=True)
        if self.decoder is not None:
            self.decoder.shutdown(wait=True, cancel_futures=True)
        for out in self.outputs:
            with contextlib.suppress(OSError):
                out.close()


def _decoder_init() -> None:
    """In the decoding worker: SIGINT/SIGTERM are the collector's to handle (a
    terminal's Ctrl-C or systemd signal the whole group); the worker ends when
    the collector shuts its pool down or its pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# aiohttp >= 3.9 wants typed keys (and warns on str keys); 3.8 has only str keys.
COLLECTOR: Any = web.AppKey("collector", Collector) if hasattr(web, "AppKey") else "rarewrite.collector"


def _c(request: web.Request) -> Collector:
    c: Collector = request.app[COLLECTOR]
    return c


def _peer(request: web.Request) -> str:
    return str(request.remote or "?")


async def _read_body(request: web.Request, cap: int, timeout: float) -> bytes:
    """The whole body, at most ``cap`` bytes, within ``timeout`` seconds."""
    if request.content_length is not None and request.content_length > cap:
        raise Reject(413, f"body of {request.content_length} bytes exceeds the limit of {cap}", close=True)
    buf = bytearray()

    async def pull() -> None:
        while True:
            chunk = await request.content.readany()
            if not chunk:
                return
            buf.extend(chunk)
            if len(buf) > cap:
                raise Reject(413, f"body exceeds the limit of {cap} bytes", close=True)

    try:
        await asyncio.wait_for(pull(), timeout)
    except asyncio.TimeoutError:
        raise Reject(408, f"body not received within {timeout:g}s", close=True) from None
    return bytes(buf)


def _gunzip(body: bytes, cap: int) -> bytes:
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(body, cap + 1)
    except zlib.error:
        raise Reject(400, "body is not valid gzip") from None
    if len(out) > cap:
        raise Reject(413, f"decompressed body exceeds the limit of {cap} bytes")
    if not d.eof or d.unused_data:
        raise Reject(400, "gzip body truncated or followed by extra data")
    return out


def _json_reject(status: int, reason: str, headers: Optional[dict[str, str]] = None) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps({"error": reason}, ensure_ascii=True),
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    c = _c(request)
    try:
        return await handler(request)
    except Reject as r:
        c.rejects[r.status] += 1
        resp = _json_reject(r.status, r.reason, r.headers)
        if r.close:
            resp.force_close()
        if r.status == 408:
            # A stalled body: answer, then close at once instead of aiohttp's
            # lingering read (close() still flushes the answer first).
            await resp.prepare(request)
            await resp.write_eof()
            request.protocol.force_close()
        return resp
    except StoreError as e:
        c.rejects[503] += 1
        c.error_log.log(
            log, logging.ERROR, "store", "event=store_error path=%s error=%r", request.path, str(e)
        )
        return _json_reject(503, "collector database unavailable; retry later", {"Retry-After": "5"})


async def enroll(request: web.Request) -> web.Response:
    c = _c(request)
    body = await _read_body(request, ENROLL_MAX_BODY, c.read_timeout)
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise Reject(400, "body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise Reject(400, "body must be a JSON object")
    peer = _peer(request)
    given = doc.get("enrollment_secret")
    token_hash = None
    if not (c.cfg.collector.enroll_with_secret and secret_ok(given, c.secret)):
        if not is_enroll_token(given):
            _deny_enrollment(c, peer, "wrong secret")
        token_hash = key_hash(str(given))
    agent_id, host_name = doc.get("agent_id"), doc.get("host_name")
    if not isinstance(agent_id, str) or not wire.valid_agent_id(agent_id):
        raise Reject(400, "agent_id: must be 1-128 of A-Z a-z 0-9 . _ : @ -")
    if not isinstance(host_name, str) or not _PRINTABLE.match(host_name) or not _utf8(host_name):
        raise Reject(400, "host_name: must be 1-255 printable characters")
    proof = bearer(request.headers.get("Authorization"))
    key, now = new_api_key(), c.clock.now_ms()
    status = await c.write(
        c.store.enroll, agent_id, host_name, key_hash(key), now, proof and key_hash(proof), token_hash
    )
    if status == ENROLL_BAD_TOKEN:
        _deny_enrollment(c, peer, "unknown, used up or expired token")
    if status == ENROLL_REVOKED:
        security.warning("event=enroll_revoked agent_id=%r peer=%r", agent_id, peer)
        raise Reject(403, "this agent id was revoked; an admin must restore it")
    how = "its current key" if proof else "an admin's reset or a token bound to the id"
    alert = health.enrollment(status, agent_id, host_name, now, peer, how)
    await c.raise_health([alert] if alert else [])
    if status == ENROLL_TAKEN:
        c.auth_log.log(
            security,
            logging.WARNING,
            f"taken:{agent_id}",
            "event=reenroll_refused agent_id=%r host_name=%r peer=%r",
            agent_id,
            host_name,
            peer,
        )
        raise Reject(
            409,
            f"agent id {agent_id!r} is enrolled with another key: send its current key, or have an admin "
            f"run 'rarewrite collector agents reset {agent_id}' (or give a token bound to it)",
        )
    event = "agent_enrolled" if status == ENROLL_NEW else "agent_key_replaced"
    security.warning(
        "event=%s agent_id=%r host_name=%r peer=%r token=%s",
        event,
        agent_id,
        host_name,
        peer,
        "yes" if token_hash else "no",
    )
    return web.json_response({"api_key": key})


def _deny_enrollment(c: Collector, peer: str, why: str) -> None:
    """Raise 401 (429 past the per-address rate of failures), logged rate-limited."""
    c.auth_log.log(
        security, logging.WARNING, f"enroll:{peer}", "event=enroll_denied peer=%r reason=%r", peer, why
    )
    wait = c.enroll_failures.take(peer, c.clock.monotonic())
    if wait > 0:
        raise Reject(429, "too many failed enrollments", headers={"Retry-After": str(math.ceil(wait))})
    raise Reject(401, "wrong enrollment secret or token")


async def heartbeat(request: web.Request) -> web.Response:
    """An agent's heartbeat: its health, kept (batched: see store_heartbeats)."""
    c = _c(request)
    agent = await _authenticated(c, request, _peer(request))
    wait = c.beat_rates.take(agent.agent_id, c.clock.monotonic())
    if wait > 0:
        raise Reject(429, "heartbeats too often", headers={"Retry-After": str(max(1, math.ceil(wait)))})
    body = await _read_body(request, health.HEARTBEAT_MAX_BODY, c.read_timeout)
    now = c.clock.now_ms()
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise Reject(400, "body is not valid JSON") from None
    try:
        beat = health.heartbeat_health(doc, now)
    except ValueError as e:
        raise Reject(400, str(e)) from None
    c.beats[agent.ref] = (now, json.dumps(beat))
    return web.json_response(await _with_actions(c, agent, {"status": "ok"}))


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def batches(request: web.Request) -> web.Response:
    c = _c(request)
    if request.content_length is not None and request.content_length > c.max_body:
        raise Reject(
            413, f"body of {request.content_length} bytes exceeds the limit of {c.max_body}", close=True
        )
    peer = _peer(request)
    agent = await _authenticated(c, request, peer)
    wait = c.rates.take(agent.agent_id, c.clock.monotonic())
    if wait > 0:
        raise Reject(429, "rate limit exceeded", headers={"Retry-After": str(max(1, math.ceil(wait)))})
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip"):
        raise Reject(415, f"Content-Encoding {encoding!r} not supported (identity or gzip)")
    body = await _read_body(request, c.max_body, c.read_timeout)
    if encoding == "gzip":
        body = await c.read(_gunzip, body, c.max_body)
    batch = await _decoded(c, body, agent)
    if batch.agent_id != agent.agent_id:
        c.auth_log.log(
            security,
            logging.WARNING,
            f"identity:{agent.agent_id}",
            "event=agent_identity_mismatch key_agent_id=%r body_agent_id=%r peer=%r",
            agent.agent_id,
            batch.agent_id,
            peer,
        )
        raise Reject(403, "agent_id does not match the API key's agent")
    now = c.clock.now_ms()
    batch, dropped, skewed = batch_time.checked(batch, now, c.cfg.collector.retention_ms)
    if skewed or dropped:
        c.error_log.log(
            log,
            logging.WARNING,
            f"skew:{agent.agent_id}",
            "event=agent_clock_skew agent_id=%r sent_at=%s now=%s dropped_times=%d",
            agent.agent_id,
            iso(batch.sent_at),
            iso(now),
            dropped,
        )
    total = batch.events_total()
    batch, candidates = terms.split(batch, c.cfg.rule, c.cfg.rules)
    status = await c.write(c.store.ingest, agent, batch, now, candidates)
    if status == "conflict":  # nothing stored: the agent must start a new epoch, not count it as sent
        _seq_conflict(c, agent, batch)
    c.batches[status] += 1
    if status == "stored":
        c.events += total
        if batch.gaps:
            await c.raise_health(health.losses(agent, batch.gaps, now))
        if batch.notes:
            await c.emit(await c.read(responses.after_notes, c.store, agent, batch.notes, now))
    return web.json_response(await _with_actions(c, agent, {"status": status}))


async def _with_actions(c: Collector, agent: AgentRecord, answer: dict[str, Any]) -> dict[str, Any]:
    """``answer`` with what this agent is asked to do (it acts only if its own
    config agrees), and that this collector takes notes."""
    answer["notes"] = True
    if c.quarantining:
        pending = await c.read(c.store.pending_actions, agent.ref)
        if pending:
            answer["actions"] = [responses.action_for_agent(a) for a in pending]
    return answer


def _seq_conflict(c: Collector, agent: AgentRecord, batch: wire.RowBatch) -> None:
    c.auth_log.log(
        security,
        logging.WARNING,
        f"seq:{agent.agent_id}",
        "event=batch_seq_conflict agent_id=%r epoch=%s seq=%d (a restored snapshot or state dir?)",
        agent.agent_id,
        batch.epoch,
        batch.seq,
    )
    raise Reject(409, f"seq {batch.seq} of epoch {batch.epoch} was used by another batch: start a new epoch")


async def _authenticated(c: Collector, request: web.Request, peer: str) -> AgentRecord:
    """The agent of the request's API key; 401 (logged, rate-limited) without one."""
    token = bearer(request.headers.get("Authorization"))
    if token is None:
        c.auth_log.log(
            security, logging.WARNING, f"auth:{peer}", "event=auth_failed peer=%r reason=%r", peer, "no key"
        )
        raise Reject(
            401, "missing or malformed Authorization: Bearer <key>", headers={"WWW-Authenticate": "Bearer"}
        )
    agent = await c.read(c.store.agent_for_key, key_hash(token))
    if agent is None or agent.revoked:
        why = "unknown key" if agent is None else "revoked agent"
        c.auth_log.log(
            security, logging.WARNING, f"auth:{peer}", "event=auth_failed peer=%r reason=%r", peer, why
        )
        raise Reject(401, why, headers={"WWW-Authenticate": "Bearer"})
    return agent


async def _decoded(c: Collector, body: bytes, agent: AgentRecord) -> wire.RowBatch:
    """The validated batch; 400 with the field path (and the versions we speak) if not."""
    try:
        return await c.decode(body)
    except VersionError as e:
        raise Reject(
            400, str(e), headers={"X-Supported-Versions": ",".join(map(str, wire.SUPPORTED_VERSIONS))}
        ) from None
    except WireError as e:
        c.auth_log.log(
            log,
            logging.INFO,
            f"wire:{agent.agent_id}",
            "event=batch_rejected agent_id=%r error=%r",
            agent.agent_id,
            str(e),
        )
        raise Reject(400, str(e)) from None


async def healthz(request: web.Request) -> web.Response:
    c = _c(request)
    try:
        await c.read(c.store.check)
    except StoreError:
        return web.Response(status=503, text="database unavailable\n")
    return web.Response(text="ok\n")


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text exposition format


def _metric(lines: list[str], name: str, kind: str, help_: str, samples: list[tuple[str, object]]) -> None:
    """One metric family: HELP, TYPE, then ``name{labels} value`` per sample."""
    lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{labels} {value}" for labels, value in samples]


def _evaluation_metrics(out: list[str], c: Collector, counts: dict[str, Any]) -> None:
    _metric(
        out, "rarewrite_collector_alerts", "gauge", "Alerts kept in the database.", [("", counts["alerts"])]
    )
    _metric(
        out,
        "rarewrite_collector_alerts_total",
        "counter",
        "Alerts raised by this collector since start.",
        [("", c.alerts_emitted)],
    )
    _metric(
        out,
        "rarewrite_collector_health_alerts_total",
        "counter",
        "Sensor-health alerts raised by this collector since start, by kind.",
        [(f'{{kind="{k}"}}', c.health_alerts[k]) for k in health.KINDS],
    )
    _metric(
        out,
        "rarewrite_collector_rows_cut_total",
        "counter",
        "Rows over the rule's limit in a run since start (the continuous schedule alerts them next).",
        [("", c.run_stats.get("cut", 0))],
    )
    _metric(
        out,
        "rarewrite_collector_rows_suppressed_total",
        "counter",
        "Rows folded into an earlier alert by suppression since start.",
        [("", c.run_stats.get("suppressed", 0))],
    )
    _metric(
        out,
        "rarewrite_collector_exceptions_expired",
        "gauge",
        "Exceptions of the rule whose expiry has passed (they no longer apply).",
        [("", len(c.expired_reported))],
    )


def _connection_metrics(out: list[str], c: Collector) -> None:
    guard = c.guard
    if guard is None:
        return
    _metric(out, "rarewrite_collector_connections", "gauge", "Client connections held.",
            [("", len(guard.live))])  # fmt: skip
    _metric(
        out,
        "rarewrite_collector_connections_closed_total",
        "counter",
        "Connections closed by the collector since start: header_timeout, evicted (room at a cap), "
        "peer_cap or total_cap (refused).",
        [
            (f'{{reason="{r}"}}', guard.closed[r])
            for r in ("header_timeout", "evicted", "peer_cap", "total_cap")
        ],
    )


async def metrics(request: web.Request) -> web.Response:
    c = _c(request)
    counts = await c.read(c.store.counts)
    gaps: Counter[str] = Counter()
    for reason, n in counts["gaps"].items():
        gaps[_LABEL.sub("_", reason)[:64]] += n
    out: list[str] = []
    _metric(
        out,
        "rarewrite_collector_batches_total",
        "counter",
        "Batches accepted since start, by result.",
        [(f'{{status="{s}"}}', c.batches[s]) for s in ("stored", "duplicate")],
    )
    _metric(
        out,
        "rarewrite_collector_events_total",
        "counter",
        "Events stored since start (each count time is one event).",
        [("", c.events)],
    )
    _metric(
        out,
        "rarewrite_collector_rejects_total",
        "counter",
        "Requests refused since start, by HTTP status.",
        [(f'{{code="{code}"}}', c.rejects[code]) for code in sorted(c.rejects)],
    )
    _metric(out, "rarewrite_collector_agents", "gauge", "Agents enrolled.", [("", counts["agents"])])
    _metric(
        out,
        "rarewrite_collector_gaps",
        "gauge",
        "Reported losses kept in the database, by reason.",
        [(f'{{reason="{r}"}}', n) for r, n in sorted(gaps.items())[:100]],
    )
    _evaluation_metrics(out, c, counts)
    _connection_metrics(out, c)
    _metric(
        out,
        "rarewrite_collector_output_dropped_total",
        "counter",
        "Alerts an output dropped since start (its queue was full).",
        # names are [A-Za-z0-9_.-]: safe labels
        [(f'{{output="{name}"}}', n) for name, n in sorted(dropped_counts(c.outputs).items())],
    )
    _metric(out, "process_resident_memory_bytes", "gauge", "Resident memory of this process in bytes.",
            [("", _rss())])  # fmt: skip
    return web.Response(body=("\n".join(out) + "\n").encode(), headers={"Content-Type": METRICS_TYPE})


def make_app(
    cfg: Config, store: Store, secret: str, clock: Clock, outputs: Optional[list[Output]] = None
) -> web.Application:
    """The aiohttp application; no background tasks (see :func:`serve`)."""
    app = web.Application(client_max_size=cfg.collector.max_body, middlewares=[_errors])
    c = Collector(cfg, store, secret, clock, outputs or [])
    app[COLLECTOR] = c
    app.router.add_post("/api/v1/enroll", enroll)
    app.router.add_post("/api/v1/batches", batches)
    app.router.add_post("/api/v1/heartbeat", heartbeat)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)

    async def cleanup(_: web.Application) -> None:
        await asyncio.get_running_loop().run_in_executor(None, c.close)

    app.on_cleanup.append(cleanup)
    return app
