"""``rarewrite agent replay``: a recorded file through the agent's pipeline,
done once the collector has acknowledged everything."""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Optional

from agent.sensor.outbox import AgentStore
from agent.sensor.sources.recorded import BadLine, read_ndjson
from agent.sensor.state_dir import StateDir
from agent.sensor.wiring import build_shipper
from agent.shared.clock import Clock, SystemClock
from agent.shared.config.schema import Config
from agent.shared.errors import RarewriteError
from agent.shared.events import FileEvent
from agent.shared.rules import RuleSet

log = logging.getLogger("rarewrite.agent")


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:32]


def run_replay(cfg: Config, events_path: str, secret: str, clock: Optional[Clock] = None) -> int:
    """Replay a recorded file; exit 0 once everything is acknowledged."""
    clock = clock or SystemClock()
    state = StateDir(cfg.agent.state_dir)
    state.lock()
    ident = state.identity(cfg.agent.agent_id, cfg.agent.host_name)
    store = AgentStore(state.store_path, cfg.rule, clock, cfg.agent.outbox_max_records)
    rules = RuleSet(cfg.rule, cfg.rules)
    store.set_rules(rules.ids)
    # no host_id: recorded events are another host's (the collector uses the agent id)
    shipper = build_shipper(cfg, state, store, ident, secret, clock)
    if not os.path.exists(events_path):
        raise RarewriteError(f"{events_path}: no such file")
    # A rerun of the same file (after a failure) resumes where the store
    # says it stopped, so no event is recorded twice.
    progress_key = "replay:" + _file_digest(events_path)
    done = store.progress(progress_key)
    read = matched = bad = 0
    chunk: list[FileEvent] = []
    masks: list[int] = []
    line = 0
    for line, item in enumerate(read_ndjson(events_path), 1):
        if line <= done:
            continue
        if isinstance(item, BadLine):
            bad += 1
            log.warning("event=bad_line file=%r line=%d reason=%r", events_path, item.line, item.reason)
        else:
            read += 1
            mask = rules.mask(item)
            if mask:
                chunk.append(item)
                masks.append(mask)
        if len(chunk) >= 2000:
            store.record(chunk, (progress_key, line), masks)
            matched += len(chunk)
            chunk, masks = [], []
    if line > done:
        store.record(chunk, (progress_key, line), masks)
        matched += len(chunk)
    log.info("event=replay_read file=%r read=%d matched=%d bad_lines=%d", events_path, read, matched, bad)
    deadline = clock.monotonic() + max(5.0, cfg.agent.request_timeout_ms / 1000 * 4)
    while True:
        if shipper.drain(deadline):
            log.info("event=replay_done acknowledged=%d", shipper.counters["records_sent"])
            return 0
        if clock.monotonic() >= deadline:
            raise RarewriteError(
                f"collector did not acknowledge everything in time ({store.depth()} records left in "
                f"{state.store_path}; run replay again to resume): {shipper.last_error}"
            )
