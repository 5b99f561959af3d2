"""Per-key request rate limits: a token bucket per key label, in memory.

A limit "N requests per P seconds" is a bucket of capacity N refilled at N/P tokens a second,
full at the start: a key may burst N requests, then gets one more every P/N seconds. A
request takes one token; with less than one token left it is refused, and told how long until
there is one. Buckets live in this process only (a restart forgets them), behind one lock, on
the monotonic clock (a change of the wall clock neither grants nor withholds requests).

Limits are written `REQUESTS/PERIOD`: `10/60s`, `10/60` (seconds), `100/1h`, `5/2m`, `1/s`,
or `unlimited`. The period is a whole number of seconds, because the message a refusal
carries, "users can make 10 requests per 60 seconds", is parsed by the published VisionCraft
wrapper, which reads `per <integer> <seconds|minutes|hours>`.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from app.errors import RateLimited, retry_after_seconds

UNLIMITED = "unlimited"
_UNITS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
_FORMAT = re.compile(r"(\d+)\s*/\s*(\d*)\s*([a-z]*)", re.IGNORECASE)
# Tokens are floats: refills such as 6 s x (1/6 token/s) may land a hair under 1.0.
_EPSILON = 1e-9
# Past this many buckets, full ones (which behave exactly like absent ones) are dropped, so
# anonymous clients (one label per address) cannot grow the table without bound.
_PRUNE_AT = 10_000


@dataclass(frozen=True)
class RateLimit:
    requests: int
    period_s: int

    @property
    def rate(self) -> float:
        """Tokens refilled per second."""
        return self.requests / self.period_s

    def describe(self) -> str:
        """The rule in the words the VisionCraft wrapper parses (`users can ... per N seconds`)."""
        noun = "request" if self.requests == 1 else "requests"
        return f"users can make {self.requests} {noun} per {self.period_s} seconds"

    def __str__(self) -> str:
        return f"{self.requests}/{self.period_s}s"


def parse_rate_limit(text: str) -> RateLimit | None:
    """`10/60s` → RateLimit(10, 60); `unlimited` → None. ValueError names the rule."""
    value = text.strip()
    if value.lower() == UNLIMITED:
        return None
    match = _FORMAT.fullmatch(value)
    unit = match[3].lower() if match else ""
    if match is None or unit not in _UNITS or not (match[2] or unit):
        raise ValueError(
            f"rate limit {value!r} is not REQUESTS/PERIOD: write e.g. 10/60s, 100/1h, 5/2m "
            f"(units s, m, h; seconds when none) or {UNLIMITED}"
        )
    requests, period = int(match[1]), int(match[2] or 1) * _UNITS[unit]
    if requests < 1 or period < 1:
        raise ValueError(f"rate limit {value!r}: requests and period must be at least 1")
    return RateLimit(requests, period)


class TokenBucket:
    """One key's bucket. Not locked: RateLimiter holds its lock around every call."""

    def __init__(self, limit: RateLimit, now: float) -> None:
        self.limit = limit
        self.tokens = float(limit.requests)
        self.updated = now

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(float(self.limit.requests), self.tokens + elapsed * self.limit.rate)
        self.updated = max(self.updated, now)

    def take(self, now: float) -> float:
        """Take a token: 0.0 when granted, else the seconds until one is there (nothing taken)."""
        self._refill(now)
        if self.tokens >= 1.0 - _EPSILON:
            self.tokens = max(0.0, self.tokens - 1.0)
            return 0.0
        return (1.0 - self.tokens) / self.limit.rate

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.limit.requests - _EPSILON


class RateLimiter:
    """The buckets of every key label. `limits` maps a label to its own limit (None: no
    limit); every other label (a key without its own, the generated key, anonymous clients)
    gets `default` (None: no limit). Thread-safe."""

    def __init__(
        self,
        default: RateLimit | None = None,
        limits: Mapping[str, RateLimit | None] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.default = default
        self.limits = dict(limits or {})
        self._clock = clock
        self._on_refused = on_refused
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def limit_for(self, label: str) -> RateLimit | None:
        return self.limits.get(label, self.default)

    def try_acquire(self, label: str) -> float:
        """Count one request of `label`: 0.0 when admitted, else the seconds to wait."""
        limit = self.limit_for(label)
        if limit is None:
            return 0.0
        with self._lock:
            now = self._clock()
            bucket = self._buckets.get(label)
            if bucket is None:
                if len(self._buckets) >= _PRUNE_AT:
                    self._prune(now)
                bucket = self._buckets[label] = TokenBucket(limit, now)
            return bucket.take(now)

    def admit(self, label: str) -> None:
        """Count one request of `label`, or raise RateLimited (429 with Retry-After)."""
        wait = self.try_acquire(label)
        if wait <= 0:
            return
        if self._on_refused is not None:
            self._on_refused(label)
        limit = self.limit_for(label)
        assert limit is not None
        seconds = retry_after_seconds(wait)  # as in the Retry-After header
        raise RateLimited(
            f"Rate limit exceeded for this API key: {limit.describe()}. "
            f"Retry in {seconds} {'second' if seconds == 1 else 'seconds'}.",
            retry_after=wait,
        )

    def _prune(self, now: float) -> None:
        for label in [label for label, bucket in self._buckets.items() if bucket.full(now)]:
            del self._buckets[label]
