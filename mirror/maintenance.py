"""Offline maintenance of a cache directory: gc, ls, verify, pins (the CLI's commands).

These work on the files and the index directly, so they run whether or not a mirror is serving
the same directory (diskcache is safe across processes; blob files change only by atomic rename
and unlink).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from mirror.cache import sqlite
from mirror.cache.eviction import EvictionPlan, SharedEviction
from mirror.config import Config
from mirror.node import Node, open_node
from mirror.reference import Digest

CacheHandle = Node  # what the commands work on: the node's assembled services


@asynccontextmanager
async def open_cache(config: Config, *, connect: bool = False) -> AsyncIterator[CacheHandle]:
    """The cache directory's node (and a cluster's shared store and Redis), without a server;
    `connect` opens the upstream sessions (for `warm`)."""
    async with open_node(config, connect=connect) as node:
        yield node


async def gc(handle: CacheHandle, *, dry_run: bool) -> tuple[EvictionPlan, SharedEviction | None]:
    """This node's pass, and in a cluster the shared store's."""
    return await handle.policy.gc(dry_run=dry_run)


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
    await sqlite.run(handle.index.reconcile, handle.store.blob_dir, handle.metadata.is_manifest)
    pinned = await handle.policy.pinned()
    rows = []
    for (upstream, repo, tag), record in await sqlite.run(
        lambda: list(handle.metadata.iter_tags())
    ):
        digests = await handle.policy.references(record.digest)
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
    entry = await sqlite.run(handle.index.get, digest)
    if entry is not None:
        return entry.size, entry.last_served
    return await handle.shared.entry(digest)


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
        await sqlite.run(handle.index.clear)
    await sqlite.run(handle.index.reconcile, store.blob_dir, handle.metadata.is_manifest)
    shared_checked, shared_bad = await handle.shared.verify()
    return len(digests) + shared_checked, bad + shared_bad


async def set_pins(handle: CacheHandle, images: list[str], *, pin: bool) -> set[str]:
    """Pin or unpin on this node and cluster-wide; the managed pins after."""
    return await handle.policy.set_pins(images, pin=pin)
