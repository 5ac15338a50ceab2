"""``rarewrite collector serve``: the store, the outputs and the HTTP server
wired together, with the schedule and prune loops, until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import resource
import signal
import ssl
from collections.abc import Callable
from functools import partial
from typing import Any, Optional

from aiohttp import web

from agent.collector import evaluate as ev
from agent.collector import fleet_rules as fr
from agent.collector import health, responses
from agent.collector.guard import ConnectionGuard, Limits
from agent.collector.outputs import build_outputs
from agent.collector.server import COLLECTOR, Collector, make_app
from agent.collector.storage import open_store
from agent.collector.storage.base import PRUNE_CHUNK
from agent.shared.clock import SystemClock
from agent.shared.config.schema import Config
from agent.shared.errors import StoreError
from agent.shared.rule import Rule
from agent.shared.rules import NewTermsRule
from agent.shared.systemd import Watchdog, notify
from agent.shared.text import iso, redact

log = logging.getLogger("rarewrite.collector.server")

PRUNE_EVERY_S = 60.0
HEALTH_EVERY_S = 5.0
CONTINUOUS_EVERY_S = 1.0
TERMS_OVERLAP_MS = 60_000  # new-terms runs read back this far: batches committing while the last one read


async def schedule_loop(c: Collector) -> None:
    """Run the rule on its schedule until cancelled. The hourly run for T
    waits ``grace`` after T for events still on their way (ship interval,
    facts delay, a retry); at start it first runs every T it missed that is
    still inside the retention (runs are idempotent: nothing is alerted twice)."""
    rule = c.cfg.rule
    if not rule.enabled:
        return
    if c.cfg.collector.schedule == "continuous":
        while True:
            await asyncio.sleep(CONTINUOUS_EVERY_S)
            at = c.clock.now_ms()
            tick = partial(ev.run_continuous, c.store, rule, at, c.cfg.collector.settle_ms, c.run_stats)
            took = await _run(c, tick, at, True)
            if took > CONTINUOUS_EVERY_S:
                await asyncio.sleep(took)  # never spend more than half the time evaluating
    grace = c.cfg.collector.grace_ms
    for at in missed_runs(rule, c.clock.now_ms(), grace, c.cfg.collector.retention_ms):
        await _run(c, partial(ev.run_hourly, c.store, rule, at, c.run_stats), at, False)
    while True:
        now = c.clock.now_ms()
        at = ((now - grace) // rule.schedule_ms + 1) * rule.schedule_ms
        await asyncio.sleep((at + grace - now) / 1000.0)
        await _run(c, partial(ev.run_hourly, c.store, rule, at, c.run_stats), at, False)


def missed_runs(rule: Rule, now_ms: int, grace_ms: int, retention_ms: int) -> list[int]:
    """Every hourly T whose run is due (T + grace <= now) and whose window
    lies inside the retention (so its run is still exact), oldest first."""
    every = rule.schedule_ms
    last = (now_ms - grace_ms) // every * every
    first = -(-(now_ms - retention_ms + rule.window_ms) // every) * every  # ceil
    return list(range(first, last + 1, every))


async def _run(c: Collector, run: Callable[[], list[dict[str, Any]]], at: int, continuous: bool) -> float:
    """One evaluation and its alerts to every output; seconds it took."""
    report_expired(c, at)
    started = c.clock.monotonic()
    try:
        alerts = await c.read(run)
        await c.emit(alerts)
        actions = responses.quarantine_rows(c.quarantining, alerts, c.clock.now_ms())
        if actions:  # after the alerts went out: the agents are asked in their next answer
            await c.write(c.store.queue_actions, actions)
        took = c.clock.monotonic() - started
        if not continuous or alerts:
            log.info("event=evaluated at=%s alerts=%d seconds=%.3f", iso(at), len(alerts), took)
        return took
    except StoreError as e:
        c.error_log.log(log, logging.ERROR, "schedule", "event=evaluation_failed error=%r", str(e))
        return c.clock.monotonic() - started


def _log_start(cfg: Config, tls: bool) -> None:
    log.info(
        "event=listening address=%r tls=%s client_certs=%s db=%r schedule=%s",
        cfg.collector.listen,
        "yes" if tls else "no",
        "required" if cfg.collector.tls_client_ca else "no",
        redact(cfg.collector.db),
        cfg.collector.schedule,
    )
    rule = cfg.rule
    log.info(
        "event=rule name=%r exceptions=%d suppress_by=%s suppress_for_s=%d",
        rule.name,
        len(rule.exceptions),
        ",".join(rule.suppress_by) or "-",
        rule.suppress_for_ms // 1000,
    )


def report_expired(c: Collector, at_ms: int) -> None:
    """Log each exception once, when it stops applying (its expires has passed)."""
    for x in c.cfg.rule.exceptions:
        if not x.active_at(at_ms) and x.name not in c.expired_reported:
            c.expired_reported.add(x.name)
            log.warning(
                "event=exception_expired name=%s expired_at=%s comment=%r",
                x.name,
                iso(x.expires_ms or 0),
                x.comment,
            )


async def fleet_rules_loop(c: Collector) -> None:
    """Run the new-terms and outbreak rules: every second with the continuous
    schedule, else on each rule's own schedule. New events received since the
    last run that succeeded are alerted (with a minute's overlap for batches
    committing as the last run read; an alert is never raised twice), from
    the retention back at start."""
    continuous = c.cfg.collector.schedule == "continuous"
    rules = [r for r in c.cfg.rules if r.enabled]
    sources = {r.key: r for r in rules if isinstance(r, NewTermsRule)}
    since = {r.rule_id: c.clock.now_ms() - c.cfg.collector.retention_ms for r in rules}
    raised: dict[str, dict[str, int]] = {r.rule_id: {} for r in rules}  # the overlap's alerts, per rule
    due = dict.fromkeys(since, 0)

    def ran(fn: Callable[[], list[dict[str, Any]]], rule_id: str, now: int) -> list[dict[str, Any]]:
        out = fn()
        since[rule_id] = now - TERMS_OVERLAP_MS  # only once its alerts are recorded
        return out

    while rules:
        await asyncio.sleep(CONTINUOUS_EVERY_S)
        now = c.clock.now_ms()
        for r in rules:
            if not continuous and now < due[r.rule_id]:
                continue
            due[r.rule_id] = (now // r.schedule_ms + 1) * r.schedule_ms
            if isinstance(r, NewTermsRule):
                retention = c.cfg.collector.retention_ms
                run = partial(
                    fr.run_new_terms, c.store, r, now, since[r.rule_id], retention, raised[r.rule_id]
                )
            elif r.source in sources:
                run = partial(fr.run_outbreak, c.store, r, sources[r.source], now)
            else:
                continue
            await _run(c, partial(ran, run, r.rule_id, now), now, True)


async def prune_loop(c: Collector) -> None:
    """Delete what is past retention, one small chunk per writer call; forget
    new terms older than their rule's history."""
    while True:
        before = c.clock.now_ms() - c.cfg.collector.retention_ms
        try:
            for r in c.cfg.rules:
                if isinstance(r, NewTermsRule):
                    await c.write(c.store.prune_terms, r.rule_id, c.clock.now_ms() - r.history_ms)
            total = 0
            while True:
                n = await c.write(c.store.prune, before, 1)
                total += n
                if n < PRUNE_CHUNK:
                    break
                await asyncio.sleep(0)
            if total:
                log.info("event=pruned events=%d before=%s", total, iso(before))
        except StoreError as e:
            c.error_log.log(log, logging.ERROR, "prune", "event=prune_failed error=%r", str(e))
        await asyncio.sleep(PRUNE_EVERY_S)


