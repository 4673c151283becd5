"""`CachePolicy`: pins and eviction, one service for the housekeeping loop, the page and the CLI.

Three paths used to evict (the automatic pass, the page's "evict", the cluster's shared pass)
and two gathered pins; they drifted (evicted manifests still answered from memory, the page's
pins not cluster-wide). Now each is one method here:

- `pins` / `set_pins`: the config's, the node's (`registry-mirror pin`) and, in a cluster, the
  cluster-wide ones; setting a pin writes it everywhere the CLI does.
- `run_pass`: the budget/TTL pass over this node, then the shared store's if this node leads.
- `gc`: the same pass on demand (the shared store's from this node), reconciled first.
- `evict_image`: one tag's manifests and the blobs nothing else cached or pinned references.
Every removal also forgets the manifests from memory, so nothing evicted is answered as cached.

Several processes share one cache (the workers of `serve`, the commands). One evicts at a time:
a pass takes `<cache>/locks/evict` (flock; the automatic pass of a worker that finds it taken
skips, the other worker is at it). Each worker notes serves in memory and writes them every
housekeeping tick (one second), so before planning, a worker with siblings waits a little
longer than a tick (`recency_grace`): every worker's serves up to the pass are in the index
then, and an image another worker just served is not taken for the least recently served.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import structlog

from mirror.cache import sqlite
from mirror.cache.eviction import EvictionPlan, Evictor, SharedEviction
from mirror.cache.metadata import TagKey
from mirror.config import Config
from mirror.interfaces import SharedTier
from mirror.mirror import Mirror
from mirror.pins import PinResolver
from mirror.reference import Digest, parse_image

log = structlog.get_logger(__name__)
RECENCY_GRACE = 1.5  # seconds: a little more than the housekeeping's flush interval (1 s)
LOCK_POLL = 0.1  # seconds between tries of a `gc` waiting for another process's pass


def among_workers() -> bool:
    """Whether this process is one of several `serve` workers: mirror/workers.py gives each
    the directory of their merged metrics, and only them."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


@dataclass
class EvictResult:
    removed: list[Digest] = field(default_factory=list)
    freed: int = 0
    kept_shared: int = 0  # referenced by another cached tag or a pin
    kept_busy: int = 0  # a fill for it is running


