"""`SharedTier`: one node (`NoSharedTier`) and a cluster's node (`Cluster`, on the real Redis and
SeaweedFS) answer the pull and cache policies the same way; a cluster whose services are down
degrades instead of raising. (Where fills get their bytes is covered end to end by the cluster
integration tests, with real nodes.)"""

from __future__ import annotations

import hashlib
import inspect
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mirror.cache.redis_store import RedisStore
from mirror.cache.s3 import S3BlobStore
from mirror.cluster import Cluster
from mirror.config import S3Config
from mirror.interfaces import SharedTier
from mirror.metrics import Metrics
from mirror.reference import Digest
from mirror.shared import NoSharedTier
from mirror.upstream.peer import PeerClient
from tests.contracts.conftest import d, dead_redis_url, protocol_members
from tests.fixtures.mirror_server import free_port


def cluster(redis: RedisStore, s3: S3BlobStore, node_url: str = "http://node-a") -> Cluster:
    async def drop_local(digest: Digest) -> None:
        return None

    return Cluster(
        node_url=node_url, lease=1.0, redis=redis, s3=s3,
        peers=PeerClient("secret"), metrics=Metrics(), drop_local=drop_local,
    )  # fmt: skip


@pytest.fixture(params=["one node", "cluster"])
async def tier(request: pytest.FixtureRequest) -> AsyncIterator[SharedTier]:
    if request.param == "one node":
        yield NoSharedTier()
        return
    prefix = f"tier{secrets.token_hex(3)}/"
    redis = RedisStore(request.getfixturevalue("redis_url"), prefix)
    s3 = S3BlobStore(request.getfixturevalue("seaweed").s3_config(prefix=prefix))
    node = cluster(redis, s3)
    await node.start()
    try:
        yield node
    finally:
        await node.close()


@pytest.mark.parametrize("impl", [NoSharedTier, Cluster])
def test_every_member_of_the_protocol_is_implemented(impl: type) -> None:
    for name, is_async in protocol_members(SharedTier).items():
        member: Any = getattr(impl, name, None)
        assert member is not None, f"{impl.__name__} lacks {name}"
        if isinstance(member, property):
            continue
        assert callable(member), f"{impl.__name__}.{name}"
        assert inspect.iscoroutinefunction(member) == is_async, f"{impl.__name__}.{name}"
    assert isinstance(getattr(impl, "store_down", None), property), impl


async def test_absent_things_are_none_or_empty(tier: SharedTier) -> None:
    assert not tier.store_down
    assert await tier.get_manifest(d(1), 1 << 20) is None
    assert await tier.presigned(d(1)) is None
    assert await tier.entry(d(1)) is None
    assert await tier.drop([d(1)]) == []
    assert "degraded" not in tier.status().values()
    tier.touched(d(1))  # never fails


async def test_a_shared_manifest_comes_back_whole_or_not_at_all(tier: SharedTier) -> None:
    data = json.dumps({"schemaVersion": 2, "n": secrets.token_hex(4)}).encode()
    digest = Digest("sha256:" + hashlib.sha256(data).hexdigest())
    await tier.put_manifest(digest, data)
    got = await tier.get_manifest(digest, 1 << 20)
    assert got in (None, data)
    assert (got is None) == isinstance(tier, NoSharedTier)  # a cluster shares it
    assert await tier.get_manifest(digest, len(data) - 1) is None  # over the limit: not read


async def test_pins_set_here_are_the_shared_pins(tier: SharedTier) -> None:
    await tier.set_pins(["library/a:1", "library/b:2"], pin=True)
    await tier.set_pins(["library/b:2"], pin=False)
    pins = await tier.shared_pins()
    assert pins == ([] if isinstance(tier, NoSharedTier) else ["library/a:1"])


async def test_eviction_passes_answer_even_when_there_is_nothing(tier: SharedTier) -> None:
    led = await tier.lead_eviction(set())
    ran = await tier.evict(set(), dry_run=True)
    if isinstance(tier, NoSharedTier):
        assert led is None and ran is None
    else:
        assert ran is not None and ran.victims == []
    assert await tier.verify() == (0, [])


async def test_a_cluster_whose_services_are_down_degrades_without_raising() -> None:
    redis = RedisStore(dead_redis_url(), "dead/")
    s3 = S3BlobStore(_dead_s3_config())
    node = cluster(redis, s3)
    await node.start()
    try:
        assert await node.get_manifest(d(2), 1 << 20) is None
        assert await node.shared_pins() == []
        assert await node.entry(d(2)) is None  # Redis down: unknown
        assert await node.presigned(d(2)) is None
        assert await node.drop([d(2)]) == []
        assert await node.lead_eviction(set()) is None
        assert node.store_down
        status = node.status()
        assert status["redis"] == "degraded" and status["s3"] == "degraded"
    finally:
        await node.close()


def _dead_s3_config() -> S3Config:
    """A closed loopback port: the object store is down."""
    return S3Config(
        endpoint=f"http://127.0.0.1:{free_port()}", region="us-east-1", bucket="b",
        prefix="", access_key="k", secret_key="s", part_size=5 * 1024 * 1024,
    )  # fmt: skip


async def test_a_manifest_fetch_is_claimed_by_one_node_at_a_time(
    tier: SharedTier, request: pytest.FixtureRequest
) -> None:
    """Issue 22: one manifest GET per cluster. One node: always its own; a cluster: the second
    node waits until the first gives the claim back."""
    key = d(22)
    assert await tier.claim_fetch(key)
    if isinstance(tier, Cluster):
        assert tier.redis is not None
        s3 = S3BlobStore(request.getfixturevalue("seaweed").s3_config(prefix="tier-b/"))
        other = cluster(tier.redis, s3, "http://node-b")
        await other.start()
        try:
            assert not await other.claim_fetch(key)
            await tier.release_fetch(key)
            assert await other.claim_fetch(key)
            await other.release_fetch(key)
        finally:
            await other.close()
    else:
        await tier.release_fetch(key)