async def health_loop(c: Collector) -> None:
    """Store the heartbeats received, and alert the agents gone silent."""
    silent_after = c.cfg.collector.agent_silent_after_ms
    every = min(HEALTH_EVERY_S, silent_after / 4000.0)
    while True:
        await asyncio.sleep(every)
        try:
            await c.store_heartbeats()
            now = c.clock.now_ms()
            if now - c.started_ms >= silent_after:
                agents = await c.read(c.store.list_agents)
                await c.raise_health(health.silent(agents, now, c.started_ms, silent_after))
        except StoreError as e:
            c.error_log.log(log, logging.ERROR, "health", "event=health_check_failed error=%r", str(e))


async def watchdog_loop(c: Collector) -> None:
    """WATCHDOG=1 while the event loop runs (a no-op without systemd's watchdog)."""
    watchdog = Watchdog(c.clock)
    if watchdog.interval_s is None:
        return
    while True:
        watchdog.kick()
        await asyncio.sleep(watchdog.interval_s)


def ssl_context(cfg: Config) -> Optional[ssl.SSLContext]:
    cc = cfg.collector
    if not cc.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cc.tls_cert, cc.tls_key or None)
    if cc.tls_client_ca:
        ctx.load_verify_locations(cc.tls_client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


NOFILE_SPARE = 256  # descriptors besides connections: the database, outputs, the decoder's pipes


def limits_of(cfg: Config) -> Limits:
    cc = cfg.collector
    return Limits(cc.max_connections, cc.max_connections_per_peer, cc.header_timeout_ms / 1000.0)


def raise_nofile(want: int) -> None:
    """Raise the soft descriptor limit towards ``want`` (never past the hard
    limit, never down): 1024, the usual soft default, is a few hundred
    slow clients. Logged when the hard limit is lower than the caps need."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < want:
        log.warning(
            "event=nofile_low hard_limit=%d needed=%d (lower max_connections or raise LimitNOFILE)",
            hard,
            want,
        )


def _host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _runner(app: web.Application, cfg: Config) -> web.AppRunner:
    # auto_decompress off: gzip is decompressed by us, with an output cap.
    # shutdown_timeout is the runner's since aiohttp 3.9 (3.8: the site's, and we have none).
    on_runner = "shutdown_timeout" in inspect.signature(web.BaseRunner.__init__).parameters
    runner_kw: dict[str, Any] = {"shutdown_timeout": 5.0} if on_runner else {}
    keepalive = cfg.collector.idle_timeout_ms / 1000.0
    return web.AppRunner(
        app, access_log=None, auto_decompress=False, keepalive_timeout=keepalive, **runner_kw
    )


async def _listen(cfg: Config, guard: ConnectionGuard, ctx: Optional[ssl.SSLContext]) -> asyncio.Server:
    """Our own listener rather than web.TCPSite: every connection passes the guard."""
    raise_nofile(cfg.collector.max_connections + NOFILE_SPARE)
    host, port = _host_port(cfg.collector.listen)
    loop = asyncio.get_running_loop()
    return await loop.create_server(guard, host or None, port, ssl=ctx, backlog=512, reuse_address=True)


def _loops(c: Collector, guard: ConnectionGuard) -> list[Any]:
    """What runs beside the HTTP server until SIGTERM."""
    rules = [schedule_loop(c), fleet_rules_loop(c)]
    return [*rules, prune_loop(c), health_loop(c), watchdog_loop(c), guard.run()]


async def _serve(cfg: Config, secret: str) -> int:
    store = open_store(cfg.collector.db)
    try:
        outputs = build_outputs(cfg)
        ctx = ssl_context(cfg)
    except (OSError, ssl.SSLError) as e:
        store.close()
        log.error("event=startup_failed error=%r", str(e))
        return 1
    app = make_app(cfg, store, secret, SystemClock(), outputs)
    c: Collector = app[COLLECTOR]
    if (os.cpu_count() or 1) > 1:
        try:
            c.start_decoder()
        except OSError as e:
            log.warning("event=decoder_unavailable error=%r", str(e))
    runner = _runner(app, cfg)
    await runner.setup()
    server = runner.server
    if server is None:  # setup() sets it
        raise RuntimeError("aiohttp runner has no server after setup")
    guard = ConnectionGuard(server, limits_of(cfg), c.error_log)
    c.guard = guard
    loop = asyncio.get_running_loop()
    try:
        listener = await _listen(cfg, guard, ctx)
    except OSError as e:
        log.error("event=listen_failed address=%r error=%r", cfg.collector.listen, str(e))
        await runner.cleanup()
        store.close()
        return 1
    _log_start(cfg, ctx is not None)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(t) for t in _loops(c, guard)]
    notify("READY=1")  # Type=notify: listening
    try:
        await stop.wait()
        log.info("event=stopping")
        notify("STOPPING=1")
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        listener.close()
        await server.shutdown(5.0)  # open connections; aiohttp 3.8's cleanup leaves them to a site
        with contextlib.suppress(StoreError):
            await c.store_heartbeats()
        await runner.cleanup()
        store.close()
    log.info("event=stopped")
    return 0


def serve(cfg: Config, secret: str) -> int:
    """Serve until SIGTERM or SIGINT; 0 after a clean shutdown, 1 if it cannot start.

    Raises StoreError when the database cannot be opened (e.g. a newer schema).
    """
    return asyncio.run(_serve(cfg, secret))
