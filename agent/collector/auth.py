"""API keys, the enrollment secret, per-agent rate limits, bounded auth logs.

A key is ``secrets.token_urlsafe(32)`` handed out once at enrollment; the
store keeps only its sha256 (hex). The enrollment secret is compared in
constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections import OrderedDict
from typing import Optional

_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,256}\Z")
_ENROLL_TOKEN = re.compile(r"rwe_([0-9a-f]{8})_[A-Za-z0-9_-]{32}\Z")
ENROLL_TOKEN_PREFIX = "rwe_"  # noqa: S105 - the prefix, not a token


def new_api_key() -> str:
    return secrets.token_urlsafe(32)


def new_enroll_token() -> tuple[str, str]:
    """(token id, token): ``rwe_<id>_<secret>``. The id names the token in
    ``collector tokens list`` and logs; the whole token is shown once."""
    token_id = secrets.token_hex(4)
    return token_id, f"{ENROLL_TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(24)}"


def is_enroll_token(given: object) -> bool:
    return isinstance(given, str) and _ENROLL_TOKEN.match(given) is not None


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def secret_ok(given: object, secret: str) -> bool:
    """Constant-time comparison; any non-string is simply wrong."""
    if not isinstance(given, str) or not secret:
        return False
    a = given.encode("utf-8", "surrogatepass")
    b = secret.encode("utf-8", "surrogatepass")
    return hmac.compare_digest(a, b)


def bearer(header: Optional[str]) -> Optional[str]:
    """The token of ``Authorization: Bearer <token>``, or None if malformed."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not _TOKEN.match(token):
        return None
    return token


class TokenBuckets:
    """One token bucket per key: ``rate`` tokens a second, ``burst`` at most.

    :meth:`take` returns 0.0 when a token was taken, else the seconds until
    one is available (for Retry-After). At most ``max_keys`` buckets are kept;
    the least recently used goes first.
    """

    def __init__(self, rate: float, burst: Optional[float] = None, max_keys: int = 100_000) -> None:
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, now: float) -> float:
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait
