"""Eviction policy: a size budget with high/low watermarks, and TTLs since last served.

Past the high watermark, least-recently-served entries go until the cache is under the low
watermark; independently, entries not served for `blob_ttl` / `manifest_ttl` go. Pinned digests
never go. Only committed files are candidates (fills live in temp files), and a reader holding a
file open keeps its bytes after the unlink, so nothing is pulled from under a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from mirror.cache import sqlite
from mirror.cache.blobs import FilesystemBlobStore
from mirror.cache.index import CacheIndex, Entry
from mirror.config import CacheConfig
from mirror.reference import Digest

log = structlog.get_logger(__name__)
YIELD_EVERY = 500  # index entries walked between GIL hand-overs


@dataclass
class EvictionPlan:
    victims: list[tuple[Digest, Entry, str]] = field(default_factory=list)  # (.., reason)
    size_before: int = 0
    budget: int = 0

    @property
    def freed(self) -> int:
        return sum(entry.size for _, entry, _ in self.victims)


@dataclass
class SharedEviction:
    """A pass over a cluster's shared store: its victims are (digest, size, reason)."""

    size_before: int
    entries_before: int
    budget: int
    victims: list[tuple[Digest, int, str]] = field(default_factory=list)

    @property
    def freed(self) -> int:
        return sum(size for _, size, _ in self.victims)


class Evictor:
    def __init__(
        self,
        store: FilesystemBlobStore,
        index: CacheIndex,
        config: CacheConfig,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.index = index
        self.config = config
        self.clock = clock

    def budget(self) -> int:
        st = os.statvfs(self.store.root)
        return self.config.budget_bytes(st.f_blocks * st.f_frsize)

    def over_high_watermark(self) -> bool:
        budget = self.budget()
        return budget > 0 and self.index.totals()[0] > budget * self.config.high_watermark

    def plan(self, pinned: set[Digest]) -> EvictionPlan:
        """What a pass would remove now (blocking: walks the index on a SQLite thread)."""
        size, _ = self.index.totals()
        budget = self.budget()
        plan = EvictionPlan(size_before=size, budget=budget)
        over = budget > 0 and size > budget * self.config.high_watermark
        target = budget * self.config.low_watermark
        ttls = {"blob": self.config.blob_ttl, "manifest": self.config.manifest_ttl}
        shortest_ttl = min((t for t in ttls.values() if t > 0), default=0.0)
        now = self.clock()
        remaining = size
        for n, (digest, entry) in enumerate(self.index.lru()):
            if n % YIELD_EVERY == 0:
                time.sleep(0)  # hand the GIL to the event loop now and then
            shrinking = over and remaining > target
            idle = now - entry.last_served
            if not shrinking and (shortest_ttl == 0 or idle <= shortest_ttl):
                break  # LRU order: nothing later is older
            if digest in pinned:
                continue
            ttl = ttls.get(entry.kind, 0.0)
            if ttl > 0 and idle > ttl:
                reason = "ttl"
            elif shrinking:
                reason = "size"
            else:
                continue
            plan.victims.append((digest, entry, reason))
            remaining -= entry.size
        return plan

    def apply(self, plan: EvictionPlan) -> None:
        for digest, _, _ in plan.victims:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.store.path_for(digest))
        self.index.remove([digest for digest, _, _ in plan.victims])

    async def run_once(self, pinned: set[Digest], *, dry_run: bool = False) -> EvictionPlan:
        if not dry_run:  # abandoned partials past their age or the total go too
            await asyncio.to_thread(
                self.store.sweep_partials,
                self.config.partial_max_age,
                self.config.partial_max_size,
                self.clock(),
            )
        await self.index.flush()
        plan = await sqlite.run(self.plan, pinned)
        if plan.victims and not dry_run:
            await asyncio.to_thread(self.apply, plan)
            log.info(
                "cache_evicted",
                entries=len(plan.victims),
                bytes=plan.freed,
                size_before=plan.size_before,
                budget=plan.budget,
            )
        return plan
