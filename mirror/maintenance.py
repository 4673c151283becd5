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
from mirror.cache.metadata import LocalMetadataStore
from mirror.config import Config
from mirror.mirror import Mirror
from mirror.reference import Digest, parse_image
from mirror.upstream.routing import build_router


@dataclass
class CacheHandle:
    config: Config
    store: FilesystemBlobStore
    metadata: LocalMetadataStore
    index: CacheIndex
    mirror: Mirror
    evictor: Evictor


@asynccontextmanager
async def open_cache(config: Config) -> AsyncIterator[CacheHandle]:
    """The cache directory's parts, without a server or upstream connections."""
    store = FilesystemBlobStore(config.cache.dir)
    await asyncio.to_thread(store.setup)
    metadata = await asyncio.to_thread(LocalMetadataStore, config.cache.dir / "meta")
    index = await asyncio.to_thread(CacheIndex, config.cache.dir / "index", time.time)
    mirror = Mirror(store, metadata, index, build_router(config), policy=build_policy(config))
    try:
        yield CacheHandle(
            config, store, metadata, index, mirror, Evictor(store, index, config.cache, time.time)
        )
    finally:
        await index.flush()
        index.close()
        metadata.close()


async def all_pins(handle: CacheHandle) -> list[str]:
    return [*handle.config.cache.pins, *sorted(await asyncio.to_thread(handle.index.pins))]


async def gc(handle: CacheHandle, *, dry_run: bool) -> EvictionPlan:
    await asyncio.to_thread(
        handle.index.reconcile, handle.store.blob_dir, handle.metadata.is_manifest
    )
    pinned = await handle.mirror.pinned_digests(await all_pins(handle))
    return await handle.evictor.run_once(pinned, dry_run=dry_run)


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
        entries = [handle.index.get(d) for d in digests]
        present = [e for e in entries if e is not None]
        rows.append(
            ImageRow(
                upstream,
                repo,
                tag,
                record.digest,
                sum(e.size for e in present),
                max((e.last_served for e in present), default=0.0),
                len(present) == len(entries),
                record.digest in pinned,
            )
        )
    return sorted(rows, key=lambda r: (r.repository, r.tag))


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
    return len(digests), bad


async def set_pins(handle: CacheHandle, images: list[str], *, pin: bool) -> set[str]:
    for image in images:
        parse_image(image)  # refuse what could never match
    pins = await asyncio.to_thread(handle.index.pins)
    pins = pins | set(images) if pin else pins - set(images)
    await asyncio.to_thread(handle.index.set_pins, pins)
    return pins
