"""agent.collector.terms.decide: the new-terms test on one combination's stored run."""

from __future__ import annotations

from agent.collector.terms import decide

H = 7 * 86_400_000


def test_first_event_is_new_and_starts_a_run() -> None:
    assert decide(None, 100, H) == (True, (100, 100))


def test_history_edge_exactly_seven_days_is_not_new_one_ms_more_is() -> None:
    assert decide((0, 0), H, H) == (False, (0, H))
    assert decide((0, 0), H + 1, H) == (True, (H + 1, H + 1))


def test_a_tie_or_an_event_inside_the_run_is_not_new() -> None:
    assert decide((10, 50), 50, H) == (False, (10, 50))
    assert decide((10, 50), 30, H) == (False, (10, 50))


def test_a_chain_of_events_keeps_the_combination_seen() -> None:
    run = (0, 0)
    for day in range(1, 20):  # one event every 6 days: never new again
        is_new, run = decide(run, day * 6 * 86_400_000, H)
        assert not is_new


def test_a_late_event_before_the_run_is_new() -> None:
    assert decide((H, 2 * H), H - 5, H) == (True, (H - 5, 2 * H))
    assert decide((3 * H, 3 * H), H - 5, H) == (True, (3 * H, 3 * H))  # an older, separate run
