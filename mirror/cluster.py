"""Several nodes, one upstream fetch per blob: a shared store (S3), fill leases (Redis), peers.

Every node keeps the single-node machinery (its disk is a local tier, its fills single-flight
within the node). This module decides where a node's fill gets its bytes:

1. the shared object store, if the blob is already there (a hit for the cluster);
2. else the upstream, if this node wins the blob's fill lease in Redis: it then streams what it
   writes into a multipart upload that is completed only after the digest matched (aborted
   otherwise), so no node ever sees a partial or wrong object; the lease is renewed while the
   fill runs and released when the object is in the store;
3. else the node holding the lease, over its internal endpoint, as the bytes arrive there.

If that node goes away mid-blob, the follower keeps the bytes it has, waits for the lease to
lapse, and continues from the same offset: from the store, from the new owner, or from the
upstream (with `Range`) after taking the lease itself. Its own digest check covers every byte.
Redis down: nodes fetch on their own (logged, metric, readiness says degraded). S3 down: blobs
pass through from the upstream uncached. Neither makes anything partial visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from mirror.cache.eviction import SharedEviction
from mirror.cache.fill import FillBase, UpstreamBody
from mirror.cache.redis_store import RedisIndex, RedisStore, RedisUnavailable
from mirror.cache.s3 import S3BlobStore, S3Unavailable
from mirror.config import Config
from mirror.coordination import Claim, LocalCoordinator, RedisCoordinator
from mirror.errors import UpstreamError
from mirror.health import PROBE_SECONDS, ServiceHealth
from mirror.interfaces import ByteSource, Chunk, FillCoordinator
from mirror.metrics import Metrics
from mirror.reference import Digest
from mirror.upstream.peer import PeerClient

log = structlog.get_logger(__name__)

TOUCH_FLUSH_SECONDS = 1.0  # hits are reported to the shared index this often
SERVING_TTL = 120.0  # a node streaming an object from the store renews its mark this often
FOLLOW_POLL = 0.1  # while waiting for a lease to move
UPLOAD_GRACE_SECONDS = 60.0  # on close, uploads in flight get this long to complete


Stream = ByteSource


@dataclass(frozen=True)
class SharedPolicy:
    """The shared store's eviction settings (`storage.s3.max_size`, `.ttl`; the cache's
    watermarks): 0 budget or ttl means no eviction by that rule."""

    budget: int = 0
    ttl: float = 0.0
    high: float = 0.9
    low: float = 0.8


class Cluster:
    """A node's `SharedTier` in a cluster (see mirror/interfaces.py)."""

    def __init__(
        self,
        *,
        node_url: str,
        lease: float,
        redis: RedisStore | None,
        s3: S3BlobStore | None,
        peers: PeerClient,
        metrics: Metrics,
        drop_local: Callable[[Digest], Awaitable[None]],
        policy: SharedPolicy = SharedPolicy(),
    ) -> None:
        self.node_url = node_url
        self.lease = lease
        self.redis = redis
        self.s3 = s3
        self.peers = peers
        self.metrics = metrics
        self.policy = policy
        # Removes a blob from this node's disk once the shared store has it (no local tier).
        self.drop_local = drop_local
        self.redis_health = ServiceHealth("redis", metrics)
        self.s3_health = ServiceHealth("s3", metrics)
        self._tasks: set[asyncio.Task[None]] = set()
        # The shared store's LRU index lives in Redis (only with both services).
        self.index = RedisIndex(redis) if redis is not None and s3 is not None else None
        # Who fetches each blob: a lease in Redis; without Redis every node on its own.
        self.coordinator: FillCoordinator = (
            LocalCoordinator()
            if redis is None
            else RedisCoordinator(redis, self.redis_health, node_url, lease)
        )
        self._touched: dict[str, float] = {}

    async def start(self) -> None:
        self.peers.open()
        if self.redis is not None:
            try:
                await self.redis.start()
                self.redis_health.ok()
            except RedisUnavailable as exc:
                self.redis_health.failed(exc)
        if self.s3 is not None:
            try:
                await self.s3.start()
                self.s3_health.ok()
            except S3Unavailable as exc:
                self.s3_health.failed(exc)
        self._spawn(self._probe(), "probe")
        if self.index is not None:
            self._spawn(self._flush_touches(), "touches")

    async def close(self) -> None:
        # Uploads in flight finish (bounded): a `warm` that just completed, or a server
        # stopping, should leave its blobs in the shared store, not abort them at the end.
        uploads = [t for t in self._tasks if t.get_name().startswith("upload:")]
        if uploads:
            await asyncio.wait(uploads, timeout=UPLOAD_GRACE_SECONDS)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.coordinator.close()
        await self.peers.close()
        if self.redis is not None:
            await self.redis.close()
        if self.s3 is not None:
            await self.s3.close()

    def status(self) -> dict[str, object]:
        """For /readyz: which shared services this node is working without."""
        out: dict[str, object] = {"node": self.node_url}
        for health, present in ((self.redis_health, self.redis), (self.s3_health, self.s3)):
            if present is not None:
                out[health.name] = "degraded" if health.degraded else "ok"
        return out

    @property
    def store_down(self) -> bool:
        """The shared store is configured but unreachable: pass blobs through uncached (until
        the probe finds it back)."""
        return self.s3 is not None and self.s3_health.degraded

    async def _probe(self) -> None:
        """While a shared service is down, try it again every few seconds."""
        probe_digest = Digest("sha256:" + "0" * 64)
        while True:
            await asyncio.sleep(PROBE_SECONDS)
            redis = self.redis
            if redis is not None and self.redis_health.degraded and await redis.ping():
                self.redis_health.ok()
            if self.s3 is not None and self.s3_health.degraded:
                try:
                    await self.s3.stat(probe_digest)
                except S3Unavailable:
                    continue
                self.s3_health.ok()

    def _spawn(self, coro: Awaitable[None], name: str | None = None) -> None:
        task = asyncio.ensure_future(coro)
        if name:
            task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the shared index: sizes, last served, pins; one node at a time evicts --------------

    def touched(self, digest: Digest) -> None:
        """A hit on this node: the object was used (flushed to the shared index each second)."""
        if self.index is not None:
            self._touched[digest] = time.time()

    async def _flush_touches(self) -> None:
        assert self.index is not None
        while True:
            await asyncio.sleep(TOUCH_FLUSH_SECONDS)
            if not self._touched or not self.redis_health.usable:
                continue
            batch, self._touched = self._touched, {}
            try:
                await self.index.touch(batch)
            except RedisUnavailable as exc:
                self.redis_health.failed(exc)

    async def _stored(self, digest: Digest, size: int, kind: str) -> None:
        if self.index is None:
            return
        try:
            await self.index.add(digest, size, kind, time.time())
        except RedisUnavailable as exc:
            self.redis_health.failed(exc)

    async def evict_shared(
        self,
        pinned: set[Digest],
        *,
        budget: int,
        ttl: float,
        high: float,
        low: float,
        dry_run: bool = False,
    ) -> SharedEviction:
        """One pass over the shared store: objects unserved for `ttl`, then least recently
        served ones past `high` x `budget` down to `low` x `budget`. Skips pinned objects and
        objects some node is streaming now."""
        index, s3 = self.index, self.s3
        assert index is not None and s3 is not None
        size, entries = await index.totals()
        plan = SharedEviction(size_before=size, entries_before=entries, budget=budget)
        now = time.time()
        chosen: set[str] = set()

        async def take(digest: str, length: int, reason: str) -> bool:
            if digest in pinned or digest in chosen or await index.serving(digest):
                return False
            chosen.add(digest)
            plan.victims.append((Digest(digest), length, reason))
            return True

        if ttl:
            for digest, length, _kind, _served in await index.least_recent(
                10_000, before=now - ttl
            ):
                await take(digest, length, "ttl")
        remaining = size - sum(v[1] for v in plan.victims)
        if budget and remaining > high * budget:
            for digest, length, _kind, _served in await index.least_recent(100_000):
                if remaining <= low * budget:
                    break
                if await take(digest, length, "size"):
                    remaining -= length
        if not dry_run:
            for digest, _length, reason in plan.victims:
                await s3.delete(digest)
                await index.remove(digest)
                log.info("shared_store_evicted", digest=digest, reason=reason)
        return plan

    async def lead_eviction(self, pinned: set[Digest]) -> SharedEviction | None:
        """Run `evict_shared` if this node is (or becomes) the one that evicts."""
        if self.index is None or self.redis is None or not self.redis_health.usable:
            return None
        try:
            if not await self.redis.try_lead("evict", self.node_url, 120.0):
                return None
            return await self._evict_policy(pinned, dry_run=False)
        except RedisUnavailable as exc:
            self.redis_health.failed(exc)
        except S3Unavailable as exc:
            self.s3_health.failed(exc)
        return None

    async def evict(self, pinned: set[Digest], *, dry_run: bool) -> SharedEviction | None:
        """The shared store's pass from this node now (`registry-mirror gc`)."""
        if self.index is None:
            return None
        return await self._evict_policy(pinned, dry_run=dry_run)

    async def _evict_policy(self, pinned: set[Digest], *, dry_run: bool) -> SharedEviction:
        p = self.policy
        return await self.evict_shared(
            pinned, budget=p.budget, ttl=p.ttl, high=p.high, low=p.low, dry_run=dry_run
        )

    async def drop(self, digests: list[Digest]) -> list[Digest]:
        """Remove an evicted image's objects from the shared store (not one a node streams)."""
        index, s3 = self.index, self.s3
        if index is None or s3 is None:
            return []
        dropped = []
        try:
            for digest in digests:
                if await index.serving(digest):
                    continue
                removed = await s3.delete(digest)
                await index.remove(digest)
                if removed:
                    dropped.append(digest)
        except RedisUnavailable as exc:
            self.redis_health.failed(exc)
        except S3Unavailable as exc:
            self.s3_health.failed(exc)
        return dropped

    async def set_pins(self, images: list[str], *, pin: bool) -> None:
        """Pins are cluster-wide: kept in the shared index."""
        if self.index is None:
            return
        for image in images:
            await (self.index.pin(image) if pin else self.index.unpin(image))

    async def entry(self, digest: Digest) -> tuple[int, float] | None:
        """(size, last served) from the shared index."""
        if self.index is None or not self.redis_health.usable:
            return None
        try:
            found = await self.index.get(digest)
        except RedisUnavailable as exc:
            self.redis_health.failed(exc)
            return None
        return None if found is None else (found[0], found[3])

    async def verify(self) -> tuple[int, list[Digest]]:
        """Re-hash every object of the shared store; remove the ones that do not match."""
        s3 = self.s3
        if s3 is None:
            return 0, []
        objects = await self.iter_shared()
        bad = []
        for digest, _size in objects:
            body = await s3.open_stream(digest)
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
                await s3.delete(digest)
                if self.index is not None:
                    await self.index.remove(digest)
        return len(objects), bad

    async def presigned(self, digest: Digest) -> str | None:
        """With `presigned_redirects`: a URL to send the client to instead of streaming a
        blob this node does not hold, if the shared store has it."""
        s3 = self.s3
        if s3 is None or not s3.config.presigned_redirects or self.s3_health.degraded:
            return None
        try:
            if await s3.stat(digest) is None:
                return None
            url = await s3.presigned_url(digest)
        except S3Unavailable as exc:
            self.s3_health.failed(exc)
            return None
        self.touched(digest)
        return url

    async def direct_stream(self, digest: Digest) -> Stream | None:
        """Without a local tier: the shared store's bytes for the client, not kept here."""
        if self.s3 is None or self.s3.config.local_tier:
            return None
        return await self._shared_stream(digest, 0)

    async def shared_pins(self) -> list[str]:
        """Images pinned cluster-wide (`registry-mirror pin` on any node)."""
        if self.index is None or not self.redis_health.usable:
            return []
        try:
            return sorted(await self.index.pins())
        except RedisUnavailable as exc:
            self.redis_health.failed(exc)
            return []

    async def iter_shared(self) -> list[tuple[Digest, int]]:
        """Every object in the shared store (for `verify`)."""
        assert self.s3 is not None
        return [item async for item in self.s3.iter_all()]

    # -- manifests: small, kept whole in the shared store too -------------------------------

    async def get_manifest(self, digest: Digest, limit: int) -> bytes | None:
        """A manifest another node stored (checked against its digest), or None."""
        stream = await self._shared_stream(digest, 0)
        if stream is None:
            return None
        data = bytearray()
        try:
            async for chunk in stream.chunks():
                data += chunk
                if len(data) > limit:
                    return None
        except S3Unavailable as exc:
            self.s3_health.failed(exc)
            return None
        finally:
            await stream.close()
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            log.warning("shared_store_corrupt", digest=digest)
            return None
        return bytes(data)

    async def put_manifest(self, digest: Digest, data: bytes) -> None:
        """Store a verified manifest for the other nodes before answering (a few ms, on a
        miss only), so the next node asked for the tag finds it."""
        if self.s3 is None or self.store_down:
            return
        try:
            if await self.s3.stat(digest) is not None:
                return
            upload = await self.s3.begin_upload(digest)
            try:
                await upload.upload_part(data)
                await upload.complete()
            except BaseException:
                await upload.abort()
                raise
        except S3Unavailable as exc:
            self.s3_health.failed(exc)
            return
        await self._stored(digest, len(data), "manifest")

    # -- where a fill's bytes come from ----------------------------------------------------

    async def open_body(
        self,
        digest: Digest,
        upstream: Callable[[int], Awaitable[Stream]],
        fill: Callable[[], FillBase],
        offset: int = 0,
    ) -> UpstreamBody:
        """The bytes for this node's fill of `digest` from `offset`; `upstream(offset)` opens
        the upstream, `fill()` is the fill they feed (for the shared-store upload when this
        node owns it)."""
        body = _ClusterBody(self, digest, upstream, fill, offset)
        await body.open()
        return UpstreamBody(body.size, body.chunks(), body.close)

    async def _shared_stream(self, digest: Digest, offset: int) -> Stream | None:
        if self.s3 is None or self.s3_health.degraded:
            return None
        try:
            found = await self.s3.open_stream(digest, offset)
        except S3Unavailable as exc:
            self.s3_health.failed(exc)
            return None
        self.s3_health.ok()
        if found is None:
            return None
        self.touched(digest)
        return _S3Stream(found, self.metrics, self._serving(digest))

    @contextlib.asynccontextmanager
    async def _serving(self, digest: Digest) -> AsyncIterator[None]:
        """While this node streams `digest` from the store, eviction leaves it alone."""
        marked = False
        if self.index is not None and self.redis_health.usable:
            try:
                await self.index.mark_serving(digest, self.node_url, SERVING_TTL)
                marked = True
            except RedisUnavailable as exc:
                self.redis_health.failed(exc)
        try:
            yield
        finally:
            if marked and self.index is not None:
                with contextlib.suppress(RedisUnavailable):
                    await self.index.done_serving(digest, self.node_url)

    async def claim_fetch(self, key: Digest) -> bool:
        """A manifest fetch's lease: the fill leases' mechanism, under a key no blob has."""
        return (await self.coordinator.claim(key)).mine

    async def release_fetch(self, key: Digest) -> None:
        await self.coordinator.release(key)

    async def _claim(self, digest: Digest) -> Claim:
        return await self.coordinator.claim(digest)

    async def _release(self, digest: Digest) -> None:
        await self.coordinator.release(digest)

    def owned(self, digest: Digest, fill: FillBase) -> None:
        """This node fetches `digest` for the cluster: copy the fill into the shared store as
        it lands, then give the lease back."""
        self._spawn(self._upload(digest, fill), f"upload:{digest}")

    async def _upload(self, digest: Digest, fill: FillBase) -> None:
        upload = None
        reader = None
        try:
            await fill.wait_started()
            reader = fill.open_reader()
            if self.s3 is None or self.store_down:
                await fill.wait_done()
                return
            if reader is None:  # already committed here before we looked: nothing to copy
                return
            # We hold the lease: any other upload of this digest is a dead owner's.
            if await self.s3.abort_uploads(digest):
                log.info("shared_store_dead_upload_aborted", digest=digest)
            # The fill hashes every byte already: no second hash of the same bytes here.
            upload = await self.s3.begin_upload(digest, verify=False)
            part = self.s3.config.part_size
            buf = bytearray()
            async for offset, count in reader.ranges():
                end = offset + count
                while offset < end:
                    data = await reader.read(offset, min(part, end - offset))
                    buf += data
                    offset += len(data)
                    if len(buf) >= part:
                        await upload.upload_part(bytes(buf[:part]))
                        del buf[:part]
            # ranges() ended: every byte is in and the digest matched.
            if buf:
                await upload.upload_part(bytes(buf))
            await upload.complete()
            self.metrics.shared_store_bytes.labels("up").inc(fill.written)
            log.info("shared_store_put", digest=digest, size=fill.written)
            upload = None
            await self._stored(digest, fill.written, "blob")
            if not self.s3.config.local_tier:  # the store has it now: no copy kept here
                await fill.wait_done()
                if fill.task is not None:  # and its commit has been recorded locally
                    await asyncio.wait([fill.task])
                await self.drop_local(digest)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, S3Unavailable):
                self.s3_health.failed(exc)
            log.warning("shared_store_put_failed", digest=digest, error=str(exc)[:200])
        finally:
            if upload is not None:
                with contextlib.suppress(Exception):
                    await upload.abort()
            if reader is not None:
                reader.close()
            await self._release(digest)