class CachePolicy:
    def __init__(
        self,
        config: Config,
        mirror: Mirror,
        evictor: Evictor,
        shared: SharedTier,
        *,
        recency_grace: float | None = None,
        protected: Callable[[], Awaitable[set[Digest]]] | None = None,
    ) -> None:
        """`recency_grace`: how long a pass waits for other workers' serves to be written
        (default: `RECENCY_GRACE` among workers, none in a single process)."""
        if recency_grace is None:
            recency_grace = RECENCY_GRACE if among_workers() else 0.0
        self.recency_grace = recency_grace
        self.config = config
        self.mirror = mirror
        self.evictor = evictor
        self.index = evictor.index
        self.store = evictor.store
        self.shared = shared
        self.resolver = PinResolver(mirror.router, mirror.metadata, mirror.manifest_bytes)
        self.protected = protected  # digests never evicted whatever the pins (hosted content)

    # -- pins -------------------------------------------------------------------------------

    async def pins(self) -> list[str]:
        """Every pin: the config's, this node's and the cluster's."""
        own = sorted(await sqlite.run(self.index.pins))
        return [*self.config.cache.pins, *own, *await self.shared.shared_pins()]

    async def own_pins(self) -> set[str]:
        """The pins `pin`/`unpin` (and the page) manage, as opposed to the config's."""
        return await sqlite.run(self.index.pins) | set(await self.shared.shared_pins())

    async def set_pins(self, images: list[str], *, pin: bool) -> set[str]:
        """Pin or unpin `images` on this node and cluster-wide; the managed pins after."""
        for image in images:
            parse_image(image)  # refuse what could never match
        pins = await sqlite.run(self.index.pins)
        pins = pins | set(images) if pin else pins - set(images)
        await sqlite.run(self.index.set_pins, pins)
        await self.shared.set_pins(images, pin=pin)
        return await self.own_pins()

    async def pinned(self) -> set[Digest]:
        """Every digest the pins reach that the cache knows of, and protected ones."""
        pinned = await self.resolver.pinned_digests(await self.pins())
        if self.protected is not None:
            pinned |= await self.protected()
        return pinned

    async def references(self, digest: Digest) -> set[Digest]:
        """`digest` and everything it references that the cache knows of (an image whole)."""
        out: set[Digest] = set()
        await self.resolver.collect_digests(digest, out)
        return out

    # -- eviction ---------------------------------------------------------------------------

    async def run_pass(self, *, dry_run: bool = False) -> EvictionPlan:
        """One eviction pass now (the housekeeping loop's): this node, then the shared store
        if this node is the one that evicts there. Skipped (an empty plan) while another
        process of this cache is evicting."""
        if dry_run:
            return await self.evictor.run_once(await self.pinned(), dry_run=True)
        async with self._evicting(wait=False) as held:
            if not held:
                log.debug("eviction_skipped", reason="another process is evicting")
                return EvictionPlan()
            await self._await_other_workers()
            pinned = await self.pinned()
            plan = await self.evictor.run_once(pinned)
            self._evicted([digest for digest, _, _ in plan.victims])
            shared = await self.shared.lead_eviction(pinned)
        if shared is not None:
            self._evicted([digest for digest, _, _ in shared.victims])
        metrics = self.mirror.metrics
        for _, entry, reason in plan.victims:
            metrics.evictions.labels(reason).inc()
            metrics.evicted_bytes.inc(entry.size)
        return plan

    async def gc(self, *, dry_run: bool) -> tuple[EvictionPlan, SharedEviction | None]:
        """`registry-mirror gc`: reconcile, then this node's pass and the shared store's
        (after any pass another process is running; serves the workers have yet to write
        are waited for, as in their own passes)."""
        await sqlite.run(
            self.index.reconcile, self.store.blob_dir, self.mirror.metadata.is_manifest
        )
        if self.protected is not None:  # hosted content: counted apart, never evicted
            await sqlite.run(self.index.remove, sorted(await self.protected()))
        async with self._evicting(wait=True):
            if not dry_run:
                await self._await_other_workers(RECENCY_GRACE)
            pinned = await self.pinned()
            plan = await self.evictor.run_once(pinned, dry_run=dry_run)
            shared = await self.shared.evict(pinned, dry_run=dry_run)
        if not dry_run:
            self._evicted([digest for digest, _, _ in plan.victims])
            if shared is not None:
                self._evicted([digest for digest, _, _ in shared.victims])
        return plan, shared

    async def _await_other_workers(self, grace: float | None = None) -> None:
        """This process's serves written; then, with other processes noting serves too, a
        wait a little longer than their flush interval, so theirs are written as well."""
        await self.index.flush()
        grace = self.recency_grace if grace is None else grace
        if grace > 0:
            await asyncio.sleep(grace)

    @contextlib.asynccontextmanager
    async def _evicting(self, *, wait: bool) -> AsyncIterator[bool]:
        """Hold `<cache>/locks/evict` for a pass: True if held; with `wait`, until it is,
        else False at once when another process holds it. The file is never removed (no
        stale inode to lock) and the flock goes with the descriptor, or with the process."""
        directory = self.store.root / "locks"
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
        fd = await asyncio.to_thread(os.open, directory / "evict", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not wait:
                        yield False
                        return
                    await asyncio.sleep(LOCK_POLL)
            yield True
        finally:
            os.close(fd)

    async def evict_image(
        self, key: TagKey, references: Mapping[TagKey, frozenset[Digest]]
    ) -> EvictResult:
        """Remove a tag's manifests and the blobs no other cached tag (`references`, what
        each cached tag references) or pin references, here and from the shared store.

        A blob that a fill is writing (here or in another worker) is kept; a client already
        reading a removed file keeps its bytes (unlink semantics), as with eviction by policy.
        """
        mine = references.get(key)
        if mine is None:
            return EvictResult()
        others: set[Digest] = set()
        for other, digests in references.items():
            if other != key:
                others |= digests
        pinned = await self.pinned()
        fills = self.mirror.fills
        busy = {f.digest for f in fills.in_flight()}
        result = EvictResult()
        victims: list[Digest] = []
        for digest in sorted(mine):
            if digest in others or digest in pinned:
                result.kept_shared += 1
            elif digest in busy or fills.locks.is_held(digest):
                result.kept_busy += 1
            else:
                victims.append(digest)
        await self.index.flush()
        for digest in victims:
            entry = await sqlite.run(self.index.get, digest)
            if await self.store.delete(digest):
                result.removed.append(digest)
                result.freed += entry.size if entry is not None else 0
        await sqlite.run(self.index.remove, victims)
        await self.shared.drop(victims)
        self._evicted(victims)
        await self.mirror.metadata.delete_tag(key)
        log.info(
            "image_evicted", upstream=key[0], repository=key[1], tag=key[2], freed=result.freed
        )
        return result

    def _evicted(self, digests: list[Digest]) -> None:
        """Gone from the store: not to be answered from memory either."""
        self.mirror.forget_manifests(digests)
