"""The detail decision made in memory (batched record) equals the per-event
definition: detail while the pair has fewer than count_below events in the
agent's hour ending at the event, including out-of-order times, pairs the
LRU dropped, pruning, and batches split at any point."""

from __future__ import annotations

import random
from pathlib import Path

import msgpack
import pytest

from agent.sensor import outbox as store_mod
from agent.sensor.outbox import EVENT, AgentStore
from agent.shared.clock import FakeClock
from agent.shared.events import FileEvent, ProcessInfo, UserInfo
from agent.shared.rule import Rule

T0 = 1_700_000_000_000
WINDOW = 60_000


def _ev(path: bytes, ts: int) -> FileEvent:
    return FileEvent(
        ts_ms=ts, action="creation", path=path, process=ProcessInfo(pid=1, name="nginx", executable=b"/nginx"),
        user=UserInfo(id="33", name="www-data"),
    )  # fmt: skip


def _oracle(events: list[FileEvent], below: int) -> list[bool]:
    """Per event, in order: the original insert-then-count definition."""
    seen: dict[bytes, list[int]] = {}
    out = []
    for e in events:
        assert e.path is not None
        times = seen.setdefault(e.path, [])
        times.append(e.ts_ms)
        n = sum(1 for t in times if e.ts_ms - WINDOW < t <= e.ts_ms)
        out.append(n < below)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_batched_detail_decision_is_exact(tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    monkeypatch.setattr(store_mod, "RECENT_PAIRS", rng.choice([1, 3, 4096]))
    rule = Rule(window_ms=WINDOW, count_below=rng.choice([1, 2, 5]))
    st = AgentStore(str(tmp_path / "a.db"), rule, FakeClock(T0))
    ts = T0
    events = []
    for _ in range(1500):
        ts += rng.choice([0, 1, 50, 5_000, 30_000])
        jitter = -rng.randint(0, 90_000) if rng.random() < 0.1 else 0  # some out of time order
        events.append(_ev(b"/w/%d" % rng.randint(0, 12), ts + jitter))
    i = 0
    while i < len(events):
        n = rng.choice([1, 7, 100, 400])
        st.record(events[i : i + n])
        i += n
    rows = st._db().execute("SELECT kind FROM outbox WHERE kind IN (0, 1) ORDER BY id").fetchall()
    assert [k == EVENT for (k,) in rows] == _oracle(events, rule.count_below)
    assert st.counters["stored"] == len(events)
    bodies = st._db().execute("SELECT body FROM outbox WHERE kind=0 ORDER BY id").fetchall()
    assert all(msgpack.unpackb(b, raw=False)["path"] for (b,) in bodies)


def _oracle_with_prunes(steps: list[list[FileEvent] | str], below: int) -> list[bool]:
    """The same, with the prune's horizon: a prune (or a reopen) moves it to
    the newest time recorded minus the window, and no time at or before it
    counts any more."""
    seen: dict[bytes, list[int]] = {}
    horizon, newest = -(1 << 62), None
    out = []
    for step in steps:
        if isinstance(step, str):
            if newest is not None:
                horizon = max(horizon, newest - WINDOW)
            continue
        for e in step:
            assert e.path is not None
            times = seen.setdefault(e.path, [])
            times.append(e.ts_ms)
            newest = e.ts_ms if newest is None else max(newest, e.ts_ms)
            lo = max(e.ts_ms - WINDOW, horizon)
            n = sum(1 for t in times if lo < t <= e.ts_ms)
            out.append(n < below)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_detail_decision_is_exact_across_prunes_and_reopens(
    tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(seed)
    monkeypatch.setattr(store_mod, "RECENT_PAIRS", rng.choice([1, 3, 4096]))
    rule = Rule(window_ms=WINDOW, count_below=rng.choice([1, 2, 5]))
    path = str(tmp_path / "a.db")
    st = AgentStore(path, rule, FakeClock(T0))
    ts = T0
    steps: list[list[FileEvent] | str] = []
    for _ in range(300):
        batch = []
        for _ in range(rng.choice([1, 7, 30])):
            ts += rng.choice([0, 1, 50, 2_000, 20_000])
            jitter = -rng.randint(0, 90_000) if rng.random() < 0.05 else 0
            batch.append(_ev(b"/w/%d" % rng.randint(0, 12), ts + jitter))
        steps.append(batch)
        st.record(batch)
        if rng.random() < 0.15:
            steps.append("prune")
            st.maintain()
        elif rng.random() < 0.03:
            steps.append("reopen")
            st.close()
            st = AgentStore(path, rule, FakeClock(T0))
    rows = st._db().execute("SELECT kind FROM outbox WHERE kind IN (0, 1) ORDER BY id").fetchall()
    assert [k == EVENT for (k,) in rows] == _oracle_with_prunes(steps, rule.count_below)
    recorded = sum(len(step) for step in steps if not isinstance(step, str))
    assert st._db().execute("SELECT count(*) FROM win").fetchone()[0] < recorded / 2  # it pruned
