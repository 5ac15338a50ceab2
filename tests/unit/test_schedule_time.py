"""Time attacks on the collector (issue 16's time item): the hourly run for
T waits a grace period, so an event that arrives seconds after T is still
evaluated at T; a restarted collector runs every T it missed inside the
retention; a batch from a skewed clock is a clock_skew gap, and event times
far in the future are not kept."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.collector import service
from agent.collector.server import COLLECTOR, Collector, make_app
from agent.collector.storage.sqlite import CollectorStore
from agent.shared import wire
from agent.shared.clock import FakeClock
from agent.shared.config.schema import CollectorConfig, Config
from agent.shared.rule import Rule

H = 3_600_000
T = 497_223 * H  # an hour boundary in 2026
EXE = b"/usr/sbin/php-fpm8.2"


def collector(tmp_path: Path, start_ms: int) -> tuple[Collector, FakeClock, list[dict[str, Any]]]:
    store = CollectorStore(str(tmp_path / "c.db"))
    clock = FakeClock(start_ms)
    cfg = Config(collector=CollectorConfig(db=str(tmp_path / "c.db")))
    c: Collector = make_app(cfg, store, "s" * 32, clock)[COLLECTOR]
    sent: list[dict[str, Any]] = []

    class Capture:
        name = "capture"

        def emit(self, alerts: Any) -> None:
            sent.extend(alerts)

        def close(self) -> None:
            pass

    c.outputs = [Capture()]  # type: ignore[list-item]
    store.enroll("a", "web-01", "k", start_ms)
    return c, clock, sent


def ingest(c: Collector, ts: int, path: bytes) -> None:
    agent = c.store.agent_for_key("k")
    assert agent is not None
    batch = wire.Batch(
        os.urandom(16).hex(),
        "e" * 32,
        int(ts),
        "a",
        "web-01",
        ts,
        (wire.EventRecord(ts, "creation", EXE, path, {}),),
    )
    assert c.store.ingest(agent, batch, ts) == "stored"


def run_loop(c: Collector, clock: FakeClock, until_ms: int, on_time: Callable[[int], None]) -> None:
    """schedule_loop with the fake clock: each sleep moves it (calling
    ``on_time`` with the new time), and the loop stops past ``until_ms``."""

    async def fake_sleep(seconds: float) -> None:
        clock.advance(max(seconds, 0.0))
        on_time(clock.now_ms())
        if clock.now_ms() > until_ms:
            raise asyncio.CancelledError

    async def main() -> None:
        real = asyncio.sleep
        asyncio.sleep = fake_sleep  # type: ignore[assignment]
        try:
            await service.schedule_loop(c)
        except asyncio.CancelledError:
            pass
        finally:
            asyncio.sleep = real  # type: ignore[assignment]

    asyncio.run(main())


def test_an_event_arriving_seconds_after_t_is_evaluated_at_t(tmp_path: Path) -> None:
    c, clock, sent = collector(tmp_path, T - 10_000)
    late = {"done": False}

    def arrive(now: int) -> None:  # the event of T - 1 ms reaches the collector at T + 20 s
        if now >= T + 20_000 and not late["done"]:
            ingest(c, T - 1, b"/var/www/html/hh5959.php")
            late["done"] = True

    run_loop(c, clock, T + H + 120_000, arrive)
    assert late["done"]
    assert [d["file"]["path"] for d in sent] == ["/var/www/html/hh5959.php"]
    assert sent[0]["rarewrite"]["window"]["end"] == "2026-09-21T15:00:00.000Z"


def test_a_restarted_collector_runs_the_hours_it_missed(tmp_path: Path) -> None:
    c, clock, sent = collector(tmp_path, T - 20 * 60_000)
    ingest(c, T - 10 * 60_000, b"/var/www/html/while-down.php")
    clock.advance(2 * 3600 + 5 * 60)  # down from T - 20 min to T + 2 h 5 min: runs T, T+H were missed
    run_loop(c, clock, clock.now_ms(), lambda now: None)  # only the catch-up runs
    assert [d["file"]["path"] for d in sent] == ["/var/www/html/while-down.php"]


def test_missed_runs_stay_inside_the_retention() -> None:
    rule = Rule()
    got = service.missed_runs(rule, T + 30_000, 60_000, 4 * H)
    # T is not due yet (grace); T - 3 H's window reaches back past the retention: no longer exact
    assert got == [T - 2 * H, T - H]
    assert service.missed_runs(rule, T + 60_000, 60_000, 4 * H)[-1] == T


@pytest.mark.parametrize(("skew", "gap"), [(0, False), (-2 * H, True), (2 * H, True)])
def test_a_skewed_clock_is_a_gap_and_the_far_future_is_not_kept(tmp_path: Path, skew: int, gap: bool) -> None:
    from agent.collector import batch_time

    now = T
    events = (
        wire.EventRecord(now + skew - 5, "creation", EXE, b"/a", {}),
        wire.EventRecord(now + 3 * H, "creation", EXE, b"/future", {}),  # 3 h ahead of the collector
    )
    b = wire.rows_of(wire.Batch("a" * 32, "e" * 32, 1, "a", "h", now + skew, events))
    checked, dropped, skewed = batch_time.checked(b, now, 4 * H)
    paths = [e[3] for e in checked.events]
    ahead = skew > batch_time.FUTURE_MS  # an agent 2 h ahead stamps even /a in the future
    assert paths == ([] if ahead else [b"/a"]) and dropped == (2 if ahead else 1) and skewed is gap
    reasons = [(g.reason, g.lost) for g in checked.gaps]
    assert ("clock_skew", dropped) in reasons
    assert (("clock_skew", 0) in reasons) is gap
    store = CollectorStore(str(tmp_path / "c.db"))
    store.enroll("a", "h", "k", now)
    agent = store.agent_for_key("k")
    assert agent is not None and store.ingest(agent, checked, now) == "stored"
    assert {g.reason for g in store.gaps_overlapping(0, now + 10 * H)} == {"clock_skew"}
    store.close()
