"""Metadata for a cluster: Redis first, written through to this node's local store."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from mirror.cache.metadata import (
    MetadataStore,
    Origins,
    Privacy,
    RepoKey,
    TagKey,
    TagRecord,
)
from mirror.cache.redis_store import RedisUnavailable
from mirror.health import ServiceHealth
from mirror.reference import Digest

T = TypeVar("T")


class TieredMetadataStore:
    """Tags and manifest facts in Redis, shared by every node, written through to this node's
    local store, which answers alone while Redis is down (a tag fetched by any node is a hit
    on all; an outage only makes each node work from what it has seen itself). Never raises
    `RedisUnavailable`: reads fall back to local, writes land locally and the shared write is
    dropped (and the outage noted in `health`)."""

    def __init__(self, shared: MetadataStore, local: MetadataStore, health: ServiceHealth) -> None:
        self.shared = shared
        self.local = local
        self.health = health

    async def _shared(self, call: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
        if not self.health.usable:
            return False, None
        try:
            value = await call()
        except RedisUnavailable as exc:
            self.health.failed(exc)
            return False, None
        self.health.ok()
        return True, value

    async def get_tag(self, key: TagKey) -> TagRecord | None:
        ok, record = await self._shared(lambda: self.shared.get_tag(key))
        return record if ok else await self.local.get_tag(key)

    async def put_tag(self, key: TagKey, record: TagRecord) -> None:
        await self.local.put_tag(key, record)
        await self._shared(lambda: self.shared.put_tag(key, record))

    async def delete_tag(self, key: TagKey) -> None:
        """Forget the tag here and for every node; a Redis outage drops the shared delete
        (as for every write here), so the shared record may outlive the local one."""
        await self.local.delete_tag(key)
        await self._shared(lambda: self.shared.delete_tag(key))

    async def get_media_type(self, digest: Digest) -> str | None:
        ok, media_type = await self._shared(lambda: self.shared.get_media_type(digest))
        return media_type if ok and media_type else await self.local.get_media_type(digest)

    async def put_media_type(self, digest: Digest, media_type: str) -> None:
        await self.local.put_media_type(digest, media_type)
        await self._shared(lambda: self.shared.put_media_type(digest, media_type))

    async def get_origins(self, digest: Digest) -> Origins | None:
        ok, origins = await self._shared(lambda: self.shared.get_origins(digest))
        return origins if ok else await self.local.get_origins(digest)

    async def add_origin(self, digests: list[Digest], repo: str | None) -> None:
        await self.local.add_origin(digests, repo)
        await self._shared(lambda: self.shared.add_origin(digests, repo))

    async def get_privacy(self, key: RepoKey) -> Privacy | None:
        ok, privacy = await self._shared(lambda: self.shared.get_privacy(key))
        return privacy if ok else await self.local.get_privacy(key)

    async def put_privacy(self, key: RepoKey, privacy: Privacy) -> None:
        await self.local.put_privacy(key, privacy)
        await self._shared(lambda: self.shared.put_privacy(key, privacy))

    def cached_privacy(self, key: RepoKey) -> Privacy | None:
        return self.shared.cached_privacy(key) or self.local.cached_privacy(key)

    def is_manifest(self, digest: Digest) -> bool:
        return self.local.is_manifest(digest) or self._blocking(
            lambda: self.shared.is_manifest(digest), False
        )

    def iter_tags(self) -> Iterator[tuple[TagKey, TagRecord]]:
        shared = self._blocking(lambda: list(self.shared.iter_tags()), None)
        return iter(shared) if shared is not None else self.local.iter_tags()

    def _blocking(self, call: Callable[[], T], default: T) -> T:
        try:
            return call()
        except RedisUnavailable:
            return default

    def close(self) -> None:
        self.shared.close()
        self.local.close()
