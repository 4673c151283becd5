"""`Mirror`: the caching policy between the web layer and the cache/upstream mechanisms.

Manifests by digest and blobs are immutable: once verified and stored they are answered from the
cache forever (until evicted). A tag is answered from its record while younger than `tag_ttl`,
then revalidated with a HEAD (free on Docker Hub's pull limit) and refetched only if the digest
moved. Misses are single-flight: one upstream fetch per manifest or blob however many ask.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import structlog
from cachetools import LRUCache

from mirror.access import ANONYMOUS, Policy, Principal
from mirror.access_guard import AccessGuard, upstream_trouble
from mirror.breaker import DiskFullBreaker
from mirror.cache.blobs import FilesystemBlobStore, OpenBlob, is_disk_full
from mirror.cache.fill import FillBase, FillManager, RemoteFill, TailReader, UpstreamBody
from mirror.cache.index import CacheIndex
from mirror.cache.locks import FileLocks
from mirror.cache.metadata import MetadataStore, TagKey, TagRecord
from mirror.config import VerifyRule
from mirror.errors import DigestMismatch, RegistryError
from mirror.interfaces import ByteSource, Chunk, SharedTier
from mirror.manifest_flight import ManifestFlight
from mirror.mediatypes import ALL_MANIFESTS, accepts, sniff_media_type
from mirror.metrics import Metrics
from mirror.prefetch import Outcome, Prefetcher
from mirror.provenance import Provenance, Verdict
from mirror.reference import Digest, Name, Tag, is_digest
from mirror.referrers import Referrers, ReferrersResult
from mirror.resume import ResumingSource
from mirror.shared import NoSharedTier
from mirror.singleflight import SingleFlight
from mirror.tag_pages import tag_page
from mirror.upstream.client import BlobStream, FetchedManifest, TagList, UpstreamClient
from mirror.upstream.routing import Router, Target
from mirror.verify_policy import SignaturePolicy

log = structlog.get_logger(__name__)

CacheResult = Literal["hit", "miss", "revalidated", "joined", "bypass", "stale"]
MANIFEST_MEMORY_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Manifest:
    data: bytes
    media_type: str
    digest: Digest


@dataclass(frozen=True)
class FillView:
    """A fill in flight, as the operator page shows it."""

    digest: Digest
    written: int
    size: int | None
    state: str
    follower: bool  # following another process's fill


@dataclass(frozen=True)
class ManifestAnswer:
    manifest: Manifest
    cache: CacheResult


@dataclass(frozen=True)
class BlobAnswer:
    """A cached file to send (`file`), a fill to tail (`reader`), or, when the cache cannot
    take the blob (disk full), the upstream's bytes passed through (`stream`), verified before
    the last chunk is released. `size` may be unknown."""

    size: int | None
    cache: CacheResult
    file: OpenBlob | None = None
    reader: TailReader | None = None
    stream: AsyncGenerator[Chunk, None] | None = None
    redirect: str | None = None  # a presigned URL of the shared store (cluster option)

    async def release(self) -> None:
        """Let go of what was opened, when it will not be sent (e.g. a 416)."""
        if self.file is not None:
            self.file.close()
        if self.reader is not None:
            self.reader.close()
        if self.stream is not None:
            await self.stream.aclose()


async def _never_fetch(_offset: int) -> UpstreamBody:
    raise RegistryError("BLOB_UNKNOWN", "this node is not fetching that blob")


def offline_miss(code: str, what: str) -> RegistryError:
    return RegistryError(code, f"the mirror is offline and has no cached copy of this {what}")


def _takes_everything(accept: list[str]) -> bool:
    """A client that accepts every manifest type sees what the tag record describes."""
    return all(accepts(accept, media_type) for media_type in ALL_MANIFESTS)


class Mirror:
    def __init__(
        self,
        store: FilesystemBlobStore,
        metadata: MetadataStore,
        index: CacheIndex,
        router: Router,
        *,
        metrics: Metrics | None = None,
        offline: bool = False,
        clock: Callable[[], float] = time.time,
        policy: Policy | None = None,
        shared: SharedTier | None = None,
        verify: tuple[VerifyRule, ...] = (),
        outrun_disk: bool = False,
    ) -> None:
        self.metrics = metrics or Metrics()
        # What this node shares with others: nothing (one node), or a cluster's store and Redis.
        self.shared: SharedTier = shared or NoSharedTier()
        policy = policy or Policy()
        self.offline = offline  # never contact an upstream
        locks = FileLocks(store.root / "locks")
        locks.setup()
        self.store = store
        self.metadata = metadata
        self.index = index
        self.fills = FillManager(
            store, locks, on_commit=self._blob_committed, outrun_disk=outrun_disk
        )
        self.router = router
        self.clock = clock
        self.disk = DiskFullBreaker(clock)  # while tripped, blob misses bypass the cache
        self._manifests: LRUCache[Digest, Manifest] = LRUCache(
            MANIFEST_MEMORY_BYTES, getsizeof=lambda m: len(m.data) + 256
        )
        self._manifest_flight: SingleFlight[tuple[str, ...], FetchedManifest] = SingleFlight()
        # One manifest GET per reference for every worker (and node): the budget's sake.
        self._manifest_flight_across = ManifestFlight(
            store.root / "locks" / "manifests", self.shared
        )
        self._revalidations: dict[TagKey, asyncio.Task[TagRecord]] = {}
        self.prefetcher = Prefetcher(self._prefetch_blob, self.metrics)
        self.access = AccessGuard(policy, metadata, router, offline=offline, clock=clock)
        # Private content exists only where the mirror holds upstream credentials, and
        # anyone may name a registry of their own with `allow_any_upstream`; with neither,
        # every digest is public and no provenance is kept.
        guarded = router.allow_any or any(
            u.config.has_credentials for u in router.upstreams.values()
        )
        self.provenance = Provenance(metadata, policy, guarded=guarded, offline=offline)
        self._background: set[asyncio.Future[None]] = set()  # records made after a fill
        self.referrers_service = Referrers(
            metadata, self, offline=offline, clock=clock, on_stale=self.metrics.stale_answers.inc
        )
        # Only signed images (the `verify` config; off when empty): see verify_policy.py.
        self.signatures = SignaturePolicy(verify, self, self.metrics, clock)

    @property
    def guarded(self) -> bool:
        return self.provenance.guarded

    @property
    def policy(self) -> Policy:
        """Who may pull what (the access rules), as the guard and provenance apply them."""
        return self.access.policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self.access.policy = self.provenance.policy = policy

    def may_pull(self, principal: Principal, upstream: str, repository: str) -> bool:
        """See `AccessGuard.may_pull` (for listings of what the cache holds)."""
        return self.access.may_pull(principal, upstream, repository)

    async def _record(self, target: Target, digests: list[Digest], private: bool) -> None:
        """`target` holds `digests`, on evidence (see `provenance`); the repository exists, so
        its privacy answer is kept durably now."""
        await self.provenance.record(target, digests, private=private)
        await self.access.remember(target)

    # -- manifests --------------------------------------------------------------------------

    async def manifest(
        self,
        name: Name,
        reference: Tag | Digest,
        accept: list[str],
        namespace: str | None = None,
        principal: Principal = ANONYMOUS,
    ) -> ManifestAnswer:
        target = self.router.route(name, namespace)
        private = await self.access.authorize(principal, target)
        if is_digest(reference):
            digest = Digest(reference)
            cached = await self.cached_manifest(digest)
            if cached is not None:
                verdict = await self.provenance.check(
                    target, digest, private=private, principal=principal, kind="manifest"
                )
                if verdict is Verdict.SERVE:
                    return self._served(target, ManifestAnswer(cached, "hit"), private)
                # Only the target's own verified copy proves it holds this manifest.
                fetched = await self._fetch_manifest(target, digest, accept, private)
                return self._served(target, ManifestAnswer(fetched, "bypass"), private)
            if self.offline:
                raise offline_miss("MANIFEST_UNKNOWN", "manifest")
            fetched = await self._fetch_manifest(target, digest, accept, private)
            return self._served(target, ManifestAnswer(fetched, "miss"), private)
        answer = await self._manifest_by_tag(target, Tag(reference), accept, private)
        # Checked before it goes out: a refused image is neither served nor prefetched.
        await self.signatures.check(target, Tag(reference), answer.manifest.digest, private)
        return self._served(target, answer, private)

    def _served(self, target: Target, answer: ManifestAnswer, private: bool) -> ManifestAnswer:
        """The answer goes out now; its image's blobs follow in the background (prefetch)."""
        if not self.offline:
            m = answer.manifest
            self.prefetcher.offer(target, m.digest, m.media_type, m.data, private)
        return answer

    async def _manifest_by_tag(
        self, target: Target, tag: Tag, accept: list[str], private: bool
    ) -> ManifestAnswer:
        upstream = target.upstream
        key: TagKey = (upstream.name, target.repository, tag)
        broad = _takes_everything(accept)
        looked = time.time()  # wall time, as the workers' flight compares it
        record = await self.metadata.get_tag(key)
        cached = None
        if record is not None and accepts(accept, record.media_type):
            cached = await self.cached_manifest(record.digest)
        if cached is not None and record is not None:
            if self.offline or self.clock() - record.fetched_at < upstream.config.tag_ttl:
                return ManifestAnswer(cached, "hit")
            answer = await self._revalidated(target, key, record, cached, accept, private)
            if answer is not None:
                return answer
        if self.offline:
            raise offline_miss("MANIFEST_UNKNOWN", "tag")

        async def remember(fetched: FetchedManifest) -> None:
            await self.metadata.put_tag(
                key, TagRecord(fetched.digest, fetched.media_type, self.clock())
            )

        try:
            # A narrow client may get another manifest (e.g. one platform): not recorded.
            fetched = await self._fetch_manifest(
                target, tag, accept, private, since=looked, remember=remember if broad else None
            )
        except Exception as exc:
            if cached is None or not upstream_trouble(exc):
                raise
            return self._stale(cached, key, exc)
        return ManifestAnswer(fetched, "miss" if broad else "bypass")

    def _stale(self, cached: Manifest, key: TagKey, exc: BaseException) -> ManifestAnswer:
        """Stale-if-error: the upstream is in trouble, the cache still has the tag."""
        self.metrics.stale_answers.inc()
        log.warning(
            "tag_served_stale",
            upstream=key[0],
            repository=key[1],
            tag=key[2],
            error=getattr(exc, "message", str(exc)),
        )
        return ManifestAnswer(cached, "stale")

    async def _revalidated(
        self,
        target: Target,
        key: TagKey,
        record: TagRecord,
        cached: Manifest,
        accept: list[str],
        private: bool,
    ) -> ManifestAnswer | None:
        """A tag past its TTL. Revalidated by HEAD (free on Docker Hub), refetched only if it
        moved; the answer waits for that at most `revalidate_timeout`, then the cached tag
        goes out (Warning 110) and the check finishes in the background. Under the budget
        floor it goes out at once. None: the tag moved to what this client cannot take."""
        upstream = target.upstream
        config = upstream.config
        low = config.budget_floor > 0 and upstream.budget.low(config.budget_floor)
        task = self._revalidations.get(key)
        if task is None:
            task = asyncio.ensure_future(self._refresh_tag(target, key, record, private))
            self._revalidations[key] = task
            task.add_done_callback(lambda t: self._revalidation_done(key, t))
        bound = 0.0 if low else config.revalidate_timeout
        try:
            if bound > 0:
                fresh: TagRecord | None = await asyncio.wait_for(asyncio.shield(task), bound)
            else:
                fresh = task.result() if task.done() else None
        except TimeoutError:
            fresh = None
        except Exception as exc:
            if not upstream_trouble(exc):
                raise
            return self._stale(cached, key, exc)
        if fresh is None:
            if low:
                self.metrics.budget_stale_answers.labels(upstream.metric_label).inc()
            why = "budget under the floor" if low else "slow upstream"
            log.info("tag_served_while_revalidating", upstream=key[0], repository=key[1],
                     tag=key[2], why=why)  # fmt: skip
            return ManifestAnswer(cached, "stale")
        if fresh.digest == record.digest:
            return ManifestAnswer(cached, "revalidated")
        if accepts(accept, fresh.media_type):
            moved = await self.cached_manifest(fresh.digest)
            if moved is not None:
                return ManifestAnswer(moved, "miss")
        return None

    def _revalidation_done(self, key: TagKey, task: asyncio.Task[TagRecord]) -> None:
        """A background revalidation ended: its failure is logged, not raised anywhere."""
        self._revalidations.pop(key, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.info("tag_revalidation_failed", upstream=key[0], repository=key[1], tag=key[2],
                     error=getattr(exc, "message", str(exc)))  # fmt: skip

    async def _refresh_tag(
        self, target: Target, key: TagKey, record: TagRecord, private: bool
    ) -> TagRecord:
        """HEAD the tag upstream: the same digest restarts its TTL; another is fetched (the
        one GET the budget pays for) and becomes the tag's record."""
        head = await target.upstream.head_manifest(target.name, key[2], list(ALL_MANIFESTS))
        if head.digest == record.digest:
            fresh = TagRecord(record.digest, record.media_type, self.clock())
        else:
            log.info("tag_moved", upstream=key[0], repository=key[1], tag=key[2])
            fetched = await self._fetch_manifest(target, key[2], list(ALL_MANIFESTS), private)
            fresh = TagRecord(fetched.digest, fetched.media_type, self.clock())
        await self.metadata.put_tag(key, fresh)
        return fresh

    async def cached_manifest(self, digest: Digest) -> Manifest | None:
        manifest = self._manifests.get(digest)
        if manifest is not None:
            self._touch(digest)
            return manifest
        # Bounded by the manifest limit: a layer's digest asked for as a manifest is not read.
        limit = self.router.default.config.manifest_max_size
        data = await self.store.read_bytes(digest, limit)
        if data is None:
            data = await self.shared.get_manifest(digest, limit)  # stored by another node
            if data is not None:
                await self._keep_manifest(digest, data)
        if data is None:
            return None
        media_type = await self.metadata.get_media_type(digest) or sniff_media_type(data)
        if media_type is None:
            return None
        manifest = Manifest(data, media_type, digest)
        self._manifests[digest] = manifest
        self._touch(digest)
        return manifest

    def _touch(self, digest: Digest) -> None:
        """A hit: recency for this node's LRU index, and for the cluster's shared one."""
        self.index.touch(digest)
        self.shared.touched(digest)

    async def _fetch_manifest(
        self,
        target: Target,
        reference: str,
        accept: list[str],
        private: bool,
        since: float | None = None,
        remember: Callable[[FetchedManifest], Awaitable[None]] | None = None,
    ) -> Manifest:
        """One upstream GET however many ask at once; stored by digest before it is answered.
        `since`: when the caller looked for a record (wall time): another worker's answer from
        after that serves it too. `remember` (the tag's record) runs before the other workers
        are answered: a worker that looks for the record after that answer finds it (written
        after, a look in between found neither and fetched again: 4 GETs for 3 tags)."""
        upstream = target.upstream
        key = (upstream.name, target.repository, reference, *sorted(accept))

        async def fetch() -> FetchedManifest:
            fetched = await upstream.get_manifest(target.name, reference, accept)
            # Verified bytes from this repository; what the manifest references proves nothing.
            await self._record(target, [fetched.digest], private)
            await self.metadata.put_media_type(fetched.digest, fetched.media_type)
            await self._keep_manifest(fetched.digest, fetched.data)
            await self.shared.put_manifest(fetched.digest, fetched.data)
            if remember is not None:
                await remember(fetched)
            return fetched

        async def load(digest: Digest) -> FetchedManifest | None:
            found = await self.cached_manifest(digest)
            return None if found is None else FetchedManifest(found.data, found.media_type, digest)

        async def recheck(began: float) -> FetchedManifest | None:
            """Another node fetched it while this one waited: its record, if it says."""
            if is_digest(reference):
                return await load(Digest(reference))
            record = await self.metadata.get_tag((upstream.name, target.repository, reference))
            if (
                record is None
                or record.fetched_at < began
                or not accepts(accept, record.media_type)
            ):
                return None
            return await load(record.digest)

        fetched = await self._manifest_flight.do(
            key, lambda: self._manifest_flight_across.do(key, fetch, load, recheck, since)
        )
        manifest = Manifest(fetched.data, fetched.media_type, fetched.digest)
        self._manifests[manifest.digest] = manifest
        return manifest

    async def _keep_manifest(self, digest: Digest, data: bytes) -> None:
        """Store verified manifest bytes locally (answering anyway if the disk is full)."""
        try:
            if await self.store.stat(digest) is None:
                await self.store.put_bytes(digest, data)
                self.index.add(digest, len(data), "manifest")
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            self.disk.trip(exc)  # still answer: the bytes are verified, just not kept

    # -- referrers (see referrers.py) -------------------------------------------------------

    async def referrers(
        self,
        name: Name,
        subject: Digest,
        artifact_type: str | None = None,
        query: dict[str, str] | None = None,
        namespace: str | None = None,
        principal: Principal = ANONYMOUS,
    ) -> ReferrersResult:
        """The referrers of `subject` (one page), with the access rules of its repository."""
        target = self.router.route(name, namespace)
        private = await self.access.authorize(principal, target)
        return await self.referrers_service.answer(
            target, name, subject, private, artifact_type, query
        )

    async def all_referrers(
        self,
        name: Name,
        subject: Digest,
        namespace: str | None = None,
        principal: Principal = ANONYMOUS,
    ) -> list[dict[str, Any]]:
        """Every referrer of `subject`, all pages (for warm), with the access rules."""
        target = self.router.route(name, namespace)
        private = await self.access.authorize(principal, target)
        return await self.referrers_service.all_descriptors(target, subject, private)

    async def tag_manifest(
        self, target: Target, tag: Tag, private: bool
    ) -> tuple[bytes, str, Digest]:
        """A tag's manifest pulled as any tag is (for the tag scheme's signature tags)."""
        answer = await self._manifest_by_tag(target, tag, list(ALL_MANIFESTS), private)
        m = answer.manifest
        return m.data, m.media_type, m.digest

    async def referrer_descriptors(
        self, target: Target, subject: Digest, private: bool
    ) -> list[dict[str, Any]]:
        """Every referrer of `subject` (all pages), for the signature policy and warm."""
        return await self.referrers_service.all_descriptors(target, subject, private)

    async def manifest_by_digest(self, target: Target, digest: Digest, private: bool) -> bytes:
        """A manifest's bytes by digest: cached, or fetched from the target (verified)."""
        cached = await self.cached_manifest(digest)
        if cached is not None:
            return cached.data
        if self.offline:
            raise offline_miss("MANIFEST_UNKNOWN", "manifest")
        return (await self._fetch_manifest(target, digest, list(ALL_MANIFESTS), private)).data

    async def small_blob(
        self, target: Target, digest: Digest, private: bool, limit: int
    ) -> bytes | None:
        """A small blob's bytes (a signature payload), cached so an offline node can check it
        again; None if it is larger than `limit`."""
        data = await self.store.read_bytes(digest, limit)
        if data is not None or await self.store.stat(digest) is not None:
            return data
        if self.offline:
            raise offline_miss("BLOB_UNKNOWN", "blob")
        stream = await _open_upstream(target.upstream, target.name, digest)
        received = bytearray()
        async with contextlib.aclosing(verified(stream.chunks(), digest, stream.close)) as chunks:
            async for chunk in chunks:
                received += chunk
                if len(received) > limit:
                    return None
        await self._record(target, [digest], private)
        await self.keep_bytes(digest, bytes(received))
        return bytes(received)

    async def keep_bytes(self, digest: Digest, data: bytes) -> None:
        """Store verified bytes by digest, here and in a cluster's shared store."""
        await self._keep_manifest(digest, data)
        await self.shared.put_manifest(digest, data)

    # -- blobs ------------------------------------------------------------------------------

    async def blob(
        self,
        name: Name,
        digest: Digest,
        *,
        whole: bool = False,
        ranged: bool = False,
        namespace: str | None = None,
        principal: Principal = ANONYMOUS,
    ) -> BlobAnswer:
        """A blob to serve. On a miss, join or start its fill; `whole` waits for the commit
        (a warm). `ranged`: the caller sends byte ranges, so it needs the size before the
        first byte; a fill that has it is tailed (bytes already in go at once), one whose
        upstream did not say is awaited. Any answer may serve ranges (see web/responses.py)."""
        target = self.router.route(name, namespace)
        private = await self.access.authorize(principal, target)
        verdict = await self.provenance.check(
            target, digest, private=private, principal=principal, kind="blob"
        )
        if verdict is Verdict.PROVE:
            return await self._blob_from_target_only(target, digest, private, whole, ranged)
        cached = await self.store.open_for_serving(digest)
        if cached is not None:
            self._touch(digest)
            return BlobAnswer(cached.size, "hit", file=cached)
        if self.offline:
            raise offline_miss("BLOB_UNKNOWN", "blob")
        if not whole:  # the shared store answers ranges itself, a stream is cut to them
            url = await self.shared.presigned(digest)
            if url is not None:
                return BlobAnswer(None, "hit", redirect=url)
            stream = await self.shared.direct_stream(digest)  # no local tier
            if stream is not None:
                chunks = verified(stream.chunks(), digest, stream.close)
                return BlobAnswer(stream.size, "hit", stream=chunks)
        if self.disk.bypassing or self.shared.store_down:
            return await self._pass_through(target.upstream, target.name, digest)
        fill, started = self._join_fill(target, digest)
        # Joining a fill whose bytes all verified already costs no upstream traffic: a hit.
        result: CacheResult = "miss" if started else "hit" if fill.verified else "joined"
        try:
            answer = await self._follow_fill(fill, result, whole, ranged)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            return await self._pass_through(target.upstream, target.name, digest)
        if answer is not None:
            return answer
        cached = await self.store.open_for_serving(digest)
        if cached is None:
            raise RegistryError("BLOB_UNKNOWN", "blob vanished from the cache", {"digest": digest})
        if started and not fill.fetched:
            # Our fill found the blob committed by one that ended after our own look: no fetch.
            result = "hit"
        return BlobAnswer(cached.size, result, file=cached)

    async def _follow_fill(
        self, fill: FillBase, result: CacheResult, whole: bool, ranged: bool = False
    ) -> BlobAnswer | None:
        """A reader of the fill's bytes, or None once they are in the store (read it there).
        A range needs the size: a fill of unknown size is awaited whole."""
        if whole:
            await fill.wait_done()
            return None
        await fill.wait_started()
        if ranged and fill.size is None:
            await fill.wait_done()
            return None
        reader = fill.open_reader()
        return None if reader is None else BlobAnswer(fill.size, result, reader=reader)

    async def _blob_from_target_only(
        self, target: Target, digest: Digest, private: bool, whole: bool, ranged: bool = False
    ) -> BlobAnswer:
        """`Verdict.PROVE`: the client gets the target upstream's own bytes, verified, and
        nothing else: no cached copy, no other request's fill, no peer or shared store. Once
        they matched, the target is recorded as holding the digest. If the blob is not cached
        and nobody is filling it, this fill caches it too."""
        upstream, name = target.upstream, target.name
        opened = False

        async def open_body(offset: int) -> UpstreamBody:
            nonlocal opened
            stream = await _open_upstream(upstream, name, digest, offset)
            opened = True
            return UpstreamBody(stream.size, stream.chunks(), stream.close)

        async def proven() -> None:
            await self._record(target, [digest], private)

        def committed(_task: object) -> None:
            if fill.fetched:
                task = asyncio.ensure_future(proven())
                self._background.add(task)
                task.add_done_callback(self._background.discard)

        free = not self.offline and not self.disk.bypassing
        if free and await self.store.stat(digest) is None:
            # A partial resumed here came from this same target: all the bytes are its own.
            fill, started = self.fills.join(digest, open_body, _source(target))
            if started and fill.task is not None:
                fill.task.add_done_callback(lambda _t: self._fill_ended(fill))
                fill.task.add_done_callback(committed)
                await fill.wait_started()
                if opened:  # the bytes in this fill are the target's own
                    answer = await self._follow_fill(fill, "miss", whole, ranged)
                    answer = answer or await self._open_fetched(fill)
                    if answer is not None:
                        return answer
        self.metrics.cache_bypassed.inc()
        stream = await _open_upstream(upstream, name, digest)
        chunks = verified(stream.chunks(), digest, stream.close, on_match=proven)
        return BlobAnswer(stream.size, "bypass", stream=chunks)

    async def _open_fetched(self, fill: FillBase) -> BlobAnswer | None:
        """The store's copy of a blob this request's own fill committed."""
        if not fill.fetched:
            return None
        cached = await self.store.open_for_serving(fill.digest)
        return None if cached is None else BlobAnswer(cached.size, "miss", file=cached)

    async def _pass_through(
        self, upstream: UpstreamClient, name: Name, digest: Digest
    ) -> BlobAnswer:
        """The cache cannot take bytes: stream the upstream's straight to the client."""
        self.metrics.cache_bypassed.inc()
        stream = await _open_upstream(upstream, name, digest)
        return BlobAnswer(
            stream.size, "bypass", stream=verified(stream.chunks(), digest, stream.close)
        )

    # -- what the page, the commands and the peer endpoint may ask ----------------------------

    async def is_cached(self, digest: Digest) -> bool:
        """Whether the blob (or manifest) is committed on this node (no recency, no checks)."""
        return await self.store.stat(digest) is not None

    async def fills_in_flight(self) -> list[FillView]:
        """Every fill on this node: this process's, and other workers' from their temp files."""
        views = [
            FillView(f.digest, f.written, f.size, f.state.value, isinstance(f, RemoteFill))
            for f in sorted(self.fills.in_flight(), key=lambda f: f.digest)
        ]
        seen = {v.digest for v in views}
        for digest, declared, written in await asyncio.to_thread(self.store.partials):
            if digest not in seen:
                seen.add(digest)
                views.append(FillView(digest, written, declared, "streaming", True))
        return views

    def bytes_filling(self) -> int:
        """Bytes this process's fills have written so far (a warm's progress)."""
        return sum(f.written for f in self.fills.in_flight())

    async def local_fill(self, digest: Digest) -> FillBase | None:
        """A fill of `digest` on this node, in this process or (followed) in another worker's;
        None if none is running (for another node's peer request: it never fetches)."""
        fill = self.fills.get(digest)
        if fill is None and await asyncio.to_thread(self.store.find_partial, digest) is not None:
            # The fill lock decides; if no worker holds it any more, the fill ended.
            fill, _ = self.fills.join(digest, _never_fetch)
        return fill

    async def open_cached(self, digest: Digest) -> OpenBlob | None:
        """The committed file to send (no recency, no checks: the peer endpoint's)."""
        return await self.store.open_for_serving(digest)

    def refresh_gauges(self) -> None:
        """Set the gauges that describe state (at scrape time and once a second)."""
        size, entries = self.index.totals()
        self.metrics.cache_size.set(size)
        self.metrics.cache_entries.set(entries)
        self.metrics.fills_in_flight.set(len(self.fills))

    def forget_manifests(self, digests: Iterable[Digest]) -> None:
        """Drop evicted manifests from memory, so they are not answered as still cached (and
        stop prefetching their blobs)."""
        digests = list(digests)
        for digest in digests:
            self._manifests.pop(digest, None)
        self.prefetcher.cancel(digests)

    async def _prefetch_blob(self, target: Target, digest: Digest, private: bool) -> Outcome:
        """Fetch one blob of an image just served into the cache as a client's GET would (the
        same provenance check, the same fill, shared with the cluster), sending it nowhere."""
        if await self.store.stat(digest) is not None or self.fills.get(digest) is not None:
            return "cached"
        if self.disk.bypassing or self.shared.store_down or await self.shared.entry(digest):
            return "cached"  # the shared store holds it (or the cache cannot take it now)
        verdict = await self.provenance.check(
            target, digest, private=private, principal=ANONYMOUS, kind="blob"
        )
        if verdict is not Verdict.SERVE:
            return "skipped"  # only a client's own fetch may prove it (see provenance)
        fill, started = self._join_fill(target, digest)
        await fill.wait_done()
        return "fetched" if started and fill.fetched else "cached"

    def _join_fill(self, target: Target, digest: Digest) -> tuple[FillBase, bool]:
        """The digest's fill (a client's GET, a prefetch), started here if none runs: its
        bytes from the shared store, the node filling it, or the target's upstream (one node:
        the upstream), resumable from any offset; and whether this call started it."""
        upstream, name = target.upstream, target.name

        async def from_upstream(offset: int = 0) -> ByteSource:
            return await _open_upstream(upstream, name, digest, offset)

        async def open_body(offset: int) -> UpstreamBody:
            return await self.shared.open_body(digest, from_upstream, lambda: fill, offset)

        fill, started = self.fills.join(digest, open_body, _source(target))
        if started and fill.task is not None:
            fill.task.add_done_callback(lambda _t: self._fill_ended(fill))
        return fill, started

    def _blob_committed(self, digest: Digest, size: int) -> None:
        self.index.add(digest, size, "blob")
        self.disk.committed(digest)

    def _fill_ended(self, fill: FillBase) -> None:
        if fill.error is not None and is_disk_full(fill.error):
            self.disk.trip(fill.error)

    async def manifest_bytes(self, digest: Digest) -> bytes | None:
        """A cached manifest's bytes from memory, disk or the shared store, without recency
        (for pins, which must not keep themselves warm)."""
        manifest = self._manifests.get(digest)
        if manifest is not None:
            return manifest.data
        limit = self.router.default.config.manifest_max_size
        data = await self.store.read_bytes(digest, limit)
        if data is None:  # pinned by another node, say
            data = await self.shared.get_manifest(digest, limit)
        return data

    async def blob_size(
        self,
        name: Name,
        digest: Digest,
        namespace: str | None = None,
        principal: Principal = ANONYMOUS,
    ) -> tuple[int | None, CacheResult]:
        """For HEAD: the cached size, or the upstream's answer (nothing is fetched)."""
        target = self.router.route(name, namespace)
        private = await self.access.authorize(principal, target)
        size = await self.store.stat(digest)
        if size is not None:
            verdict = await self.provenance.check(
                target, digest, private=private, principal=principal, kind="blob"
            )
            if verdict is Verdict.SERVE:
                return size, "hit"
        elif self.offline:
            raise offline_miss("BLOB_UNKNOWN", "blob")
        # The upstream's own answer: a claim that says nothing about the cached copy, so it
        # is not recorded as provenance (a GET then proves or confirms it).
        return await target.upstream.head_blob(target.name, digest), "bypass"

    # -- tags list --------------------------------------------------------------------------

    async def tags(
        self,
        name: Name,
        params: dict[str, str],
        namespace: str | None = None,
        principal: Principal = ANONYMOUS,
    ) -> TagList:
        """One page of the repository's tags, paged by the mirror itself (lexical order, `n`,
        `last`: see tag_pages.py) over the upstream's whole list, whatever order or page
        size the upstream uses. Offline, over the tags the cache holds."""
        target = self.router.route(name, namespace)
        await self.access.authorize(principal, target)
        if self.offline:
            return await self._cached_tags(target, name, params)
        tags = await target.upstream.all_tags(target.name)
        return _tag_list(name, target.repository, tags, params)

    async def _cached_tags(self, target: Target, name: Name, params: dict[str, str]) -> TagList:
        repo = target.repository
        upstream = target.upstream.name
        records = await asyncio.to_thread(lambda: list(self.metadata.iter_tags()))
        tags = [t for (up, r, t), _ in records if up == upstream and r == repo]
        if not tags:
            raise RegistryError("NAME_UNKNOWN", "the mirror is offline and has no tags cached")
        return _tag_list(name, repo, tags, params)


def _tag_list(name: Name, repository: str, tags: list[str], params: dict[str, str]) -> TagList:
    n = int(params["n"]) if "n" in params else None
    page = tag_page(name, tags, n, params.get("last"))
    body = json.dumps({"name": repository, "tags": page.tags}).encode()
    return TagList(body, "application/json", page.link)


def _source(target: Target) -> str:
    """Where a fill's bytes come from, for resuming its partial only from the same place:
    the provenance key, and the upstream's URL (an upstream renamed or re-pointed between
    runs is another source)."""
    return f"{target.key} {target.upstream.base_url}"


async def _open_upstream(
    upstream: UpstreamClient, name: Name, digest: Digest, offset: int = 0
) -> ResumingSource:
    """The upstream's blob from `offset`, resumed where it breaks (as many times as the
    upstream's `retries`): every reader of the upstream goes through here."""

    async def opener(at: int, if_range: str | None) -> BlobStream:
        return await upstream.open_blob(name, digest, at, if_range)

    return await ResumingSource.open(digest, opener, offset, attempts=upstream.config.retries)


async def verified(
    chunks: AsyncIterator[Chunk],
    digest: Digest,
    close: Callable[[], Awaitable[None]],
    on_match: Callable[[], Awaitable[None]] | None = None,
) -> AsyncGenerator[Chunk, None]:
    """Pass bytes on as they come, but release the last one only once the digest matched
    (and `on_match` ran)."""
    sha = hashlib.sha256()
    held: Chunk = b""
    try:
        async for chunk in chunks:
            if held:
                yield held
            sha.update(chunk)
            held = chunk
        actual = "sha256:" + sha.hexdigest()
        if actual != digest:
            log.warning("digest_mismatch", digest=digest, actual=actual, cache="bypass")
            raise DigestMismatch(digest, actual)
        if on_match is not None:
            await on_match()
        if held:
            yield held
    finally:
        await close()
