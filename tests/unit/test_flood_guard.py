"""Flood muting's bookkeeping, without the kernel (bench/flood.py and its
smoke test in test_bench_smoke.py run the real thing under cgroup limits)."""

from __future__ import annotations

from agent.sensor.sources.fanotify.flood import FloodGuard, Muted


def test_a_directory_over_the_rate_is_muted_once_until_its_mute_runs_out() -> None:
    g = FloodGuard(rate=100, mute_s=30.0)
    assert g.due(1000.0) == ([], [])  # the first look only starts the window
    for _ in range(150):
        g.count(b"flood")
    for _ in range(99):
        g.count(b"busy but fine")
    assert g.due(1000.5) == ([], [])  # at most once a second
    hot, done = g.due(1001.0)
    assert hot == [b"flood"] and done == []
    g.muted[b"flood"] = Muted(b"/srv/www/uploads", 1031.0, 0, 0, 0)
    for _ in range(500):
        g.count(b"flood")  # events counted while muted never mute it twice
    assert g.due(1002.0) == ([], [])
    hot, done = g.due(1031.0)
    assert hot == [] and [k for k, _ in done] == [b"flood"] and not g.muted


def test_a_long_quiet_spell_does_not_lower_the_bar() -> None:
    g = FloodGuard(rate=100)
    g.due(1000.0)
    for _ in range(150):
        g.count(b"d")
    # 150 events over an hour of quiet is no flood: the window is capped at 2 s of rate
    assert g.due(4600.0) == ([], [])
    assert FloodGuard(rate=0).due(5000.0) == ([], [])  # 0: muting off


def test_nothing_is_muted_while_the_agent_keeps_up() -> None:
    g = FloodGuard(rate=100)
    g.due(1000.0)
    for _ in range(1000):
        g.count(b"burst")
    assert g.due(1001.0, behind=False) == ([], [])  # a burst the agent absorbs is no flood
    for _ in range(1000):
        g.count(b"burst")
    assert g.due(1002.0, behind=True)[0] == [b"burst"]
