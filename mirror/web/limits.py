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


class FailureLimiter:
    """Failed logins per key (client address, user name): `burst` at once, then one per
    `window / burst` seconds. Password guessing is then too slow to matter, and a flood of bad
    logins is refused before it costs a bcrypt check."""

    def __init__(
        self, burst: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst = float(burst)
        self.rate = burst / window  # failures forgiven per second
        self._clock = clock
        # (failures still counted, last update); idle keys are forgotten once forgiven.
        self._counts: TTLCache[str, tuple[float, float]] = TTLCache(100_000, window, timer=clock)

    def _current(self, key: str, now: float) -> float:
        count, last = self._counts.get(key, (0.0, now))
        return max(0.0, count - (now - last) * self.rate)

    def wait(self, key: str) -> float:
        """0 if `key` may try again now, else the seconds until it may."""
        over = self._current(key, self._clock()) + 1 - self.burst
        return 0.0 if over <= 0 else over / self.rate

    def failed(self, key: str) -> None:
        """Count one failure against `key`."""
        now = self._clock()
        self._counts[key] = (self._current(key, now) + 1, now)
