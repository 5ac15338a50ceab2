"""One rate limiter for log lines: a fault that repeats on every event of a
burst, or a client that fails on every request, must not flood the journal."""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from agent.shared.clock import Clock


class RateLimiter:
    """At most ``per_interval`` lines per key and ``interval_s``; the lines
    held back are counted and the next line logged says how many
    (``suppressed=N``). At most ``max_keys`` keys are kept, the least
    recently used going first."""

    def __init__(
        self, clock: Clock, per_interval: int = 1, interval_s: float = 60.0, max_keys: int = 1024
    ) -> None:
        self._clock = clock
        self.per_interval = per_interval
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._state: OrderedDict[str, tuple[float, int, int]] = OrderedDict()  # key -> (start, n, held)

    def allow(self, key: str) -> tuple[bool, int]:
        """(log this one?, lines held back since the last one logged)."""
        now = self._clock.monotonic()
        start, n, held = self._state.pop(key, (now, 0, 0))
        if now - start >= self.interval_s:
            start, n = now, 0
        if n < self.per_interval:
            self._state[key] = (start, n + 1, 0)
            out = (True, held)
        else:
            self._state[key] = (start, n, held + 1)
            out = (False, held + 1)
        while len(self._state) > self.max_keys:
            self._state.popitem(last=False)
        return out

    def log(self, logger: logging.Logger, level: int, key: str, msg: str, *args: Any) -> None:
        """``logger.log(level, msg, *args)`` with `` suppressed=N`` added, if allowed."""
        ok, held = self.allow(key)
        if ok:
            logger.log(level, msg + " suppressed=%d", *args, held)
