"""`open_node(config)`: one node of the mirror, assembled once for `serve` and every command.

The cache directory (`cache.dir`), as the node lays it out (each part's owner in brackets):

    <cache.dir>/
    ├── blobs/sha256/<2 hex>/<64 hex>  blobs and manifests by digest, only ever renamed in
    │                                  after verification                      [cache/blobs.py]
    ├── tmp/<hex>.<size>.<source>.<random>.part
    │                                  fills being written (flocked while their writer lives);
    │                                  a dead writer's is kept to be resumed, within
    │                                  cache.partial_max_age/_size; `.ok`: all bytes matched
    ├── locks/<64 hex>                 a flock per digest: which worker fetches it [cache/locks.py]
    ├── index/entries/, index/meta/    LRU/TTL index, totals and pins (diskcache) [cache/index.py]
    ├── meta/                          tags, media types, provenance, privacy
    │                                  (diskcache)                            [cache/metadata.py]
    ├── hosted/                        hosted repositories: records, uploads  [hosted/content.py]
    ├── token.key                      the key signing client tokens, 0600        [web/auth.py]
    └── metrics/                       per-worker Prometheus files (workers > 1)  [workers.py]

Everything but `blobs/` can be lost: `index/` is rebuilt from the files at start; `meta/` holds
tags (fetched again) and provenance (asked again of the upstream); `tmp/` holds only bytes
that are fetched again if lost.

A single node and a cluster's node differ only in what is wired in here: the shared tier
(`NoSharedTier`, or a `Cluster` of the object store, Redis and peers) and the metadata store
(the node's own, or Redis written through to it). Nothing above this module asks whether it is
in a cluster. The cluster's clients (redis, aiobotocore: the `cluster` extra) are imported only
when the config asks for them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from mirror.access import build_policy
from mirror.cache import sqlite
from mirror.cache.blobs import FilesystemBlobStore
from mirror.cache.eviction import Evictor
from mirror.cache.index import CacheIndex
from mirror.cache.metadata import LocalMetadataStore
from mirror.cache_policy import CachePolicy
from mirror.config import Config
from mirror.hosted.content import HostedContent
from mirror.hosted.records import HostedRecords, LocalHostedRecords
from mirror.hosted.registry import HostedRegistry
from mirror.hosted.shared import NoSharedContent, S3SharedContent, SharedContent
from mirror.hosted.uploads import LocalUploads, SharedUploads, UploadStore
from mirror.interfaces import MetadataStore, SharedTier
from mirror.metrics import Metrics
from mirror.mirror import Mirror
from mirror.reference import Digest
from mirror.shared import NoSharedTier
from mirror.upstream.bandwidth import worker_share
from mirror.upstream.guard import UpstreamNetwork
from mirror.upstream.routing import Router, build_router

STORING_GRACE = 8.0  # seconds at shutdown for fills fetching the rest of a file left behind


@dataclass(frozen=True)
class Node:
    """The assembled services. Callers use `mirror` (pulls), `policy` (pins, eviction) and
    the stores through the commands built on them; the parts are here for those commands."""

    config: Config
    store: FilesystemBlobStore
    metadata: MetadataStore
    index: CacheIndex
    router: Router
    shared: SharedTier
    mirror: Mirror
    evictor: Evictor
    policy: CachePolicy
    metrics: Metrics
    hosted: HostedRegistry


async def _shared_tier(
    config: Config, metrics: Metrics, local: MetadataStore, store: FilesystemBlobStore,
    index: CacheIndex,
) -> tuple[SharedTier, MetadataStore]:  # fmt: skip
    """The cluster's shared tier and metadata for a clustered config; else nothing shared."""
    if not config.clustered:
        return NoSharedTier(), local
    from mirror.cache.redis_store import RedisMetadataStore
    from mirror.cache.tiered import TieredMetadataStore
    from mirror.cluster import build_cluster

    async def drop_local(digest: Digest) -> None:
        """The shared store holds it now and this node keeps no copies (no local tier)."""
        await store.delete(digest)
        await sqlite.run(index.remove, [digest])

    cluster = build_cluster(config, metrics, drop_local)
    await cluster.start()
    if cluster.redis is None:
        return cluster, local
    tiered = TieredMetadataStore(RedisMetadataStore(cluster.redis), local, cluster.redis_health)
    return cluster, tiered


