"""The cache's seams as `typing.Protocol`s, each method with its contract on absence and failure.

Every implementation of a protocol here passes one contract suite (tests/contracts/), and mypy
(strict) checks every caller against the protocol, so a method one backend lacks is a type error
and a failing test, not an AttributeError in production.

Failure, in one place:
- Shared services raise a subclass of `Unavailable` when they cannot be reached or fail
  (refused, timed out, 5xx): `RedisUnavailable` (mirror/cache/redis_store.py) and
  `S3Unavailable` (mirror/cache/s3.py), within a bounded time, never a hang.
- The node's own disk raises `OSError` (or SQLite's errors): there is nothing to fall back to.
- The tiered metadata store never raises for Redis: it falls back to the node's local store.

Absence is never an exception: lookups answer None (or False), deletions of absent things are
no-ops.

The index: the node's `CacheIndex` and the cluster's `RedisIndex` keep the same facts (size,
kind, stored/last served, least-recently-served order) but have different native shapes for a
reason: the node index notes serves in memory on the event loop (sync, no I/O) and writes them
in batches, while every call to the shared one is a network round trip (async). Callers on the
hot path use those native methods. `Index` is what both honestly share, as async methods each
implements on top of its native ones; it is what the contract suite holds both to.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # data types only: cache modules import this one at run time
    from mirror.cache.index import Entry
    from mirror.cache.metadata import Origins, Privacy, RepoKey, TagKey, TagRecord
    from mirror.reference import Digest


class Unavailable(Exception):
    """A shared service (Redis, the object store) cannot be reached or failed: callers
    degrade to local operation or to the upstream instead of failing the request."""


@dataclass
class BlobStream:
    """A blob being read from some offset; `close` releases the file or connection (always
    call it, also after a partial read)."""

    size: int  # bytes from the offset to the end
    chunks: AsyncIterator[bytes]
    close: Callable[[], Awaitable[None]]


# -- blobs -----------------------------------------------------------------------------------


class BlobReader(Protocol):
    """The read side every blob store offers: the node's files and the shared object store."""

    async def stat(self, digest: Digest) -> int | None:
        """The blob's size; None if absent. Store down: raises (OSError / S3Unavailable)."""

    async def open_stream(self, digest: Digest, offset: int = 0) -> BlobStream | None:
        """Its bytes from `offset`, read lazily; None if absent. Store down: raises."""

    async def read_bytes(self, digest: Digest, max_size: int) -> bytes | None:
        """A small blob whole and re-verified; None if absent, larger than `max_size` or not
        matching its digest. Store down: raises."""

    def scan(self) -> AsyncIterator[tuple[Digest, int]]:
        """Every stored blob with its size, in no set order; nothing stored: nothing yielded.
        Store down: raises while iterating."""


class BlobStore(BlobReader, Protocol):
    """A blob store that callers also write to and delete from."""

    async def put_bytes(self, digest: Digest, data: bytes) -> None:
        """Store `data` atomically (visible whole or not at all). Raises `DigestMismatch` if
        it does not hash to `digest`; store down: raises and nothing becomes visible."""

    async def delete(self, digest: Digest) -> bool:
        """Remove the blob; True if it was there, False if absent. Store down: raises."""


class BlobWriter(Protocol):
    """Receives one blob's bytes; nothing is visible to readers of the store until `commit`."""

    digest: Digest
    written: int

    async def write(self, data: bytes) -> None:
        """Append `data` (hashing it). Disk failure: raises `OSError`."""

    async def write_chunks(self, chunks: list[bytes]) -> None:
        """Several pieces in order, without joining them first (one copy fewer)."""

    async def verify(self) -> None:
        """Check size and digest (raises `DigestMismatch`, after aborting): from then on the
        bytes may be released to readers, before they are durable (a crash loses a temp file)."""

    async def commit(self) -> None:
        """Verify (unless done), make durable, make visible; on any failure aborts and raises."""

    async def abort(self) -> None:
        """Drop the bytes; a no-op once committed or aborted."""

    def open_tail(self) -> int:
        """A new read-only file descriptor onto the bytes written so far (for tail readers)."""


