"""What the collector does with an agent's clock: a batch's ``sent_at`` far
from the collector's own time is a ``clock_skew`` gap (the agent's events
may sit outside the windows they belong to), and event times more than
FUTURE_MS ahead of the collector are not stored: counted, and reported as a
``clock_skew`` gap with the number lost (they would otherwise be kept past
every prune and count in windows they were never in). Times older than the
retention are stored as they come and pruned with the rest (a replay of
recorded data is evaluated at its own T before the prune runs).
"""

from __future__ import annotations

from dataclasses import replace

from agent.shared import wire

SKEW_MS = 300_000  # |sent_at - now| beyond this: a clock_skew gap
FUTURE_MS = 300_000  # event times up to this far ahead are kept


def checked(batch: wire.RowBatch, now_ms: int, retention_ms: int) -> tuple[wire.RowBatch, int, bool]:
    """The batch with out-of-range event times taken out and clock_skew
    gaps added; how many event times were taken out; whether sent_at is skewed."""
    lo, hi = now_ms - retention_ms, now_ms + FUTURE_MS
    sent = batch.times()  # the times as the agent stamped them
    skewed = abs(batch.sent_at - now_ms) > SKEW_MS
    if not skewed and (not sent or max(sent) <= hi):
        return batch, 0, False  # the usual batch: nothing to take out, nothing to add
    # the rule masks (if any) go with their records
    emasks = batch.event_rules or (0,) * len(batch.events)
    cmasks = batch.count_rules or (0,) * len(batch.counts)
    kept_events = [(e, m) for e, m in zip(batch.events, emasks) if e[0] <= hi]
    events = tuple(e for e, _ in kept_events)
    counts, count_rules = [], []
    for (key, exe, path, stamped, actor), m in zip(batch.counts, cmasks):
        kept = tuple(t for t in stamped if t <= hi)
        if kept:
            counts.append((key, exe, path, kept, actor))
            count_rules.append(m)
    dropped = batch.events_total() - len(events) - sum(len(c[3]) for c in counts)
    gaps = list(batch.gaps)
    if skewed and sent:
        gaps.append(wire.GapRecord(max(0, min(sent)), max(0, *sent), 0, "clock_skew"))
    if dropped:
        gaps.append(wire.GapRecord(max(0, lo), now_ms, dropped, "clock_skew"))  # when: unknown, recently
    if len(gaps) == len(batch.gaps):
        return batch, 0, skewed
    out = replace(batch, events=events, counts=tuple(counts), gaps=tuple(gaps))
    if batch.rules:
        out = replace(out, event_rules=tuple(m for _, m in kept_events), count_rules=tuple(count_rules))
    return out, dropped, skewed
