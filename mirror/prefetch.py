"""Prefetch: once an image manifest is served, its config and layers not cached yet are fetched
in the background, so the next client (or node) finds the whole image.

The manifest's answer never waits for it: `offer` only schedules a task (the manifest is
parsed in it). Per upstream at most `prefetch_concurrency` blobs at once, each through the
usual fill (one fetch per blob, within the upstream's bandwidth cap), layers larger than
`prefetch_max_size` left for a client to ask. An index is not followed: its platform manifest
is prefetched when a client asks for that one. Evicting the image cancels what is left of it.

Provenance (mirror/provenance.py): each blob passes the check a client's GET of it under the
manifest's repository would (recorded for that repository only, public only if it is; one
that only a client's own fetch may prove is skipped) and comes from that upstream, verified,
so a prefetch tells no client anything it could not pull itself; nothing is sent to anyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Literal

import structlog
from cachetools import LRUCache

from mirror.mediatypes import ALL_MANIFESTS
from mirror.metrics import Metrics
from mirror.reference import SHA256_RE, Digest
from mirror.upstream.routing import Target

log = structlog.get_logger(__name__)

Outcome = Literal["fetched", "cached", "skipped", "too_big", "failed", "cancelled"]
FetchBlob = Callable[[Target, Digest, bool], Awaitable[Outcome]]
RECENT = 10_000  # manifests prefetched lately: not looked at again on every hit
# A prefetch starts this long after the manifest's answer: the answer is written first, and
# a client's own blob requests, which follow at once, start the fills themselves.
START_DELAY = 0.02
_INDEXES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)


def blobs_of(data: bytes, max_size: int) -> tuple[list[Digest], int]:
    """An image manifest's config and layers up to `max_size` bytes (digests), and how many
    layers were too big; nothing for an index or what does not parse."""
    try:
        manifest = json.loads(data)
    except ValueError:
        return [], 0
    if not isinstance(manifest, dict) or "manifests" in manifest:
        return [], 0
    wanted: list[Digest] = []
    too_big = 0
    descriptors = [manifest.get("config"), *(manifest.get("layers") or [])]
    for descriptor in descriptors:
        if not isinstance(descriptor, dict):
            continue
        digest, size = descriptor.get("digest"), descriptor.get("size")
        if not isinstance(digest, str) or not SHA256_RE.fullmatch(digest):
            continue
        if isinstance(size, int) and size > max_size:
            too_big += 1
            continue
        if digest not in wanted:
            wanted.append(Digest(digest))
    return wanted, too_big


class Prefetcher:
    def __init__(self, fetch: FetchBlob, metrics: Metrics) -> None:
        self._fetch = fetch
        self.metrics = metrics
        self._recent: LRUCache[Digest, bool] = LRUCache(RECENT)
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._tasks: dict[Digest, asyncio.Task[None]] = {}  # by manifest digest

    def offer(
        self, target: Target, digest: Digest, media_type: str, data: bytes, private: bool
    ) -> None:
        """A manifest was just served: schedule its blobs (cheap; never waits)."""
        config = target.upstream.config
        if not config.prefetch or media_type in _INDEXES or media_type not in ALL_MANIFESTS:
            return
        if digest in self._recent or digest in self._tasks:
            return
        self._recent[digest] = True
        task = asyncio.ensure_future(self._prefetch(target, digest, data, private))
        self._tasks[digest] = task
        task.add_done_callback(lambda _t: self._tasks.pop(digest, None))

    async def _prefetch(self, target: Target, digest: Digest, data: bytes, private: bool) -> None:
        await asyncio.sleep(START_DELAY)
        upstream = target.upstream
        config = upstream.config
        wanted, too_big = blobs_of(data, config.prefetch_max_size)
        if too_big:
            self.metrics.prefetches.labels(upstream.metric_label, "too_big").inc(too_big)
        slots = self._slots.setdefault(
            upstream.name, asyncio.Semaphore(config.prefetch_concurrency)
        )

        async def one(blob: Digest) -> None:
            async with slots:
                try:
                    outcome = await self._fetch(target, blob, private)
                except asyncio.CancelledError:
                    self.metrics.prefetches.labels(upstream.metric_label, "cancelled").inc()
                    raise
                except Exception as exc:
                    outcome = "failed"
                    log.info("prefetch_failed", digest=blob, upstream=upstream.name,
                             error=getattr(exc, "message", str(exc)))  # fmt: skip
                self.metrics.prefetches.labels(upstream.metric_label, outcome).inc()

        await asyncio.gather(*(one(blob) for blob in wanted), return_exceptions=True)

    def cancel(self, digests: list[Digest]) -> None:
        """These manifests were evicted: stop fetching their blobs."""
        for digest in digests:
            self._recent.pop(digest, None)
            task = self._tasks.pop(digest, None)
            if task is not None:
                task.cancel()
                log.info("prefetch_cancelled", manifest=digest)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
