"""What the cache knows about manifests: tag -> digest records and each manifest's media type.

Durable in a diskcache (SQLite) store under `<cache>/meta`, so tags survive restarts (an offline
mirror answers from them); a bounded in-memory LRU in front keeps hits off SQLite. SQLite calls
run in a worker thread so the event loop never waits on the disk. Later: a Redis implementation
of the same methods for a cluster.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import diskcache
from cachetools import LRUCache

from mirror.reference import Digest


@dataclass(frozen=True)
class TagRecord:
    """Where a tag pointed when it was last fetched or revalidated."""

    digest: Digest
    media_type: str
    fetched_at: float


TagKey = tuple[str, str, str]  # (upstream name, repository, tag)


class MetadataStore(Protocol):
    async def get_tag(self, key: TagKey) -> TagRecord | None: ...

    async def put_tag(self, key: TagKey, record: TagRecord) -> None: ...

    async def delete_tag(self, key: TagKey) -> None: ...

    async def get_media_type(self, digest: Digest) -> str | None: ...

    async def put_media_type(self, digest: Digest, media_type: str) -> None: ...

    def is_manifest(self, digest: Digest) -> bool: ...

    def iter_tags(self) -> Iterator[tuple[TagKey, TagRecord]]: ...

    def close(self) -> None: ...


class LocalMetadataStore:
    """diskcache-backed metadata with an in-memory front (one node)."""

    def __init__(self, directory: Path, memory_entries: int = 100_000) -> None:
        self._db = diskcache.Cache(str(directory), eviction_policy="none", size_limit=2**40)
        self._tags: LRUCache[TagKey, TagRecord] = LRUCache(memory_entries)
        self._types: LRUCache[Digest, str] = LRUCache(memory_entries)

    async def get_tag(self, key: TagKey) -> TagRecord | None:
        record = self._tags.get(key)
        if record is None:
            raw = await asyncio.to_thread(self._db.get, ("tag", *key))
            if raw is None:
                return None
            record = TagRecord(*raw)
            self._tags[key] = record
        return record

    async def put_tag(self, key: TagKey, record: TagRecord) -> None:
        self._tags[key] = record
        value = (record.digest, record.media_type, record.fetched_at)
        await asyncio.to_thread(self._db.set, ("tag", *key), value)

    async def delete_tag(self, key: TagKey) -> None:
        """Forget a tag (its image was evicted): the next pull fetches it again."""
        self._tags.pop(key, None)
        await asyncio.to_thread(self._db.delete, ("tag", *key))

    async def get_media_type(self, digest: Digest) -> str | None:
        media_type = self._types.get(digest)
        if media_type is None:
            media_type = await asyncio.to_thread(self._db.get, ("type", digest))
            if media_type is not None:
                self._types[digest] = media_type
        return media_type

    async def put_media_type(self, digest: Digest, media_type: str) -> None:
        if self._types.get(digest) == media_type:
            return
        self._types[digest] = media_type
        await asyncio.to_thread(self._db.set, ("type", digest), media_type)

    def iter_tags(self) -> Iterator[tuple[TagKey, TagRecord]]:
        """Every tag record (blocking; for `ls`)."""
        for key in self._db.iterkeys():
            if isinstance(key, tuple) and key and key[0] == "tag":
                raw = self._db.get(key)
                if raw is not None:
                    yield (key[1], key[2], key[3]), TagRecord(*raw)

    def is_manifest(self, digest: Digest) -> bool:
        """Whether `digest` was stored as a manifest (blocking; for index rebuilds)."""
        return self._db.get(("type", digest)) is not None

    def close(self) -> None:
        self._db.close()