async def _hosted(
    config: Config,
    store: FilesystemBlobStore,
    index: CacheIndex,
    shared: SharedTier,
    clock: Callable[[], float],
) -> HostedRegistry:
    """Hosted repositories: their bytes in the cache's store; records, uploads and commits
    the node's own, or in a cluster with Redis and S3 the cluster's (Redis, the shared store),
    so every node sees a push at once and an upload's chunks may arrive at any node."""
    content = HostedContent(store, config.cache.dir / "hosted")
    await asyncio.to_thread(content.setup)
    records: HostedRecords
    uploads: UploadStore
    shared_content: SharedContent
    redis, s3 = getattr(shared, "redis", None), getattr(shared, "s3", None)
    if redis is not None and s3 is not None:
        from mirror.cluster import node_url
        from mirror.hosted.redis_records import RedisHostedRecords

        owner = node_url(config)
        records = RedisHostedRecords(redis)
        uploads = SharedUploads(content, records, s3, redis, owner, clock=clock)
        shared_content = S3SharedContent(content, s3, redis, owner)
    else:
        records = LocalHostedRecords(content.root / "hosted.db")
        uploads = LocalUploads(content)
        shared_content = NoSharedContent(content)
    logins = config.auth.htpasswd is not None or config.tls.client_ca is not None
    return HostedRegistry(
        config.hosted, records, content, uploads, shared_content, index, build_policy(config),
        logins=logins, clock=clock,
    )  # fmt: skip


@asynccontextmanager
async def open_node(
    config: Config,
    *,
    clock: Callable[[], float] = time.time,
    network: UpstreamNetwork | None = None,
    metrics: Metrics | None = None,
    connect: bool = False,
) -> AsyncIterator[Node]:
    """The node for `config`; `connect` opens the upstream sessions (serving, warming), which
    maintenance commands that never fetch leave closed. Closed in reverse order on exit."""
    metrics = metrics or Metrics()
    store = FilesystemBlobStore(config.cache.dir)
    await asyncio.to_thread(
        store.setup, config.cache.partial_max_age, config.cache.partial_max_size
    )
    local = await sqlite.run(LocalMetadataStore, config.cache.dir / "meta")
    index = await sqlite.run(CacheIndex, config.cache.dir / "index", clock)
    shared, metadata = await _shared_tier(config, metrics, local, store, index)
    router = build_router(config, metrics, network=network, bandwidth_share=worker_share())
    mirror = Mirror(
        store, metadata, index, router, metrics=metrics, offline=config.offline, clock=clock,
        policy=build_policy(config), shared=shared, verify=config.verify,
        outrun_disk=config.cache.outrun_disk,
    )  # fmt: skip
    evictor = Evictor(store, index, config.cache, clock)
    hosted = await _hosted(config, store, index, shared, clock)
    policy = CachePolicy(config, mirror, evictor, shared, protected=hosted.protected)
    try:
        if connect:
            await router.start()
        yield Node(
            config, store, metadata, index, router, shared, mirror, evictor, policy, metrics,
            hosted,
        )  # fmt: skip
    finally:
        await mirror.prefetcher.close()
        hosted.records.close()
        # The supervisor stops waiting `shutdown_timeout` + 10 s after asking: responses took
        # up to `shutdown_timeout` of that.
        await mirror.fills.close(grace=min(config.shutdown_timeout, STORING_GRACE))
        await shared.close()
        await router.close()
        await index.flush()
        index.close()
        metadata.close()
