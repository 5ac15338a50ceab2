"""The agent: wiring of source, resolver, rule, store and shipper; signals;
status.

Two entry points: :func:`run_live` (``rarewrite agent run``) watches the
host until SIGTERM; :func:`run_replay` (``rarewrite agent replay``) feeds a
recorded file through the same pipeline and returns once the collector has
acknowledged everything.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sqlite3
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Optional

from agent import __version__
from agent.sensor.containers import Containers
from agent.sensor.enrich.context import build_enricher
from agent.sensor.enrich.packages import PackageIndex
from agent.sensor.facts import FactsReader
from agent.sensor.memory import rss_mb, trim_memory, tune_malloc
from agent.sensor.outbox import AgentStore, Candidate
from agent.sensor.prefilter import Prefilter
from agent.sensor.quarantine import Quarantine
from agent.sensor.resolver import Resolver, in_child_pid_namespace
from agent.sensor.shipper import Shipper
from agent.sensor.sources.auto import open_source
from agent.sensor.sources.base import EventSource, Prefiltering, ReadingAhead
from agent.sensor.state_dir import StateDir, machine_id
from agent.sensor.wiring import build_shipper
from agent.shared.clock import Clock, SystemClock
from agent.shared.config.schema import Config
from agent.shared.errors import ConfigError, EnrollError, RarewriteError, StoreError
from agent.shared.events import OVERFLOW, FileEvent, RawEvent
from agent.shared.rules import RuleSet
from agent.shared.systemd import Watchdog, notify

log = logging.getLogger("rarewrite.agent")
FACTS_AT_EXIT = 1 << 30
BUSY_EVENTS = 2000  # a read() this large means a burst: the shipper waits until it is over
FACTS_PER_LOOP = 4000  # more than a read slice holds, so a stored burst's facts keep up with it
DRAIN_AT_STOP_S = 10.0  # at most this long storing read-ahead events at a stop
DETAILED_PAIRS = 20_000  # pairs remembered for quarantine (an alert comes within the hour)
IDLE_RELEASE_S = 2.0  # this long without events after a burst, and all shipped: memory is handed back


def _quarantine_rules(cfg: Config) -> list[str]:
    return [r.rule_id for r in (cfg.rule, *cfg.rules) if r.enabled and r.quarantine]


class LiveAgent:
    """``rarewrite agent run``: the sensor loop in the main thread, the
    shipper in a second one."""

    def __init__(
        self,
        cfg: Config,
        secret: str,
        clock: Optional[Clock] = None,
        loader: Optional[Callable[[], Config]] = None,
    ) -> None:
        self.cfg = cfg
        self.loader = loader
        self.secret = secret
        self.clock = clock or SystemClock()
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.busy = threading.Event()  # set while the reader is in a burst
        self.counters = {"seen": 0, "matched": 0, "overflows": 0, "lost": 0, "unknown": 0, "errors": 0}
        self.started_ms = self.clock.now_ms()
        self._seen_unresolved = 0
        self._seen_refused: set[str] = set()
        self._seen_outside = 0
        self._coverage_ms = self.started_ms
        self._actions: deque[dict[str, Any]] = deque()  # from the collector's answers, for _respond
        # (exe, path) -> host path of the pairs detailed in this run (for quarantine)
        self._detailed: OrderedDict[tuple[Optional[bytes], Optional[bytes]], bytes] = OrderedDict()
        # late-bound on purpose: a SIGHUP reload swaps self.rules
        self.containers = Containers()
        self.resolver = Resolver(
            self.clock,
            is_web_process=lambda name: self.rules.process_matches(name),  # noqa: PLW0108
            containers=self.containers,
        )
        self.prefilter = Prefilter(lambda: self.rules, self.resolver)

    def run(self) -> int:
        tune_malloc()  # before any thread starts
        self._start()
        fatal: list[BaseException] = []
        ship_thread = threading.Thread(
            target=self._ship, args=(self.shipper, fatal), name="shipper", daemon=True
        )
        ship_thread.start()
        try:
            self._loop(fatal)
        finally:
            self._finish(ship_thread)
        if fatal:  # the shipper may stop the loop between its fatal check and the loop test
            raise fatal[0]
        return 0

    def _start(self) -> None:
        """Lock the state dir, open the store and the source, say so."""
        cfg = self.cfg
        state = StateDir(cfg.agent.state_dir)
        state.lock()
        ident = state.identity(cfg.agent.agent_id, cfg.agent.host_name)
        self.state, self.ident = state, ident
        self.enricher = build_enricher(cfg.enrich, self.clock)
        self.store = AgentStore(
            state.store_path, cfg.rule, self.clock, cfg.agent.outbox_max_records,
            facts=FactsReader(self.clock, cfg.agent.hash_max_bytes) if cfg.agent.file_facts else None,
            # the context also tells quarantine which files this run saw, at which host path
            context=self._context if self.enricher is not None or _quarantine_rules(cfg) else None,
        )  # fmt: skip
        self.rules = RuleSet(cfg.rule, cfg.rules)
        self.store.set_rules(self.rules.ids)
        self.store.host_id = machine_id()
        self.shipper = build_shipper(cfg, state, self.store, ident, self.secret, self.clock)
        self.shipper.health = self._health
        self.quarantine = self._quarantine(cfg)
        if self.quarantine is not None:
            self.shipper.on_actions = self._actions.extend  # deque.extend: safe from the shipper thread
        self.shipper.heartbeat_s = cfg.agent.heartbeat_interval_ms / 1000
        self._install_signals()
        if in_child_pid_namespace():
            log.warning(
                "event=child_pid_namespace: fanotify gives no pid for writers outside this namespace; "
                "their events are kept with the file owner as user and no process (run the agent in "
                "the host's pid namespace)"
            )
        state.write_status(self._status("starting", None))
        self.source = self._open_source(open_source)
        log.info(
            "event=started version=%s backend=%s agent_id=%s host_name=%r watch=%s",
            __version__,
            self.source.name,
            ident.agent_id,
            ident.host_name,
            list(cfg.agent.watch),
        )
        notify("READY=1")  # Type=notify: the marks are placed, the agent watches

    def _loop(self, fatal: list[BaseException]) -> None:
        """Read, resolve, store until told to stop; once a second the status,
        the coverage gaps and, after a burst, the memory release."""
        store, resolver = self.store, self.resolver
        last_status = busy_until = last_event_s = 0.0
        released = True
        watchdog = Watchdog(self.clock)
        while not self.stop.is_set():
            watchdog.kick()  # this loop is what the watchdog vouches for
            raws = self._read(self.source, 0.25)
            if len(raws) >= BUSY_EVENTS:
                busy_until = self.clock.monotonic() + 0.5
                self.busy.set()  # the shipper waits: the GIL is the reader's in a burst
            elif self.busy.is_set() and self.clock.monotonic() >= busy_until:
                self.busy.clear()
            if raws:
                last_event_s = self.clock.monotonic()
                released = False
            self._handle(raws, store, resolver)
            store.fill_facts(limit=FACTS_PER_LOOP)
            if fatal:
                raise fatal[0]
            now_s = self.clock.monotonic()
            if now_s - last_status >= 1.0:
                last_status = now_s
                if not released and now_s - last_event_s >= IDLE_RELEASE_S and store.depth() == 0:
                    released = True
                    self._release_memory(store)
                if self.enricher is not None:
                    store.add_notes(self.enricher.poll())
                self._respond(store)
                stats = self.source.stats()  # read once a second, used twice
                self._report_coverage(stats, store)
                self.state.write_status(self._status("running", self.source, stats))
            if self.reload.is_set():
                self.reload.clear()
                self.source = self._reload(self.source, open_source)

    def _context(self, cand: Candidate) -> Optional[dict[str, Any]]:
        """The enricher's answer. Each detailed pair is remembered with its
        host path: quarantine moves only a file this run saw, where the host
        has it (never a container's file by the host's file of that name)."""
        if self.quarantine is not None:  # only quarantine asks; without it nothing is kept
            self._detailed[(cand.executable or None, cand.path)] = cand.host_path
            self._detailed.move_to_end((cand.executable or None, cand.path))
            while len(self._detailed) > DETAILED_PAIRS:
                self._detailed.popitem(last=False)
        return self.enricher(cand) if self.enricher is not None else None

    def _seen_here(self, exe: Optional[bytes], path: Optional[bytes]) -> bool:
        """A pair this run detailed, at the host's own path, still in the window."""
        return self._detailed.get((exe or None, path)) == path and self.store.reported(exe, path)

    def _quarantine(self, cfg: Config) -> Optional[Quarantine]:
        """The response, when a rule of this agent's config says quarantine = yes."""
        rules = _quarantine_rules(cfg)
        if not rules:
            return None
        packages = self.enricher.packages if self.enricher is not None else None
        packages = packages if packages is not None else PackageIndex()
        return Quarantine(
            cfg.enrich.quarantine_dir, rules, self._seen_here,
            package_owner=packages.owner if packages.available() else None,
            stub=cfg.enrich.quarantine_stub, now_ms=self.clock.now_ms,
            in_container=lambda exe, path: self._detailed.get((exe or None, path), path) != path,
        )  # fmt: skip

    def _respond(self, store: AgentStore) -> None:
        """Carry out the actions the collector asked for (the sensor loop's thread)."""
        notes = []
        while self._actions and self.quarantine is not None:
            action = self._actions.popleft()
            try:
                note = self.quarantine.act(action)
            except Exception as e:  # noqa: BLE001 - an answer we cannot act on must not stop the sensor
                log.error("event=action_failed error=%r", repr(e)[:300])
                continue
            if note is not None:
                notes.append(note)
        store.add_notes(notes)

    def _finish(self, ship_thread: threading.Thread) -> None:
        """A stop: store what the source read ahead, then ship what is left
        (a bounded wait)."""
        self.stop.set()
        notify("STOPPING=1")
        store, source = self.store, self.source
        self.state.write_status(self._status("stopping", source))
        self._drain(source, store, self.resolver)
        source.close()
        ship_thread.join(timeout=2)
        try:
            store.fill_facts(now_ms=1 << 62, limit=FACTS_AT_EXIT)  # nothing waits for facts at exit
            flushed = self.shipper.drain(self.clock.monotonic() + 5.0)
        except RarewriteError:
            flushed = False
        self.state.write_status(self._status("stopped", None))
        log.info("event=stopped flushed=%s outbox_depth=%d", flushed, store.depth())

    def _read(self, source: EventSource, timeout: float) -> Sequence[RawEvent]:
        """One read of the source; the events its prefilter dropped count as seen."""
        raws = source.read(timeout)
        if isinstance(source, Prefiltering):
            self.counters["seen"] += source.take_prefiltered()
        return raws

    def _overflow(self, raw: RawEvent, store: AgentStore) -> None:
        """A lost stretch: the kernel's queue overflowed, or (with a path) a
        directory was muted for flooding (its ts: when the mute began)."""
        self.counters["overflows"] += 1
        self.counters["lost"] += raw.lost
        now = self.clock.now_ms()
        if raw.path is None:
            store.record_gap(now, now, raw.lost, "overflow")
            log.warning("event=queue_overflow overflows_total=%d", self.counters["overflows"])
        else:
            store.record_gap(min(raw.ts_ms, now), now, raw.lost, "flood")

    def _handle(self, raws: Sequence[RawEvent], store: AgentStore, resolver: Resolver) -> None:
        """Resolve one slice of raw events and store the matching ones."""
        rules = self.rules
        batch: list[FileEvent] = []
        masks: list[int] = []
        for raw in raws:
            if raw.kind == OVERFLOW:
                self._overflow(raw, store)
                continue
            try:
                ev = resolver.resolve(raw)
            except Exception as e:  # noqa: BLE001 - one bad event must not stop the sensor
                self.counters["errors"] += 1
                log.error("event=resolve_failed error=%r", str(e))
                continue
            if ev is None:
                continue
            self.counters["seen"] += 1
            mask = rules.mask(ev)
            if mask:
                batch.append(ev)
                masks.append(mask)
        if batch:
            if store.record(batch, masks=masks) and self.enricher is not None:
                self.enricher.arm()  # a detailed event: its request is logged after it
            self.counters["matched"] += len(batch)

    def _drain(self, source: EventSource, store: AgentStore, resolver: Resolver) -> None:
        """At a stop, store what the source has read ahead but not handed on
        (a burst waits there for up to DEFER_MAX_S): a clean stop loses none
        of it. What the kernel still queues goes with the group, as ever."""
        if not isinstance(source, ReadingAhead):
            return
        try:
            source.stop_reading()
            deadline = self.clock.monotonic() + DRAIN_AT_STOP_S
            while self.clock.monotonic() < deadline:
                raws = self._read(source, 0)
                if not raws:
                    break
                self._handle(raws, store, resolver)
        except (RarewriteError, OSError, sqlite3.Error) as e:
            log.error("event=drain_at_stop_failed error=%r", str(e))

    def _release_memory(self, store: AgentStore) -> None:
        """The burst is over and shipped: drop caches that only speed a burst
        up, collect cycles and give freed heap back, so that RSS returns
        close to where it was before."""
        store.release_memory()
        gc.collect()
        trim_memory()
        log.info("event=memory_released rss_mb=%.1f", rss_mb())

    def _report_coverage(self, stats: dict[str, Any], store: AgentStore) -> None:
        """Events the source could not place (a directory handle that no
        longer resolves) and filesystems it could not mark are gaps: the
        collector must not take this host's silence for rarity."""
        now = self.clock.now_ms()
        unresolved = int(stats.get("unresolved", 0))
        if unresolved > self._seen_unresolved:
            store.record_gap(self._coverage_ms, now, unresolved - self._seen_unresolved, "unresolved_handle")
            self._seen_unresolved = unresolved
        outside = self.resolver.counters["outside_pid_namespace"]
        if outside > self._seen_outside:  # kept, but whose they are cannot be judged
            store.record_gap(self._coverage_ms, now, 0, "outside_pid_namespace")
            self._seen_outside = outside
        refused = {str(r["path"]) for r in stats.get("refused", [])}
        for path in sorted(refused - self._seen_refused):
            log.warning("event=filesystem_not_watched path=%r", path)
            store.record_gap(now, now, 0, "unmarked_filesystem")
        self._seen_refused |= refused
        self._coverage_ms = now

    def _open_source(self, opener: Callable[..., EventSource]) -> EventSource:
        a = self.cfg.agent
        source = opener(
            a.backend,
            [os.fsencode(p) for p in a.watch],
            [os.fsencode(p) for p in a.exclude],
            [os.fsencode(self.state.path)],
            os.getpid(),
            self.clock,
            a.flood_mute_rate,
            containers=self.containers,
        )
        if isinstance(source, Prefiltering):
            source.set_prefilter(self.prefilter)
        return source

    def _reload(self, source: EventSource, opener: Callable[..., EventSource]) -> EventSource:
        """SIGHUP: read the config again. A bad config changes nothing (every
        problem is logged); a good one swaps the rule at once and re-opens the
        source when the watch scope or backend changed."""
        if self.loader is None:
            log.warning("event=reload_ignored reason='no config loader'")
            return source
        try:
            new = self.loader()
        except ConfigError as e:
            for problem in e.problems:
                log.error("event=reload_rejected problem=%r", problem)
            log.error(
                "event=reload_rejected problems=%d note='still running the old config'", len(e.problems)
            )
            return source
        old, self.cfg = self.cfg, new
        self.store.rule = new.rule
        self.rules = RuleSet(new.rule, new.rules)
        self.store.set_rules(self.rules.ids)
        if isinstance(source, Prefiltering):
            source.set_prefilter(self.prefilter)  # its cached answers are of the old rule
        scope = ("backend", "watch", "exclude")
        if any(getattr(old.agent, k) != getattr(new.agent, k) for k in scope):
            try:
                fresh = self._open_source(opener)
            except RarewriteError as e:
                log.error("event=reload_source_failed error=%r note='keeping the old source'", str(e))
                self.cfg = replace(new, agent=replace(new.agent, **{k: getattr(old.agent, k) for k in scope}))
                return source
            source.close()
            source = fresh
            self._seen_unresolved = 0  # a new source counts from zero
        log.info(
            "event=reloaded files=%s watch=%s backend=%s", list(new.files), list(new.agent.watch), source.name
        )
        return source

    def _ship(self, shipper: Shipper, fatal: list[BaseException]) -> None:
        try:
            shipper.run(self.stop, self.cfg.agent.ship_interval_ms / 1000, busy=self.busy)
        except EnrollError as e:
            fatal.append(e)
            self.stop.set()

    def _install_signals(self) -> None:
        def on_term(signum: int, frame: Any) -> None:
            self.stop.set()

        def on_hup(signum: int, frame: Any) -> None:
            self.reload.set()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGHUP, on_hup)

    def _counters(self) -> dict[str, int]:
        """The agent's counters, the store's and the shipper's: for status and heartbeats."""
        st = dict(self.store.counters)
        return {
            **self.counters,
            "dropped": st["dropped"] + st["not_stored"],
            "stored": st["stored"],
            "detailed": st["detailed"],
            "quarantined": st["quarantined"],
            **{f"ship_{k}": v for k, v in self.shipper.counters.items()},
            **{f"writer_{k}": v for k, v in self.resolver.counters.items()},
            **({f"enrich_{k}": v for k, v in self.enricher.status().items()} if self.enricher else {}),
        }

    def _health(self) -> dict[str, Any]:
        """What a heartbeat reports: the counters, and "degraded" once anything was lost."""
        counters = self._counters()
        with contextlib.suppress(Exception):  # the depth is a nicety: never fail a heartbeat for it
            counters["outbox_depth"] = max(0, self.store.depth())
        lost = counters["overflows"] or counters["dropped"] or counters["errors"]
        return {"status": "degraded" if lost else "ok", "version": __version__, "counters": counters}

    def _status(
        self, state: str, source: Optional[EventSource], stats: Optional[dict[str, Any]] = None
    ) -> dict[str, Any]:
        src = stats if stats is not None else source.stats() if source is not None else {}
        try:
            depth = self.store.depth()
        except (StoreError, OSError, Exception):  # noqa: BLE001 - status must always be written
            depth = -1
        sh = self.shipper
        return {
            "state": state,
            "pid": os.getpid(),
            "version": __version__,
            "agent_id": self.ident.agent_id,
            "host_name": self.ident.host_name,
            "backend": source.name if source is not None else None,
            "watch": list(self.cfg.agent.watch),
            "exclude": list(self.cfg.agent.exclude),
            "marked": src.get("marked", []),
            "refused": src.get("refused", []),
            "source": {k: v for k, v in src.items() if k not in ("marked", "refused")},
            "counters": self._counters(),
            "outbox_depth": depth,
            "last_shipment_ms": sh.last_success_ms,
            "collector_reachable": sh.reachable,
            "last_error": sh.last_error,
            "started_ms": self.started_ms,
            "updated_ms": self.clock.now_ms(),
        }


def run_live(cfg: Config, secret: str, loader: Optional[Callable[[], Config]] = None) -> int:
    return LiveAgent(cfg, secret, loader=loader).run()
