"""`DiskFullBreaker`: while the cache's disk is full, blob misses bypass the cache.

A fill that hits ENOSPC trips it; for `RETRY_SECONDS` misses stream straight from the upstream
(verified, not kept), then caching is tried again; any commit (space came back, e.g. eviction
ran) resets it. Logged once per episode.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from mirror.reference import Digest

log = structlog.get_logger(__name__)

RETRY_SECONDS = 30.0


class DiskFullBreaker:
    def __init__(self, clock: Callable[[], float], retry: float = RETRY_SECONDS) -> None:
        self.clock = clock
        self.retry = retry
        self.until = 0.0  # while clock() < this, bypass

    @property
    def bypassing(self) -> bool:
        return self.clock() < self.until

    def trip(self, exc: BaseException) -> None:
        """Start (or extend) a disk-full episode."""
        if not self.until:
            log.warning("cache_full", error=str(exc), retry_in=self.retry)
        self.until = self.clock() + self.retry

    def committed(self, digest: Digest) -> None:
        """A blob went in: there is space again."""
        if self.until:
            self.until = 0.0
            log.info("cache_space_returned", digest=digest)
