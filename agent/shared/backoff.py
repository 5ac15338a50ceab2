"""Exponential backoff with jitter, and the ``Retry-After`` header parsed once
for the shipper and the collector's outputs."""

from __future__ import annotations

import email.utils
import random
from collections.abc import Mapping
from typing import Optional


def retry_after(headers: Mapping[str, str], now_s: float) -> Optional[float]:
    """Seconds from a Retry-After header (delta seconds or an HTTP date)."""
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(min(int(value), 3600))
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, AttributeError):
        return None
    return max(0.0, min(when - now_s, 3600.0))


class Backoff:
    """Exponential backoff with jitter: the n-th delay in a row is drawn
    from [base, min(cap, base * 2**n)] (never above ``cap``)."""

    def __init__(self, base: float = 0.5, cap: float = 300.0, rng: Optional[random.Random] = None) -> None:
        self.base, self.cap, self.failures = base, cap, 0
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not a secret

    def next_delay(self) -> float:
        self.failures += 1
        hi = min(self.cap, self.base * 2 ** min(self.failures, 30))
        return self.rng.uniform(min(self.base, hi), hi)

    def reset(self) -> None:
        self.failures = 0
