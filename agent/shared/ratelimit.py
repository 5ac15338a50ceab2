"""One rate limiter for log lines: a fault that repeats on every event of a
burst must not flood the journal."""

from __future__ import annotations

import logging
from typing import Any

from agent.shared.clock import Clock


class RateLimited:
    """Logs one line per key per interval and says how many it held back:
    a source that fails on every event of a burst must not flood the journal."""

    def __init__(self, logger: logging.Logger, clock: Clock, interval: float) -> None:
        self._log = logger
        self._clock = clock
        self._interval = interval
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, level: int, key: str, msg: str, *args: Any) -> None:
        now = self._clock.monotonic()
        last = self._last.get(key)
        if last is not None and now - last[0] < self._interval:
            self._last[key] = (last[0], last[1] + 1)
            return
        suppressed = last[1] if last is not None else 0
        if len(self._last) > 1024:
            self._last.clear()
        self._last[key] = (now, 0)
        self._log.log(level, msg + " suppressed=%d", *args, suppressed)
