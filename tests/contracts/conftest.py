"""Every implementation of each protocol in mirror/interfaces.py, as parametrized fixtures.

Real backends only: the node's files and SQLite under a temp dir, the session's redis-server
(its database emptied per test) and SeaweedFS (a fresh key prefix per test). "Dead" variants
point at a loopback port nothing listens on, for the failure half of each contract.
"""

from __future__ import annotations

import hashlib
import inspect
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mirror.cache.blobs import FilesystemBlobStore
from mirror.cache.index import CacheIndex
from mirror.cache.metadata import LocalMetadataStore
from mirror.cache.redis_store import RedisIndex, RedisMetadataStore, RedisStore
from mirror.cache.s3 import S3BlobStore
from mirror.cache.tiered import TieredMetadataStore
from mirror.health import ServiceHealth
from mirror.interfaces import BlobStore, Index, MetadataStore
from mirror.metrics import Metrics
from mirror.reference import Digest
from tests.fixtures.clock import Clock
from tests.fixtures.mirror_server import free_port
from tests.fixtures.seaweed import SeaweedS3

REDIS_TIMEOUT = 0.5  # the dead variants fail within about twice this


def d(n: int) -> Digest:
    return Digest(f"sha256:{n:064x}")


def digest_of(data: bytes) -> Digest:
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


def dead_redis_url() -> str:
    """A loopback port nothing listens on (connection refused: Redis is down)."""
    return f"redis://127.0.0.1:{free_port()}/0"


def protocol_members(protocol: type) -> dict[str, bool]:
    """Each member a protocol declares (its bases' included) -> whether it is `async def`."""
    members: dict[str, bool] = {}
    for klass in reversed(protocol.__mro__):
        if klass is object or not getattr(klass, "_is_protocol", False):
            continue
        for name, value in vars(klass).items():
            if not name.startswith("_") and callable(value):
                members[name] = inspect.iscoroutinefunction(value)
    return members


def health() -> ServiceHealth:
    return ServiceHealth("redis", Metrics())


# -- metadata --------------------------------------------------------------------------------

METADATA_KINDS = ["local", "redis", "tiered"]


@pytest.fixture(params=METADATA_KINDS)
async def metadata(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """A live `MetadataStore` of each kind (typed Any so tests can reach the tiered parts)."""
    kind = request.param
    closers: list[Any] = []
    store: MetadataStore
    if kind == "local":
        store = LocalMetadataStore(tmp_path / "meta")
    else:
        redis = RedisStore(request.getfixturevalue("redis_url"), "contract:")
        await redis.start()
        closers.append(redis.close)
        shared = RedisMetadataStore(redis)
        if kind == "redis":
            store = shared
        else:
            store = TieredMetadataStore(shared, LocalMetadataStore(tmp_path / "meta"), health())
    try:
        yield store
    finally:
        store.close()
        for close in closers:
            await close()


@pytest.fixture
async def dead_redis() -> AsyncIterator[RedisStore]:
    store = RedisStore(dead_redis_url(), "contract:", timeout=REDIS_TIMEOUT)
    try:
        yield store
    finally:
        await store.close()


# -- blob stores -----------------------------------------------------------------------------

BLOB_KINDS = ["filesystem", "s3"]


@pytest.fixture(params=BLOB_KINDS)
async def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    if request.param == "filesystem":
        fs = FilesystemBlobStore(tmp_path / "cache")
        fs.setup()
        yield fs
        return
    seaweed: SeaweedS3 = request.getfixturevalue("seaweed")
    s3 = S3BlobStore(seaweed.s3_config(prefix=f"contract-{secrets.token_hex(4)}/"))
    await s3.start()
    try:
        yield s3
    finally:
        await s3.close()


async def write_natively(store: BlobStore, data: bytes) -> Digest:
    """Through each store's own streaming writer (what fills and uploads use), in two pieces."""
    digest = digest_of(data)
    half = len(data) // 2
    if isinstance(store, FilesystemBlobStore):
        writer = await store.begin_write(digest, len(data))
        await writer.write_chunks([data[:half], data[half:]])
        await writer.commit()
    else:
        assert isinstance(store, S3BlobStore)
        upload = await store.begin_upload(digest)
        await upload.upload_part(data)  # one part: S3 wants >= 5 MiB for all but the last
        await upload.complete()
    return digest


# -- indexes ---------------------------------------------------------------------------------

INDEX_KINDS = ["local", "redis"]


@pytest.fixture(params=INDEX_KINDS)
async def index(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Index]:
    if request.param == "local":
        local = CacheIndex(tmp_path / "index", Clock())
        try:
            yield local
        finally:
            local.close()
        return
    redis = RedisStore(request.getfixturevalue("redis_url"), "contract:")
    await redis.start()
    try:
        yield RedisIndex(redis)
    finally:
        await redis.close()
