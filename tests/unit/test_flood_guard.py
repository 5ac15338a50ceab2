"""Flood muting's bookkeeping, without the kernel (bench/flood.py and its
smoke test in test_bench_smoke.py run the real thing under cgroup limits)."""

from __future__ import annotations

from agent.sensor.sources.fanotify.flood import FloodGuard, Muted

T = 1_790_000_000_000


def test_a_directory_over_the_rate_in_one_second_of_arrival_is_muted_until_it_runs_out() -> None:
    g = FloodGuard(rate=100, mute_s=30.0)
    for i in range(150):
        g.count(b"flood", T + i)  # 150 events read within one second
    for i in range(99):
        g.count(b"busy but fine", T + i)
    hot, done = g.due(1000.0)
    assert hot == [b"flood"] and done == []
    g.muted[b"flood"] = Muted(b"/srv/www/uploads", 1030.0, T, 0, 0)
    for i in range(500):
        g.count(b"flood", T + 1000 + i)  # counted while muted: never muted twice
    assert g.due(1001.0) == ([], [])
    hot, done = g.due(1030.0)
    assert hot == [] and [k for k, _ in done] == [b"flood"] and not g.muted


def test_the_rate_is_of_arrival_not_of_processing() -> None:
    """An agent under its quota may take a minute to process a second of
    events: what counts is when they were read from the kernel."""
    g = FloodGuard(rate=100)
    for s in range(3):  # 60 events a second for 3 seconds: no flood, however slowly processed
        for i in range(60):
            g.count(b"d", T + s * 1000 + i)
    assert g.due(5000.0) == ([], [])
    assert FloodGuard(rate=0).due(5000.0) == ([], [])  # 0: muting off


def test_nothing_is_muted_while_the_agent_keeps_up() -> None:
    g = FloodGuard(rate=100)
    for i in range(1000):
        g.count(b"burst", T + i)
    assert g.due(1001.0, behind=False) == ([], [])  # a burst the agent absorbs is no flood
    for i in range(1000):
        g.count(b"burst", T + 1000 + i)
    assert g.due(1002.0, behind=True)[0] == [b"burst"]
