"""What the cache knows about manifests: tag -> digest records and each manifest's media type.

Durable in a diskcache (SQLite) store under `<cache>/meta`, so tags survive restarts (an offline
mirror answers from them); a bounded in-memory LRU in front keeps hits off SQLite. SQLite calls
run in a worker thread so the event loop never waits on the disk. The `MetadataStore` protocol
(re-exported here) lives in mirror/interfaces.py; Redis and tiered implementations of it are in
redis_store.py and tiered.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import diskcache
from cachetools import LRUCache

from mirror.cache import sqlite
from mirror.interfaces import MetadataStore as MetadataStore  # re-exported
from mirror.reference import Digest


@dataclass(frozen=True)
class TagRecord:
    """Where a tag pointed when it was last fetched or revalidated."""

    digest: Digest
    media_type: str
    fetched_at: float


TagKey = tuple[str, str, str]  # (upstream name, repository, tag)
RepoKey = tuple[str, str]  # (upstream name, repository)


def is_tag(tag: str) -> bool:
    """A real tag, not one of the mirror's own records kept beside tags under a key no tag
    can spell (a `/`: e.g. referrers lists, see mirror/referrers.py); listings skip those."""
    return "/" not in tag


@dataclass(frozen=True)
class Origins:
    """Where a digest is known to come from: some repository anyone may read upstream
    (`public`), and the private repositories (`upstream/repository`) it was fetched from."""

    public: bool = False
    repos: frozenset[str] = frozenset()

    def add(self, repo: str | None) -> Origins:
        if repo is None:
            return self if self.public else Origins(True, self.repos)
        return self if repo in self.repos else Origins(self.public, self.repos | {repo})


@dataclass(frozen=True)
class Privacy:
    """Whether anonymous upstream access can read a repository, as last checked."""

    private: bool
    checked_at: float


class LocalMetadataStore:
    """diskcache-backed metadata with an in-memory front (one node)."""

    def __init__(self, directory: Path, memory_entries: int = 100_000) -> None:
        self._db = sqlite.call(
            diskcache.Cache, str(directory), eviction_policy="none", size_limit=2**40
        )
        self._tags: LRUCache[TagKey, TagRecord] = LRUCache(memory_entries)
        self._types: LRUCache[Digest, str] = LRUCache(memory_entries)
        self._origins: LRUCache[Digest, Origins] = LRUCache(memory_entries)
        self._privacy: LRUCache[RepoKey, Privacy] = LRUCache(10_000)

    async def get_tag(self, key: TagKey) -> TagRecord | None:
        record = self._tags.get(key)
        if record is None:
            raw = await sqlite.run(self._db.get, ("tag", *key))
            if raw is None:
                return None
            record = TagRecord(*raw)
            self._tags[key] = record
        return record

    async def put_tag(self, key: TagKey, record: TagRecord) -> None:
        self._tags[key] = record
        value = (record.digest, record.media_type, record.fetched_at)
        await sqlite.run(self._db.set, ("tag", *key), value)

    async def delete_tag(self, key: TagKey) -> None:
        """Forget a tag (its image was evicted): the next pull fetches it again."""
        self._tags.pop(key, None)
        await sqlite.run(self._db.delete, ("tag", *key))

    async def get_media_type(self, digest: Digest) -> str | None:
        media_type = self._types.get(digest)
        if media_type is None:
            media_type = await sqlite.run(self._db.get, ("type", digest))
            if media_type is not None:
                self._types[digest] = media_type
        return media_type

    async def put_media_type(self, digest: Digest, media_type: str) -> None:
        if self._types.get(digest) == media_type:
            return
        self._types[digest] = media_type
        await sqlite.run(self._db.set, ("type", digest), media_type)

    async def get_origins(self, digest: Digest) -> Origins | None:
        origins = self._origins.get(digest)
        if origins is None:
            raw = await sqlite.run(self._db.get, ("origin", digest))
            if raw is None:
                return None
            origins = self._origins[digest] = Origins(raw[0], frozenset(raw[1]))
        return origins

    async def add_origin(self, digests: list[Digest], repo: str | None) -> None:
        """Record that `repo` (None: a public repository) holds each of `digests`."""

        def update() -> dict[Digest, Origins]:
            out = {}
            with self._db.transact():
                for digest in digests:
                    raw = self._db.get(("origin", digest))
                    old = Origins(raw[0], frozenset(raw[1])) if raw else Origins()
                    new = out[digest] = old.add(repo)
                    if raw is None or new != old:
                        self._db.set(("origin", digest), (new.public, sorted(new.repos)))
            return out

        known = [self._origins.get(d) for d in digests]
        if all(o is not None and o.add(repo) is o for o in known):
            return  # nothing new (the common case: a warm pull)
        self._origins.update(await sqlite.run(update))

    async def get_privacy(self, key: RepoKey) -> Privacy | None:
        privacy = self._privacy.get(key)
        if privacy is None:
            raw = await sqlite.run(self._db.get, ("privacy", *key))
            if raw is None:
                return None
            privacy = self._privacy[key] = Privacy(*raw)
        return privacy

    def cached_privacy(self, key: RepoKey) -> Privacy | None:
        """What memory holds (no I/O; for listings that must not wait on the disk)."""
        return self._privacy.get(key)

    async def put_privacy(self, key: RepoKey, privacy: Privacy) -> None:
        self._privacy[key] = privacy
        value = (privacy.private, privacy.checked_at)
        await sqlite.run(self._db.set, ("privacy", *key), value)

    def iter_tags(self) -> Iterator[tuple[TagKey, TagRecord]]:
        """Every tag record (blocking; for `ls`): walked lazily on a SQLite thread, elsewhere
        read whole on one first."""
        if not sqlite.on_sqlite_thread():
            yield from sqlite.call(lambda: list(self.iter_tags()))
            return
        for key in self._db.iterkeys():
            if isinstance(key, tuple) and key and key[0] == "tag" and is_tag(key[3]):
                raw = self._db.get(key)
                if raw is not None:
                    yield (key[1], key[2], key[3]), TagRecord(*raw)

    @sqlite.blocking
    def is_manifest(self, digest: Digest) -> bool:
        """Whether `digest` was stored as a manifest (blocking; for index rebuilds)."""
        return self._db.get(("type", digest)) is not None

    @sqlite.blocking
    def close(self) -> None:
        self._db.close()
