"""`Mirror`: the caching policy between the web layer and the cache/upstream mechanisms.

Manifests by digest and blobs are immutable: once verified and stored they are answered from the
cache forever (until evicted). A tag is answered from its record while younger than `tag_ttl`,
then revalidated with a HEAD (free on Docker Hub's pull limit) and refetched only if the digest
moved. Misses are single-flight: one upstream fetch per manifest or blob however many ask.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import structlog
from cachetools import LRUCache, TTLCache

from mirror.access import ANONYMOUS, Policy, Principal
from mirror.cache.blobs import FilesystemBlobStore, OpenBlob, is_disk_full
from mirror.cache.fill import FillBase, FillManager, TailReader, UpstreamBody
from mirror.cache.index import CacheIndex
from mirror.cache.locks import FileLocks
from mirror.cache.metadata import MetadataStore, Privacy, RepoKey, TagKey, TagRecord
from mirror.cluster import Cluster
from mirror.errors import DigestMismatch, RegistryError, UpstreamError
from mirror.mediatypes import ALL_MANIFESTS, accepts, manifest_doc, sniff_media_type
from mirror.metrics import Metrics
from mirror.provenance import Provenance, Verdict
from mirror.reference import SHA256_RE, Digest, Name, Tag, is_digest, parse_image
from mirror.singleflight import SingleFlight
from mirror.upstream.client import BlobStream, FetchedManifest, TagList, UpstreamClient
from mirror.upstream.routing import Router, Target

log = structlog.get_logger(__name__)

CacheResult = Literal["hit", "miss", "revalidated", "joined", "bypass", "stale"]
MANIFEST_MEMORY_BYTES = 64 * 1024 * 1024
FULL_RETRY_SECONDS = 30.0  # while the disk is full, try caching again this often
PRIVACY_TTL = 3600.0  # how long a repository's private/public status is trusted
PROBED_REPOSITORIES = 10_000  # privacy answers held in memory until content proves the repo


@dataclass(frozen=True)
class Manifest:
    data: bytes
    media_type: str
    digest: Digest


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
    stream: AsyncGenerator[bytes, None] | None = None
    redirect: str | None = None  # a presigned URL of the shared store (cluster option)


def upstream_trouble(exc: BaseException) -> bool:
    """Failures that say nothing about the content (unreachable, 5xx, rate limit), as opposed
    to real answers such as 404: a cached tag may be served stale through these."""
    return isinstance(exc, UpstreamError) or (
        isinstance(exc, RegistryError) and exc.code == "TOOMANYREQUESTS"
    )


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
        cluster: Cluster | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.cluster = cluster  # several nodes on a shared store and Redis (None: one node)
        if cluster is not None:
            cluster.drop_local = self._drop_local
        self.policy = policy or Policy()
        self.offline = offline  # never contact an upstream
        locks = FileLocks(store.root / "locks")
        locks.setup()
        self.store = store
        self.metadata = metadata
        self.index = index
        self.fills = FillManager(store, locks, on_commit=self._blob_committed)
        self.router = router
        self.clock = clock
        self.full_until = 0.0  # while clock() < this, blob misses bypass the cache
        self._manifests: LRUCache[Digest, Manifest] = LRUCache(
            MANIFEST_MEMORY_BYTES, getsizeof=lambda m: len(m.data) + 256
        )
        self._manifest_flight: SingleFlight[tuple[str, ...], FetchedManifest] = SingleFlight()
        self._revalidate_flight: SingleFlight[TagKey, bool] = SingleFlight()
        self._privacy_flight: SingleFlight[RepoKey, bool] = SingleFlight()
        # A probe's answer stays in memory only: a repository is written down (durably) once
        # content came from it, so requests for names that do not exist leave no record.
        self._probed: TTLCache[RepoKey, Privacy] = TTLCache(
            PROBED_REPOSITORIES, PRIVACY_TTL, timer=clock
        )
        # Private content exists only where the mirror holds upstream credentials, and
        # anyone may name a registry of their own with `allow_any_upstream`; with neither,
        # every digest is public and no provenance is kept.
        guarded = router.allow_any or any(
            u.config.has_credentials for u in router.upstreams.values()
        )
        self.provenance = Provenance(metadata, self.policy, guarded=guarded, offline=offline)
        self._background: set[asyncio.Future[None]] = set()  # records made after a fill

    @property
    def guarded(self) -> bool:
        return self.provenance.guarded

    def may_pull(self, principal: Principal, upstream: str, repository: str) -> bool:
        """Whether `principal` may pull `repository` (as `upstream` names it) here, as far as
        known without asking the upstream (for listings of what the cache holds)."""
        client = self.router.upstreams.get(upstream)
        private = True
        if client is None or not client.config.has_credentials:
            private = False
        else:
            known = self.metadata.cached_privacy((upstream, repository))
            private = True if known is None else known.private
        return self.policy.allows(principal, upstream, repository, private=private)

    # -- access -----------------------------------------------------------------------------

    async def _authorize(self, principal: Principal, target: Target) -> bool:
        """Refuse a client the policy does not let pull `target`; True if it is private."""
        private = await self._is_private(target)
        upstream, repository = target.upstream.name, target.repository
        if self.policy.allows(principal, upstream, repository, private=private):
            return private
        detail = {"repository": target.key}
        if principal.authenticated:
            raise RegistryError("DENIED", "you may not pull this repository", detail)
        raise RegistryError("UNAUTHORIZED", "authentication required to pull this", detail)

    async def _is_private(self, target: Target) -> bool:
        """Whether anonymous upstream access cannot read `target` (then only clients the
        policy names may): asked of the upstream without credentials, remembered an hour."""
        upstream = target.upstream
        if not upstream.config.has_credentials:
            return False
        key: RepoKey = (upstream.name, target.repository)
        probed = self._probed.get(key)
        if probed is not None:
            return probed.private
        known = await self.metadata.get_privacy(key)
        if known is not None and (self.offline or self.clock() - known.checked_at < PRIVACY_TTL):
            return known.private
        if self.offline:
            return True

        async def probe() -> bool:
            public = await upstream.anonymous_can_read(target.name)
            # Recorded inside the flight, so a request arriving as it ends finds the answer.
            self._probed[key] = Privacy(not public, self.clock())
            return public

        try:
            public = await self._privacy_flight.do(key, probe)
        except Exception as exc:
            if not upstream_trouble(exc):
                raise
            return True if known is None else known.private
        return not public

    async def _record(self, target: Target, digests: list[Digest], private: bool) -> None:
        """`target` holds `digests`, on evidence (see `provenance`); the repository exists, so
        its privacy answer is kept durably now."""
        await self.provenance.record(target, digests, private=private)
        key: RepoKey = (target.upstream.name, target.repository)
        probed = self._probed.pop(key, None)
        if probed is not None:
            await self.metadata.put_privacy(key, probed)

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
        private = await self._authorize(principal, target)
        if is_digest(reference):
            digest = Digest(reference)
            cached = await self.cached_manifest(digest)
            if cached is not None:
                verdict = await self.provenance.check(
                    target, digest, private=private, principal=principal, kind="manifest"
                )
                if verdict is Verdict.SERVE:
                    return ManifestAnswer(cached, "hit")
                # Only the target's own verified copy proves it holds this manifest.
                fetched = await self._fetch_manifest(target, digest, accept, private)
                return ManifestAnswer(fetched, "bypass")
            if self.offline:
                raise offline_miss("MANIFEST_UNKNOWN", "manifest")
            fetched = await self._fetch_manifest(target, digest, accept, private)
            return ManifestAnswer(fetched, "miss")
        return await self._manifest_by_tag(target, Tag(reference), accept, private)

    async def _manifest_by_tag(
        self, target: Target, tag: Tag, accept: list[str], private: bool
    ) -> ManifestAnswer:
        upstream, name = target.upstream, target.name
        key: TagKey = (upstream.name, target.repository, tag)
        broad = _takes_everything(accept)
        record = await self.metadata.get_tag(key)
        cached = None
        if record is not None and accepts(accept, record.media_type):
            cached = await self.cached_manifest(record.digest)
        if cached is not None and record is not None:
            if self.offline or self.clock() - record.fetched_at < upstream.config.tag_ttl:
                return ManifestAnswer(cached, "hit")
            try:
                if await self._revalidate_flight.do(
                    key, lambda: self._revalidate(upstream, name, key, record)
                ):
                    return ManifestAnswer(cached, "revalidated")
            except Exception as exc:
                if not upstream_trouble(exc):
                    raise
                return self._stale(cached, key, exc)
        if self.offline:
            raise offline_miss("MANIFEST_UNKNOWN", "tag")
        try:
            fetched = await self._fetch_manifest(target, tag, accept, private)
        except Exception as exc:
            if cached is None or not upstream_trouble(exc):
                raise
            return self._stale(cached, key, exc)
        if not broad:
            # A narrow client may get another manifest (e.g. one platform): don't record it.
            return ManifestAnswer(fetched, "bypass")
        await self.metadata.put_tag(
            key, TagRecord(fetched.digest, fetched.media_type, self.clock())
        )
        return ManifestAnswer(fetched, "miss")

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

    async def _revalidate(
        self, upstream: UpstreamClient, name: Name, key: TagKey, record: TagRecord
    ) -> bool:
        """HEAD the tag upstream; if it still names our digest, restart its TTL."""
        head = await upstream.head_manifest(name, key[2], list(ALL_MANIFESTS))
        if head.digest != record.digest:
            log.info("tag_moved", upstream=key[0], repository=key[1], tag=key[2])
            return False
        await self.metadata.put_tag(key, TagRecord(record.digest, record.media_type, self.clock()))
        return True

    async def cached_manifest(self, digest: Digest) -> Manifest | None:
        manifest = self._manifests.get(digest)
        if manifest is not None:
            self._touch(digest)
            return manifest
        # Bounded by the manifest limit: a layer's digest asked for as a manifest is not read.
        limit = self.router.default.config.manifest_max_size
        data = await self.store.read_bytes(digest, limit)
        if data is None and self.cluster is not None:
            data = await self.cluster.get_manifest(digest, limit)  # stored by another node
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
        if self.cluster is not None:
            self.cluster.touched(digest)

    async def _fetch_manifest(
        self, target: Target, reference: str, accept: list[str], private: bool
    ) -> Manifest:
        """One upstream GET however many ask at once; stored by digest before it is answered."""
        upstream = target.upstream
        key = (upstream.name, target.repository, reference, *sorted(accept))

        async def fetch() -> FetchedManifest:
            fetched = await upstream.get_manifest(target.name, reference, accept)
            # Verified bytes from this repository; what the manifest references proves nothing.
            await self._record(target, [fetched.digest], private)
            await self.metadata.put_media_type(fetched.digest, fetched.media_type)
            await self._keep_manifest(fetched.digest, fetched.data)
            if self.cluster is not None:
                await self.cluster.put_manifest(fetched.digest, fetched.data)
            return fetched

        fetched = await self._manifest_flight.do(key, fetch)
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
            self._disk_full(exc)  # still answer: the bytes are verified, just not kept

    # -- blobs ------------------------------------------------------------------------------

    async def blob(
        self,
        name: Name,
        digest: Digest,
        *,
        whole: bool = False,
        namespace: str | None = None,
        principal: Principal = ANONYMOUS,
    ) -> BlobAnswer:
        """A blob to serve. On a miss, join or start its fill; `whole` waits for the commit
        (for range requests, which must not be answered from unverified bytes). A pass-through
        answer (disk full) is always the whole blob."""
        target = self.router.route(name, namespace)
        private = await self._authorize(principal, target)
        verdict = await self.provenance.check(
            target, digest, private=private, principal=principal, kind="blob"
        )
        if verdict is Verdict.PROVE:
            return await self._blob_from_target_only(target, digest, private, whole)
        cached = await self.store.open_for_serving(digest)
        if cached is not None:
            self._touch(digest)
            return BlobAnswer(cached.size, "hit", file=cached)
        if self.offline:
            raise offline_miss("BLOB_UNKNOWN", "blob")
        if self.cluster is not None and not whole:
            url = await self.cluster.presigned(digest)
            if url is not None:
                return BlobAnswer(None, "hit", redirect=url)
            stream = await self.cluster.direct_stream(digest)  # no local tier
            if stream is not None:
                chunks = verified(stream.chunks(), digest, stream.close)
                return BlobAnswer(stream.size, "hit", stream=chunks)
        upstream, name = target.upstream, target.name
        if self.clock() < self.full_until or (self.cluster is not None and self.cluster.store_down):
            return await self._pass_through(upstream, name, digest)

        async def from_upstream(offset: int = 0) -> BlobStream:
            return await upstream.open_blob(name, digest, offset)

        async def open_body() -> UpstreamBody:
            if self.cluster is not None:  # the shared store, the node filling it, or upstream
                return await self.cluster.open_body(digest, from_upstream, lambda: fill)
            stream = await from_upstream()
            return UpstreamBody(stream.size, stream.chunks(), stream.close)

        fill, started = self.fills.join(digest, open_body)
        if started and fill.task is not None:
            fill.task.add_done_callback(lambda _t: self._fill_ended(fill))
        # Joining a fill whose bytes all verified already costs no upstream traffic: a hit.
        result: CacheResult = "miss" if started else "hit" if fill.verified else "joined"
        try:
            answer = await self._follow_fill(fill, result, whole)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            return await self._pass_through(upstream, name, digest)
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
        self, fill: FillBase, result: CacheResult, whole: bool
    ) -> BlobAnswer | None:
        """A reader of the fill's bytes, or None once they are in the store (read it there)."""
        if whole:
            await fill.wait_done()
            return None
        await fill.wait_started()
        reader = fill.open_reader()
        return None if reader is None else BlobAnswer(fill.size, result, reader=reader)

    async def _blob_from_target_only(
        self, target: Target, digest: Digest, private: bool, whole: bool
    ) -> BlobAnswer:
        """`Verdict.PROVE`: the client gets the target upstream's own bytes, verified, and
        nothing else: no cached copy, no other request's fill, no peer or shared store. Once
        they matched, the target is recorded as holding the digest. If the blob is not cached
        and nobody is filling it, this fill caches it too."""
        upstream, name = target.upstream, target.name
        opened = False

        async def open_body() -> UpstreamBody:
            nonlocal opened
            stream = await upstream.open_blob(name, digest)
            opened = True
            return UpstreamBody(stream.size, stream.chunks(), stream.close)

        async def proven() -> None:
            await self._record(target, [digest], private)

        def committed(_task: object) -> None:
            if fill.fetched:
                task = asyncio.ensure_future(proven())
                self._background.add(task)
                task.add_done_callback(self._background.discard)

        free = not self.offline and self.clock() >= self.full_until
        if free and await self.store.stat(digest) is None:
            fill, started = self.fills.join(digest, open_body)
            if started and fill.task is not None:
                fill.task.add_done_callback(lambda _t: self._fill_ended(fill))
                fill.task.add_done_callback(committed)
                await fill.wait_started()
                if opened:  # the bytes in this fill are the target's own
                    answer = await self._follow_fill(fill, "miss", whole)
                    answer = answer or await self._open_fetched(fill)
                    if answer is not None:
                        return answer
        self.metrics.cache_bypassed.inc()
        stream = await upstream.open_blob(name, digest)
        chunks = verified(stream.chunks(), digest, stream.close, on_match=proven)
        return BlobAnswer(stream.size, "bypass", stream=chunks)

    async def _open_fetched(self, fill: FillBase) -> BlobAnswer | None:
        """The store's copy of a blob this request's own fill committed."""
        if not fill.fetched:
            return None
        cached = await self.store.open_for_serving(fill.digest)
        return None if cached is None else BlobAnswer(cached.size, "miss", file=cached)

    async def _drop_local(self, digest: Digest) -> None:
        """Forget this node's copy of a blob (readers holding it open keep their bytes)."""
        await self.store.delete(digest)
        await asyncio.to_thread(self.index.remove, [digest])

    async def _pass_through(
        self, upstream: UpstreamClient, name: Name, digest: Digest
    ) -> BlobAnswer:
        """The cache cannot take bytes: stream the upstream's straight to the client."""
        self.metrics.cache_bypassed.inc()
        stream = await upstream.open_blob(name, digest)
        return BlobAnswer(
            stream.size, "bypass", stream=verified(stream.chunks(), digest, stream.close)
        )

    def refresh_gauges(self) -> None:
        """Set the gauges that describe state (at scrape time and once a second)."""
        size, entries = self.index.totals()
        self.metrics.cache_size.set(size)
        self.metrics.cache_entries.set(entries)
        self.metrics.fills_in_flight.set(len(self.fills))

    def forget_manifests(self, digests: Iterable[Digest]) -> None:
        """Drop evicted manifests from memory, so they are not answered as still cached."""
        for digest in digests:
            self._manifests.pop(digest, None)

    def _blob_committed(self, digest: Digest, size: int) -> None:
        self.index.add(digest, size, "blob")
        if self.full_until:
            self.full_until = 0.0
            log.info("cache_space_returned", digest=digest)

    def _fill_ended(self, fill: FillBase) -> None:
        if fill.error is not None and is_disk_full(fill.error):
            self._disk_full(fill.error)

    def _disk_full(self, exc: BaseException) -> None:
        """Start (or extend) a disk-full episode; logged once per episode."""
        if not self.full_until:
            log.warning("cache_full", error=str(exc), retry_in=FULL_RETRY_SECONDS)
        self.full_until = self.clock() + FULL_RETRY_SECONDS

    # -- pins -------------------------------------------------------------------------------

    async def pinned_digests(self, pins: Iterable[str]) -> set[Digest]:
        """Every manifest and blob digest of the pinned images that the cache knows of."""
        out: set[Digest] = set()
        for pin in pins:
            name, reference = parse_image(pin)
            if is_digest(reference):
                await self.collect_digests(Digest(reference), out)
                continue
            target = self.router.route(name)
            record = await self.metadata.get_tag(
                (target.upstream.name, target.repository, reference)
            )
            if record is not None:
                await self.collect_digests(record.digest, out)
        return out

    async def collect_digests(self, digest: Digest, out: set[Digest]) -> None:
        """Add `digest` and, for a cached manifest, everything it references, to `out`."""
        if digest in out:
            return
        out.add(digest)
        manifest = self._manifests.get(digest)  # not cached_manifest: no recency for pins
        limit = self.router.default.config.manifest_max_size
        data = manifest.data if manifest else await self.store.read_bytes(digest, limit)
        if data is None and self.cluster is not None:  # pinned by another node, say
            data = await self.cluster.get_manifest(digest, limit)
        if data is None:
            return
        children, blobs = _descriptors(data)
        for child in children:
            await self.collect_digests(child, out)
        out.update(blobs)

    async def blob_size(
        self,
        name: Name,
        digest: Digest,
        namespace: str | None = None,
        principal: Principal = ANONYMOUS,
    ) -> tuple[int | None, CacheResult]:
        """For HEAD: the cached size, or the upstream's answer (nothing is fetched)."""
        target = self.router.route(name, namespace)
        private = await self._authorize(principal, target)
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
        """The upstream's tag list, passed through, with its `Link` pointing back at us.
        Offline, the tags the cache holds for the repository."""
        target = self.router.route(name, namespace)
        await self._authorize(principal, target)
        if self.offline:
            return await self._cached_tags(target, name, params)
        listing = await target.upstream.list_tags(target.name, params)
        upstream_path = f"/v2/{target.repository}/tags/list"
        link = listing.link
        if link and upstream_path != f"/v2/{name}/tags/list":
            link = link.replace(upstream_path, f"/v2/{name}/tags/list")
        return TagList(listing.body, listing.content_type, link)

    async def _cached_tags(self, target: Target, name: Name, params: dict[str, str]) -> TagList:
        repo = target.repository
        upstream = target.upstream.name
        records = await asyncio.to_thread(lambda: list(self.metadata.iter_tags()))
        tags = sorted(t for (up, r, t), _ in records if up == upstream and r == repo)
        if not tags:
            raise RegistryError("NAME_UNKNOWN", "the mirror is offline and has no tags cached")
        if "last" in params:
            tags = [t for t in tags if t > params["last"]]
        link = None
        if "n" in params and len(tags) > int(params["n"]):
            tags = tags[: int(params["n"])]
            link = f'</v2/{name}/tags/list?n={params["n"]}&last={tags[-1]}>; rel="next"'
        body = json.dumps({"name": repo, "tags": tags}).encode()
        return TagList(body, "application/json", link)


def _descriptors(data: bytes) -> tuple[list[Digest], list[Digest]]:
    """A manifest's child manifests (of an index) and blobs (config and layers)."""
    doc = manifest_doc(data)
    if doc is None:
        return [], []

    def digests(items: object) -> list[Digest]:
        return [
            Digest(d["digest"])
            for d in (items if isinstance(items, list) else [])
            if isinstance(d, dict) and SHA256_RE.fullmatch(str(d.get("digest")))
        ]

    return digests(doc.get("manifests")), digests([doc.get("config"), *(doc.get("layers") or [])])


def references(data: bytes) -> list[Digest]:
    """Every digest a manifest names directly."""
    children, blobs = _descriptors(data)
    return children + blobs


async def verified(
    chunks: AsyncIterator[bytes],
    digest: Digest,
    close: Callable[[], Awaitable[None]],
    on_match: Callable[[], Awaitable[None]] | None = None,
) -> AsyncGenerator[bytes, None]:
    """Pass bytes on as they come, but release the last one only once the digest matched
    (and `on_match` ran)."""
    sha = hashlib.sha256()
    held = b""
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