class FillTarget(Protocol):
    """Where a single-flight fill writes (the node's files: tail readers follow a temp file)."""

    async def stat(self, digest: Digest) -> int | None:
        """The committed blob's size; None if absent. Disk failure: raises `OSError`."""

    async def begin_write(self, digest: Digest, size: int | None) -> BlobWriter:
        """A writer for `digest` (`size` if declared). Disk full or failing: raises `OSError`."""


# -- metadata --------------------------------------------------------------------------------


class MetadataStore(Protocol):
    """Tags, manifest media types, digest origins and repository privacy.

    Implementations: `LocalMetadataStore` (the node's SQLite), `RedisMetadataStore` (shared:
    raises `RedisUnavailable` from every method that reaches Redis when it is down) and
    `TieredMetadataStore` (Redis written through to local: never raises for Redis; reads
    fall back to local, writes land locally and the shared write is dropped). "Down" below
    means Redis is, for the Redis store.
    """

    async def get_tag(self, key: TagKey) -> TagRecord | None:
        """Where the tag pointed when last fetched; None if never recorded or deleted. Down:
        RedisUnavailable (tiered: local answer)."""

    async def put_tag(self, key: TagKey, record: TagRecord) -> None:
        """Record (or replace) the tag. Down: RedisUnavailable (tiered: local only)."""

    async def delete_tag(self, key: TagKey) -> None:
        """Forget the tag (its image was evicted); absent: no-op. Down: RedisUnavailable
        (tiered: deleted locally, the shared delete is dropped)."""

    async def get_media_type(self, digest: Digest) -> str | None:
        """The manifest's stored media type; None if not a known manifest. Down:
        RedisUnavailable (tiered: local answer)."""

    async def put_media_type(self, digest: Digest, media_type: str) -> None:
        """Record the media type (never changes once written). Down: RedisUnavailable
        (tiered: local only)."""

    async def get_origins(self, digest: Digest) -> Origins | None:
        """Where the digest is known to come from; None if nothing recorded. Down:
        RedisUnavailable (tiered: local answer)."""

    async def add_origin(self, digests: list[Digest], repo: str | None) -> None:
        """Add `repo` (None: some public repository) to each digest's origins (a union;
        concurrent additions merge). Down: RedisUnavailable (tiered: local only)."""

    async def get_privacy(self, key: RepoKey) -> Privacy | None:
        """Whether the repository was private when last checked; None if never checked.
        Down: RedisUnavailable (tiered: local answer)."""

    async def put_privacy(self, key: RepoKey, privacy: Privacy) -> None:
        """Record a privacy check. Down: RedisUnavailable (tiered: local only)."""

    def cached_privacy(self, key: RepoKey) -> Privacy | None:
        """What this process's memory holds (no I/O, never raises); None if not in memory."""

    def is_manifest(self, digest: Digest) -> bool:
        """Whether `digest` was stored as a manifest; False if unknown (blocking: call from
        a thread). Down: RedisUnavailable (tiered: local answer)."""

    def iter_tags(self) -> Iterator[tuple[TagKey, TagRecord]]:
        """Every tag record, each once; none: empty (blocking). Down: RedisUnavailable
        (tiered: the local records)."""

    def close(self) -> None:
        """Release this store's connections or files; never raises for a dead service."""


# -- index -----------------------------------------------------------------------------------


class Index(Protocol):
    """The LRU/TTL facts both indexes keep (see the module docstring for why it is async and
    why the native methods differ). Down (Redis index): every method raises
    `RedisUnavailable`; the node index raises only for a failing disk."""

    async def note_stored(self, digest: Digest, size: int, kind: str, now: float) -> None:
        """A newly stored object of `kind` ("blob" or "manifest"); one already indexed
        counts once and only its last-served time may move forward."""

    async def note_served(self, served: Mapping[Digest, float]) -> None:
        """Last-served times; unknown digests are ignored, times never move backwards."""

    async def entry(self, digest: Digest) -> Entry | None:
        """The digest's entry; None if not indexed."""

    async def usage(self) -> tuple[int, int]:
        """(bytes, entries) of everything indexed; empty: (0, 0)."""

    async def drop(self, digest: Digest) -> bool:
        """Remove the entry; True if it was indexed, False if absent."""

    async def least_recent(
        self, limit: int, before: float | None = None
    ) -> list[tuple[str, int, str, float]]:
        """Up to `limit` (digest, size, kind, last_served), least recently served first, only
        those served before `before` if given; none: empty."""
