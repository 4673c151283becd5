"""A bandwidth cap for one upstream: a token bucket every fill of that upstream draws from.

Fair between concurrent fills: bytes are taken in quanta of `QUANTUM` through one FIFO lock,
so fills waiting for the link are served round-robin, a quantum each, whatever the size of
the chunks they read. The fill sleeps after its bytes arrived; it reads no further until then,
so TCP's window slows the upstream's sender to the cap. Across the workers of one mirror the
cap is divided: each of N workers takes `max_bandwidth / N` (no coordination on the hot path;
a worker with no fill leaves its share unused).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable

QUANTUM = 64 * 1024
BURST_SECONDS = 0.1  # the bucket's depth: a short burst; a late wake-up is not lost
WORKERS_VARIABLE = "MIRROR_WORKER_COUNT"  # set by the supervisor for its workers


def worker_share() -> int:
    """How many workers share this mirror's upstream links (1 outside a supervisor)."""
    try:
        return max(1, int(os.environ.get(WORKERS_VARIABLE, "1")))
    except ValueError:
        return 1


class Bandwidth:
    """`rate` bytes per second (0: unlimited) shared by whoever calls `take`."""

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._burst = max(float(QUANTUM), rate * BURST_SECONDS)
        self._tokens = self._burst
        self._stamp = clock()
        self._lock = asyncio.Lock()  # FIFO: waiting fills take turns

    @property
    def limited(self) -> bool:
        return self.rate > 0

    async def take(self, size: int) -> None:
        """Wait until `size` bytes fit under the cap (bytes already received: pay for them)."""
        if self.rate <= 0:
            return
        for start in range(0, size, QUANTUM):
            await self._take_quantum(min(QUANTUM, size - start))

    async def _take_quantum(self, size: int) -> None:
        async with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= size
            if self._tokens < 0:
                await self._sleep(-self._tokens / self.rate)