class _S3Stream:
    def __init__(
        self, body: Any, metrics: Metrics, serving: contextlib.AbstractAsyncContextManager[None]
    ) -> None:
        self._body = body
        self.size: int | None = body.size
        self._metrics = metrics
        self._serving = serving

    async def chunks(self) -> AsyncIterator[bytes]:
        async with self._serving:
            async for chunk in self._body.chunks:
                self._metrics.shared_store_bytes.labels("down").inc(len(chunk))
                yield chunk

    async def close(self) -> None:
        await self._body.close()


class _ClusterBody:
    """One fill's byte source in a cluster, switching source mid-blob if its source dies."""

    def __init__(
        self,
        cluster: Cluster,
        digest: Digest,
        upstream: Callable[[int], Awaitable[Stream]],
        fill: Callable[[], FillBase],
        start: int = 0,
    ) -> None:
        self.cluster = cluster
        self.digest = digest
        self.start = start  # where this node's fill begins (a resumed partial's end)
        self._upstream = upstream
        self._fill = fill
        self.size: int | None = None
        self.kind = "upstream"
        self._source: Stream | None = None

    async def open(self) -> None:
        self._source = await self._next(self.start)
        self.size = self._source.size

    async def _next(self, offset: int) -> Stream:
        """A source from `offset`: the store, the lease holder, or the upstream (claimed)."""
        cluster = self.cluster
        waited_for: str | None = None
        while True:
            shared = await cluster._shared_stream(self.digest, offset)
            if shared is not None:
                self.kind = "shared"
                return shared
            claim = await cluster._claim(self.digest)
            owner = claim.owner
            if claim.mine:
                if offset > self.start:
                    cluster.metrics.fill_takeovers.inc()
                    log.warning("fill_taken_over", digest=self.digest, offset=offset)
                self.kind = "upstream"
                try:
                    stream = await self._upstream(offset)
                except BaseException:
                    await cluster._release(self.digest)
                    raise
                cluster.owned(self.digest, self._fill())
                return stream
            if owner is not None and owner != cluster.node_url and owner != waited_for:
                try:
                    stream = await cluster.peers.open_blob(owner, self.digest, offset)
                except UpstreamError as exc:
                    # The owner went away without releasing: wait for its lease to lapse.
                    log.info("fill_owner_unreachable", owner=owner, error=exc.message)
                    waited_for = owner
                else:
                    self.kind = "peer"
                    return stream
            await asyncio.sleep(FOLLOW_POLL)

    async def chunks(self) -> AsyncIterator[Chunk]:
        offset = self.start
        while True:
            assert self._source is not None
            try:
                async for chunk in self._source.chunks():
                    offset += len(chunk)
                    yield chunk
                return
            except (UpstreamError, S3Unavailable) as exc:
                if self.kind == "upstream":
                    raise  # the upstream itself failed: the fill fails, as on one node
                log.warning(
                    "fill_source_lost", digest=self.digest, source=self.kind, offset=offset,
                    error=str(exc)[:200],
                )  # fmt: skip
                with contextlib.suppress(Exception):
                    await self._source.close()
                self._source = await self._next(offset)

    async def close(self) -> None:
        if self._source is not None:
            await self._source.close()


