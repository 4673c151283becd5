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
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog

from mirror.cache.eviction import EvictionPlan, Evictor, SharedEviction
from mirror.cache.metadata import TagKey
from mirror.config import Config
from mirror.interfaces import SharedTier
from mirror.mirror import Mirror
from mirror.pins import PinResolver
from mirror.reference import Digest, parse_image

log = structlog.get_logger(__name__)


@dataclass
class EvictResult:
    removed: list[Digest] = field(default_factory=list)
    freed: int = 0
    kept_shared: int = 0  # referenced by another cached tag or a pin
    kept_busy: int = 0  # a fill for it is running


class CachePolicy:
    def __init__(
        self, config: Config, mirror: Mirror, evictor: Evictor, shared: SharedTier
    ) -> None:
        self.config = config
        self.mirror = mirror
        self.evictor = evictor
        self.index = evictor.index
        self.store = evictor.store
        self.shared = shared
        self.resolver = PinResolver(mirror.router, mirror.metadata, mirror.manifest_bytes)

    # -- pins -------------------------------------------------------------------------------

    async def pins(self) -> list[str]:
        """Every pin: the config's, this node's and the cluster's."""
        own = sorted(await asyncio.to_thread(self.index.pins))
        return [*self.config.cache.pins, *own, *await self.shared.shared_pins()]

    async def own_pins(self) -> set[str]:
        """The pins `pin`/`unpin` (and the page) manage, as opposed to the config's."""
        return await asyncio.to_thread(self.index.pins) | set(await self.shared.shared_pins())

    async def set_pins(self, images: list[str], *, pin: bool) -> set[str]:
        """Pin or unpin `images` on this node and cluster-wide; the managed pins after."""
        for image in images:
            parse_image(image)  # refuse what could never match
        pins = await asyncio.to_thread(self.index.pins)
        pins = pins | set(images) if pin else pins - set(images)
        await asyncio.to_thread(self.index.set_pins, pins)
        await self.shared.set_pins(images, pin=pin)
        return await self.own_pins()

    async def pinned(self) -> set[Digest]:
        """Every digest the pins reach that the cache knows of."""
        return await self.resolver.pinned_digests(await self.pins())

    async def references(self, digest: Digest) -> set[Digest]:
        """`digest` and everything it references that the cache knows of (an image whole)."""
        out: set[Digest] = set()
        await self.resolver.collect_digests(digest, out)
        return out

    # -- eviction ---------------------------------------------------------------------------

    async def run_pass(self, *, dry_run: bool = False) -> EvictionPlan:
        """One eviction pass now (the housekeeping loop's): this node, then the shared store
        if this node is the one that evicts there."""
        pinned = await self.pinned()
        plan = await self.evictor.run_once(pinned, dry_run=dry_run)
        if dry_run:
            return plan
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
        """`registry-mirror gc`: reconcile, then this node's pass and the shared store's."""
        await asyncio.to_thread(
            self.index.reconcile, self.store.blob_dir, self.mirror.metadata.is_manifest
        )
        pinned = await self.pinned()
        plan = await self.evictor.run_once(pinned, dry_run=dry_run)
        shared = await self.shared.evict(pinned, dry_run=dry_run)
        if not dry_run:
            self._evicted([digest for digest, _, _ in plan.victims])
            if shared is not None:
                self._evicted([digest for digest, _, _ in shared.victims])
        return plan, shared

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
            entry = await asyncio.to_thread(self.index.get, digest)
            if await self.store.delete(digest):
                result.removed.append(digest)
                result.freed += entry.size if entry is not None else 0
        await asyncio.to_thread(self.index.remove, victims)
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
