"""Time, injected: logic never calls time.time() itself (trio's MockClock idea)."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int:
        """Wall-clock time in whole milliseconds since the epoch (event time)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never steps (timeouts, backoff)."""

    def sleep(self, seconds: float) -> None:
        """Wait; a fake clock just advances."""


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))


class FakeClock:
    """A clock for unit tests: starts at ``start_ms`` and moves only when told."""

    def __init__(self, start_ms: int = 1_790_000_000_000) -> None:
        self._ms = start_ms
        self._mono = 1000.0

    def now_ms(self) -> int:
        return self._ms

    def monotonic(self) -> float:
        return self._mono

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self._ms += int(seconds * 1000)
        self._mono += seconds
