"""Per-client request rate: a token bucket per user (or address), forgotten when idle."""

from __future__ import annotations

import time
from collections.abc import Callable

from cachetools import TTLCache


class RateLimiter:
    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        # (tokens, last refill) per client; an idle client's bucket is full again anyway.
        idle = self.burst / rate + 1
        self._buckets: TTLCache[str, tuple[float, float]] = TTLCache(100_000, idle, timer=clock)

    def take(self, client: str) -> float:
        """Spend one request: 0 if allowed, else the seconds until one would be."""
        now = self._clock()
        tokens, last = self._buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[client] = (tokens, now)
            return (1 - tokens) / self.rate
        self._buckets[client] = (tokens - 1, now)
        return 0.0
