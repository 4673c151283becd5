"""Who fetches a blob for the whole mirror: fill coordinators (`FillCoordinator` in
mirror/interfaces.py).

Within one node the fill locks (cache/locks.py) already make one process fetch each blob. Across
nodes a `RedisCoordinator` hands out leases: the node that claims a digest's lease fetches it
and keeps the lease alive while it does; the others follow the owner. A lease that is not
renewed lapses (its node died), and the next claim takes the fill over. With Redis down every
node claims (each fetches on its own: slower, never stuck). `LocalCoordinator` is the answer
where nothing is shared: always "mine".
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import structlog

from mirror.cache.redis_store import RedisStore, RedisUnavailable
from mirror.health import ServiceHealth
from mirror.reference import Digest

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Claim:
    """The answer to "may I fetch this?": `mine`, or who does (`owner`; None: unknown)."""

    mine: bool
    owner: str | None = None


MINE = Claim(True)


class LocalCoordinator:
    """Nothing shared: every claim is this node's."""

    async def claim(self, digest: Digest) -> Claim:
        return MINE

    async def release(self, digest: Digest) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisCoordinator:
    """Fill leases in Redis, renewed every third of `lease` while held."""

    def __init__(self, redis: RedisStore, health: ServiceHealth, node: str, lease: float) -> None:
        self.redis = redis
        self.health = health
        self.node = node
        self.lease = lease
        self._renewals: dict[Digest, asyncio.Task[None]] = {}

    async def claim(self, digest: Digest) -> Claim:
        if not self.health.usable:
            return MINE
        try:
            if await self.redis.acquire_fill(digest, self.node, self.lease):
                self.health.ok()
                self._renewals[digest] = asyncio.ensure_future(self._renew(digest))
                return MINE
            owner = await self.redis.fill_owner(digest)
            self.health.ok()
        except RedisUnavailable as exc:
            self.health.failed(exc)
            return MINE
        return Claim(False, owner)

    async def _renew(self, digest: Digest) -> None:
        """Keep the lease alive until `release` (which cancels this)."""
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                if not await self.redis.renew_fill(digest, self.node, self.lease):
                    log.warning("fill_lease_lost", digest=digest)
                    return
            except RedisUnavailable as exc:
                self.health.failed(exc)

    async def release(self, digest: Digest) -> None:
        task = self._renewals.pop(digest, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await self.redis.release_fill(digest, self.node)
        except RedisUnavailable as exc:
            self.health.failed(exc)

    async def close(self) -> None:
        """Stop renewing (leases still held lapse by themselves)."""
        for task in self._renewals.values():
            task.cancel()
        await asyncio.gather(*self._renewals.values(), return_exceptions=True)
        self._renewals.clear()
