"""Offline maintenance of a cache directory: gc, ls, verify, pins (the CLI's commands).

These work on the files and the index directly, so they run whether or not a mirror is serving
the same directory (diskcache is safe across processes; blob files change only by atomic rename
and unlink).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from mirror.access import build_policy
from mirror.cache.blobs import FilesystemBlobStore
from mirror.cache.eviction import EvictionPlan, Evictor
from mirror.cache.index import CacheIndex
from mirror.cache.metadata import LocalMetadataStore, MetadataStore
from mirror.cache.redis_store import RedisMetadataStore
from mirror.cache.tiered import TieredMetadataStore
from mirror.cluster import (
    Cluster,
    SharedEviction,
    build_cluster,
    shared_policy,
)
from mirror.config import Config
from mirror.metrics import Metrics
from mirror.mirror import Mirror
from mirror.reference import Digest, parse_image
from mirror.upstream.routing import build_router


@dataclass
class CacheHandle:
    config: Config
    store: FilesystemBlobStore
    metadata: MetadataStore
    index: CacheIndex
    mirror: Mirror
    evictor: Evictor
    cluster: Cluster | None = None  # the shared store and Redis, for a cluster's node


@asynccontextmanager
async def open_cache(config: Config) -> AsyncIterator[CacheHandle]:
    """The cache directory's parts (and a cluster's shared store and Redis), without a
    server or upstream connections."""
    store = FilesystemBlobStore(config.cache.dir)
    await asyncio.to_thread(store.setup)
    local = await asyncio.to_thread(LocalMetadataStore, config.cache.dir / "meta")
    metadata: MetadataStore = local
    index = await asyncio.to_thread(CacheIndex, config.cache.dir / "index", time.time)
    cluster = None
    if config.clustered:
        cluster = build_cluster(config, Metrics())
        await cluster.start()
        if cluster.redis is not None:
            metadata = TieredMetadataStore(
                RedisMetadataStore(cluster.redis), local, cluster.redis_health
            )
    mirror = Mirror(
        store, metadata, index, build_router(config), policy=build_policy(config), cluster=cluster
    )
    evictor = Evictor(store, index, config.cache, time.time)
    try:
        yield CacheHandle(config, store, metadata, index, mirror, evictor, cluster)
    finally:
        await index.flush()
        index.close()
        if cluster is not None:
            await cluster.close()
        metadata.close()


async def all_pins(handle: CacheHandle) -> list[str]:
    pins = [*handle.config.cache.pins, *sorted(await asyncio.to_thread(handle.index.pins))]
    if handle.cluster is not None:
        pins += await handle.cluster.shared_pins()
    return pins


async def gc(handle: CacheHandle, *, dry_run: bool) -> tuple[EvictionPlan, SharedEviction | None]:
    """This node's local pass, and in a cluster the shared store's."""
    await asyncio.to_thread(
        handle.index.reconcile, handle.store.blob_dir, handle.metadata.is_manifest
    )
    pinned = await handle.mirror.pinned_digests(await all_pins(handle))
    plan = await handle.evictor.run_once(pinned, dry_run=dry_run)
    shared = None
    cluster = handle.cluster
    if cluster is not None and cluster.index is not None:
        policy = shared_policy(handle.config)
        shared = await cluster.evict_shared(pinned, dry_run=dry_run, **policy)
    return plan, shared


@dataclass(frozen=True)
class ImageRow:
    upstream: str
    repository: str
    tag: str
    digest: str
    size: int
    last_used: float
    complete: bool
    pinned: bool


async def list_images(handle: CacheHandle) -> list[ImageRow]:
    """Cached tags with the size of everything they reference that is cached."""
    await asyncio.to_thread(
        handle.index.reconcile, handle.store.blob_dir, handle.metadata.is_manifest
    )
    pinned = await handle.mirror.pinned_digests(await all_pins(handle))
    rows = []
    for (upstream, repo, tag), record in await asyncio.to_thread(
        lambda: list(handle.metadata.iter_tags())
    ):
        digests: set[Digest] = set()
        await handle.mirror.collect_digests(record.digest, digests)
        sizes = [await _entry(handle, d) for d in digests]
        present = [e for e in sizes if e is not None]
        rows.append(
            ImageRow(
                upstream,
                repo,
                tag,
                record.digest,
                sum(size for size, _ in present),
                max((served for _, served in present), default=0.0),
                len(present) == len(sizes),
                record.digest in pinned,
            )
        )
    return sorted(rows, key=lambda r: (r.repository, r.tag))


async def _entry(handle: CacheHandle, digest: Digest) -> tuple[int, float] | None:
    """(size, last served) from this node's index, else from the cluster's shared one."""
    entry = handle.index.get(digest)
    if entry is not None:
        return entry.size, entry.last_served
    cluster = handle.cluster
    if cluster is not None and cluster.index is not None:
        shared = await cluster.index.get(digest)
        if shared is not None:
            return shared[0], shared[3]
    return None


def _hash_file(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            sha.update(chunk)
    return "sha256:" + sha.hexdigest()


async def verify(handle: CacheHandle, *, repair: bool) -> tuple[int, list[Digest]]:
    """Re-hash every blob; remove the ones that do not match. Returns (checked, removed)."""
    store = handle.store
    digests = await asyncio.to_thread(lambda: list(store.iter_all()))
    bad: list[Digest] = []
    for digest in digests:
        path = str(store.path_for(digest))
        try:
            actual = await asyncio.to_thread(_hash_file, path)
        except FileNotFoundError:
            continue  # evicted meanwhile
        if actual != digest:
            bad.append(digest)
            await store.delete(digest)
    if repair:
        await asyncio.to_thread(handle.index.clear)
    await asyncio.to_thread(handle.index.reconcile, store.blob_dir, handle.metadata.is_manifest)
    checked = len(digests)
    if handle.cluster is not None and handle.cluster.s3 is not None:
        shared_checked, shared_bad = await verify_shared(handle.cluster)
        checked += shared_checked
        bad += shared_bad
    return checked, bad


async def verify_shared(cluster: Cluster) -> tuple[int, list[Digest]]:
    """Re-hash every object of the shared store; remove the ones that do not match."""
    assert cluster.s3 is not None
    objects = await cluster.iter_shared()
    bad = []
    for digest, _size in objects:
        body = await cluster.s3.open_stream(digest)
        if body is None:
            continue  # evicted meanwhile
        sha = hashlib.sha256()
        try:
            async for chunk in body.chunks:
                await asyncio.to_thread(sha.update, chunk)
        finally:
            await body.close()
        if "sha256:" + sha.hexdigest() != digest:
            bad.append(digest)
            await cluster.s3.delete(digest)
            if cluster.index is not None:
                await cluster.index.remove(digest)
    return len(objects), bad


async def set_pins(handle: CacheHandle, images: list[str], *, pin: bool) -> set[str]:
    for image in images:
        parse_image(image)  # refuse what could never match
    pins = await asyncio.to_thread(handle.index.pins)
    pins = pins | set(images) if pin else pins - set(images)
    await asyncio.to_thread(handle.index.set_pins, pins)
    cluster = handle.cluster
    if cluster is not None and cluster.index is not None:  # pins are cluster-wide there
        for image in images:
            await (cluster.index.pin(image) if pin else cluster.index.unpin(image))
        pins = pins | set(await cluster.shared_pins())
    return pins
