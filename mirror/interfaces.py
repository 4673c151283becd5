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
from typing import TYPE_CHECKING, Protocol, TypeAlias

if TYPE_CHECKING:  # data types only: cache modules import this one at run time
    from mirror.cache.eviction import SharedEviction
    from mirror.cache.fill import FillBase, UpstreamBody
    from mirror.cache.index import Entry
    from mirror.cache.metadata import Origins, Privacy, RepoKey, TagKey, TagRecord
    from mirror.coordination import Claim
    from mirror.reference import Digest


# A piece of a blob body: `bytes`, or a read-only view of a reused buffer (an upstream body read
# off the loop, mirror/upstream/socket_body.py). Hold a view only while using it: its buffer is
# refilled once no view of it is alive.
Chunk: TypeAlias = bytes | memoryview


class Hasher(Protocol):
    """A running digest (hashlib's objects)."""

    def update(self, data: Chunk, /) -> None: ...

    def hexdigest(self) -> str: ...


class Unavailable(Exception):
    """A shared service (Redis, the object store) cannot be reached or failed: callers
    degrade to local operation or to the upstream instead of failing the request."""


@dataclass
class BlobStream:
    """A blob being read from some offset; `close` releases the file or connection (always
    call it, also after a partial read)."""

    size: int  # bytes from the offset to the end
    chunks: AsyncIterator[Chunk]
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
    written: int  # bytes in the file, a resumed partial's included
    expected_size: int | None  # the declared size, None if the upstream did not say
    resumed_from: int  # bytes a claimed partial held before this writer (0: a new file)

    def rehash(self) -> Awaitable[None]:
        """Hash a claimed partial's bytes (in a thread); writes and `verify` wait for it.
        Unreadable or short: raises `OSError` (the fill then discards the partial)."""

    async def write(self, data: bytes) -> None:
        """Append `data` (hashing it). Disk failure: raises `OSError`."""

    async def write_chunks(self, chunks: list[Chunk]) -> None:
        """Several pieces in order, without joining them first (one copy fewer)."""

    async def hash_copy(self) -> Hasher:
        """The running hash over the bytes written so far (a claimed partial's included),
        as an independent copy: a fill that leaves its disk behind hashes the rest of the
        stream on it."""

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

    async def begin_write(
        self, digest: Digest, size: int | None, source: str | None = None
    ) -> BlobWriter:
        """A writer for `digest` (`size` if declared) of bytes from `source` (an
        `<upstream>/<repository>`; None: not resumable). Disk full or failing: `OSError`."""

    async def resume_write(self, digest: Digest, source: str) -> BlobWriter | None:
        """A writer continuing an abandoned partial of `digest` from that same `source`,
        claimed so that no other process can (None: nothing to resume). Its bytes are not
        trusted: they are re-hashed and the commit checks the whole. Disk failing: OSError."""


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


# -- what a node shares with the others --------------------------------------------------------


class ByteSource(Protocol):
    """An open stream of a blob's bytes: the upstream's, a peer's, the shared store's."""

    size: int | None  # declared length from the offset it was opened at; None: not said

    def chunks(self) -> AsyncIterator[Chunk]:
        """The bytes as they arrive; a broken source raises (`UpstreamError`, `Unavailable`)."""

    async def close(self) -> None:
        """Release the connection; always called, also after a partial read."""


class SharedTier(Protocol):
    """What a node shares with other nodes, asked by the pull policy and the cache policy in
    the same way on one node (`NoSharedTier`: nothing is shared) and in a cluster (`Cluster`:
    the object store, Redis leases, pins and index, the peers). For what serving asks, a
    shared service being down is never an exception: the tier degrades (None, empty,
    `store_down`) and says so in `status`; only the upstream's own failures pass through
    `open_body`. What an operator asks for (`set_pins`, `evict`, `verify`) raises
    `Unavailable` instead, so a command does not report work it could not do."""

    @property
    def store_down(self) -> bool:
        """The shared store is configured but unreachable: blobs pass through uncached."""

    def touched(self, digest: Digest) -> None:
        """A hit on this node (recency for the shared index; no I/O, never fails)."""

    async def presigned(self, digest: Digest) -> str | None:
        """A URL to redirect a client to for a blob the shared store holds; None otherwise."""

    async def direct_stream(self, digest: Digest) -> ByteSource | None:
        """The shared store's bytes when this node keeps no local copies; None otherwise."""

    async def get_manifest(self, digest: Digest, limit: int) -> bytes | None:
        """A manifest another node stored, verified; None if absent, too big or corrupt."""

    async def put_manifest(self, digest: Digest, data: bytes) -> None:
        """Share a verified manifest with the other nodes (best effort)."""

    async def open_body(
        self,
        digest: Digest,
        upstream: Callable[[int], Awaitable[ByteSource]],
        fill: Callable[[], FillBase],
        offset: int = 0,
    ) -> UpstreamBody:
        """The bytes from `offset` (a resumed partial's end) for this node's fill: from the
        shared store, the node holding the fill's lease, or `upstream(offset)`. The
        upstream's failures propagate."""

    async def claim_fetch(self, key: Digest) -> bool:
        """Whether this node makes the fetch named `key` (a manifest by tag) for every node;
        False while another node makes it. True on one node, or with Redis down."""

    async def release_fetch(self, key: Digest) -> None:
        """Give a claimed fetch back (a no-op if not held)."""

    async def shared_pins(self) -> list[str]:
        """Images pinned for every node (none on one node)."""

    async def set_pins(self, images: list[str], *, pin: bool) -> None:
        """Pin or unpin `images` for every node (a no-op on one node)."""

    async def entry(self, digest: Digest) -> tuple[int, float] | None:
        """(size, last served) from the shared index; None if unknown there."""

    async def lead_eviction(self, pinned: set[Digest]) -> SharedEviction | None:
        """The shared store's eviction pass, if this node is the one that evicts now."""

    async def evict(self, pinned: set[Digest], *, dry_run: bool) -> SharedEviction | None:
        """The shared store's eviction pass from this node now (`gc`); None on one node."""

    async def drop(self, digests: list[Digest]) -> list[Digest]:
        """Remove objects from the shared store (an evicted image), except those some node
        is streaming; the ones removed."""

    async def verify(self) -> tuple[int, list[Digest]]:
        """Re-hash every shared object, removing the corrupt ones: (checked, removed)."""

    def status(self) -> dict[str, object]:
        """For /readyz: which shared services this node works without (empty on one node)."""

    async def start(self) -> None:
        """Connect (a service down at start is noted, not raised)."""

    async def close(self) -> None:
        """Let uploads in flight finish (bounded), then disconnect."""


class FillCoordinator(Protocol):
    """Which node fetches a blob from the upstream (mirror/coordination.py: `LocalCoordinator`
    where nothing is shared, `RedisCoordinator` with leases). Never raises for Redis being
    down: then every node claims."""

    async def claim(self, digest: Digest) -> Claim:
        """Mine (fetch it, then `release`), or the owner that is fetching it."""

    async def release(self, digest: Digest) -> None:
        """Give a claimed fill back (a no-op if not held)."""

    async def close(self) -> None:
        """Stop keeping claims alive (held leases lapse)."""