def node_url(config: Config) -> str:
    """Where the other nodes reach this one."""
    if config.cluster.advertise_url:
        return config.cluster.advertise_url.rstrip("/")
    host, port = config.listen_address()
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if config.tls.enabled else 'http'}://{host}:{port}"


def shared_policy(config: Config) -> SharedPolicy:
    """The shared store's eviction settings."""
    return SharedPolicy(
        budget=config.storage.s3.max_size,
        ttl=config.storage.s3.ttl,
        high=config.cache.high_watermark,
        low=config.cache.low_watermark,
    )


def build_cluster(
    config: Config, metrics: Metrics, drop_local: Callable[[Digest], Awaitable[None]]
) -> Cluster:
    redis = None
    if config.metadata.kind == "redis":
        redis = RedisStore(config.metadata.redis_url, config.metadata.key_prefix)
    s3 = S3BlobStore(config.storage.s3) if config.storage.kind == "s3" else None
    return Cluster(
        node_url=node_url(config),
        lease=config.cluster.fill_lease,
        redis=redis,
        s3=s3,
        peers=PeerClient(
            config.cluster.secret or "", metrics=metrics, ca_file=config.cluster.ca_file
        ),
        metrics=metrics,
        drop_local=drop_local,
        policy=shared_policy(config),
    )
