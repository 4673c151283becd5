"""The Redis module against a real redis-server: leases, shared metadata, the shared index,
serving marks, outages. Two `RedisStore`s stand for two mirror nodes."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mirror.cache.metadata import LocalMetadataStore, Origins, Privacy, TagRecord
from mirror.cache.redis_store import RedisIndex, RedisMetadataStore, RedisStore, RedisUnavailable
from mirror.reference import Digest
from tests.fixtures.clock import Clock
from tests.fixtures.redis_server import RedisServer

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def d(n: int) -> Digest:
    return Digest(f"sha256:{n:064x}")


@pytest.fixture
async def node_a(redis_url: str) -> AsyncIterator[RedisStore]:
    store = RedisStore(redis_url, "test:")
    await store.start()
    yield store
    await store.close()


@pytest.fixture
async def node_b(redis_url: str) -> AsyncIterator[RedisStore]:
    store = RedisStore(redis_url, "test:")
    await store.start()
    yield store
    await store.close()


# -- leases ---------------------------------------------------------------------------------


async def test_one_of_many_concurrent_acquirers_wins(
    node_a: RedisStore, node_b: RedisStore
) -> None:
    owners = [f"{'ab'[i % 2]}-{i}" for i in range(50)]
    stores = [node_a if i % 2 == 0 else node_b for i in range(50)]
    won = await asyncio.gather(
        *(s.acquire_fill(d(1), o, 10.0) for s, o in zip(stores, owners, strict=True))
    )
    assert sum(won) == 1
    winner = owners[won.index(True)]
    assert await node_a.fill_owner(d(1)) == winner
    assert await node_b.fill_owner(d(1)) == winner


async def test_only_the_owner_renews_and_releases(node_a: RedisStore, node_b: RedisStore) -> None:
    assert await node_a.acquire_fill(d(2), "a", 0.5)
    assert not await node_b.renew_fill(d(2), "b", 30.0)
    await node_b.release_fill(d(2), "b")
    assert await node_b.fill_owner(d(2)) == "a"  # a non-owner's release did nothing
    assert await node_a.renew_fill(d(2), "a", 30.0)
    ttl = await node_a.redis.pttl(node_a.key("fill", d(2)))
    assert 25_000 < ttl <= 30_000
    await node_a.release_fill(d(2), "a")
    assert await node_a.fill_owner(d(2)) is None
    assert not await node_a.renew_fill(d(2), "a", 30.0)  # gone: renewing cannot revive it
    assert await node_b.acquire_fill(d(2), "b", 10.0)


async def test_an_unrenewed_lease_expires_and_another_node_takes_it(
    node_a: RedisStore, node_b: RedisStore
) -> None:
    assert await node_a.acquire_fill(d(3), "a", 0.3)
    assert not await node_b.acquire_fill(d(3), "b", 10.0)
    await asyncio.sleep(0.4)
    assert await node_a.fill_owner(d(3)) is None
    assert await node_b.acquire_fill(d(3), "b", 10.0)
    assert not await node_a.renew_fill(d(3), "a", 10.0)  # the dead owner lost it for good
    await node_a.release_fill(d(3), "a")
    assert await node_a.fill_owner(d(3)) == "b"


async def test_leader_lease(node_a: RedisStore, node_b: RedisStore) -> None:
    assert await node_a.try_lead("evict", "a", 0.5)
    assert not await node_b.try_lead("evict", "b", 0.5)
    assert await node_a.try_lead("evict", "a", 0.5)  # renewed
    await asyncio.sleep(0.6)
    assert await node_b.try_lead("evict", "b", 10.0)
    assert not await node_a.try_lead("evict", "a", 10.0)


# -- metadata -------------------------------------------------------------------------------


async def test_a_tag_put_by_one_node_is_read_by_another(
    node_a: RedisStore, node_b: RedisStore
) -> None:
    meta_a, meta_b = RedisMetadataStore(node_a), RedisMetadataStore(node_b)
    key = ("docker.io", "library/alpine", "3.20")
    assert await meta_b.get_tag(key) is None
    await meta_a.put_tag(key, TagRecord(d(1), MANIFEST, 100.0))
    assert await meta_b.get_tag(key) == TagRecord(d(1), MANIFEST, 100.0)
    await meta_b.put_tag(key, TagRecord(d(2), MANIFEST, 200.0))  # b revalidates: a sees it
    assert await meta_a.get_tag(key) == TagRecord(d(2), MANIFEST, 200.0)
    await meta_a.put_media_type(d(2), MANIFEST)
    assert await meta_b.get_media_type(d(2)) == MANIFEST
    assert await asyncio.to_thread(meta_b.is_manifest, d(2))
    assert not await asyncio.to_thread(meta_b.is_manifest, d(3))
    other = ("ghcr.io", "org/x:y", "v1")  # odd characters cannot confuse the keys
    await meta_a.put_tag(other, TagRecord(d(3), MANIFEST, 300.0))
    expected = sorted(
        [(key, TagRecord(d(2), MANIFEST, 200.0)), (other, TagRecord(d(3), MANIFEST, 300.0))]
    )
    assert sorted(await meta_b.all_tags()) == expected
    assert sorted(await asyncio.to_thread(lambda: list(meta_b.iter_tags()))) == expected
    meta_a.close()
    meta_b.close()


async def test_origins_from_two_nodes_merge(node_a: RedisStore, node_b: RedisStore) -> None:
    meta_a, meta_b = RedisMetadataStore(node_a), RedisMetadataStore(node_b)
    digests = [d(n) for n in range(20)]
    for _ in range(5):  # several rounds of the race, each on fresh digests
        await asyncio.gather(
            meta_a.add_origin(digests, "docker.io/team/a"),
            meta_b.add_origin(digests, "docker.io/team/b"),
            meta_b.add_origin(digests[:10], None),
        )
        for n, digest in enumerate(digests):
            origins = await meta_a.get_origins(digest)
            assert origins == Origins(n < 10, frozenset({"docker.io/team/a", "docker.io/team/b"}))
        digests = [d(n + 100 * (_ + 1)) for n in range(20)]
    assert await meta_a.get_origins(d(9999)) is None


async def test_privacy_round_trip(node_a: RedisStore, node_b: RedisStore) -> None:
    meta_a, meta_b = RedisMetadataStore(node_a), RedisMetadataStore(node_b)
    key = ("docker.io", "private/secret")
    assert await meta_b.get_privacy(key) is None
    assert meta_b.cached_privacy(key) is None
    await meta_a.put_privacy(key, Privacy(True, 123.5))
    assert meta_a.cached_privacy(key) == Privacy(True, 123.5)
    assert meta_b.cached_privacy(key) is None  # no I/O: b has not read it yet
    assert await meta_b.get_privacy(key) == Privacy(True, 123.5)
    assert meta_b.cached_privacy(key) == Privacy(True, 123.5)
    await meta_b.put_privacy(key, Privacy(False, 200.0))
    assert await meta_a.get_privacy(key) == Privacy(False, 200.0)


@pytest.fixture(params=["local", "redis"])
async def metadata(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[LocalMetadataStore | RedisMetadataStore]:
    if request.param == "local":
        local = LocalMetadataStore(tmp_path / "meta")
        yield local
        local.close()
    else:
        url = request.getfixturevalue("redis_url")
        store = RedisStore(url, "same:")
        await store.start()
        shared = RedisMetadataStore(store)
        yield shared
        shared.close()
        await store.close()


async def test_metadata_stores_behave_alike(
    metadata: LocalMetadataStore | RedisMetadataStore,
) -> None:
    """The methods both implementations share, with the same answers."""
    key = ("docker.io", "library/alpine", "latest")
    assert await metadata.get_tag(key) is None
    await metadata.put_tag(key, TagRecord(d(1), MANIFEST, 1.5))
    assert await metadata.get_tag(key) == TagRecord(d(1), MANIFEST, 1.5)
    await metadata.put_tag(key, TagRecord(d(2), MANIFEST, 2.5))
    assert await metadata.get_tag(key) == TagRecord(d(2), MANIFEST, 2.5)
    assert list(metadata.iter_tags()) == [(key, TagRecord(d(2), MANIFEST, 2.5))]

    assert await metadata.get_media_type(d(2)) is None
    assert not metadata.is_manifest(d(2))
    await metadata.put_media_type(d(2), MANIFEST)
    assert await metadata.get_media_type(d(2)) == MANIFEST
    assert metadata.is_manifest(d(2))

    assert await metadata.get_origins(d(3)) is None
    await metadata.add_origin([d(3), d(4)], "docker.io/org/private")
    assert await metadata.get_origins(d(3)) == Origins(False, frozenset({"docker.io/org/private"}))
    await metadata.add_origin([d(3)], None)
    await metadata.add_origin([d(3)], None)
    await metadata.add_origin([d(3)], "docker.io/org/other")
    assert await metadata.get_origins(d(3)) == Origins(
        True, frozenset({"docker.io/org/private", "docker.io/org/other"})
    )
    assert await metadata.get_origins(d(4)) == Origins(False, frozenset({"docker.io/org/private"}))

    repo = ("docker.io", "org/private")
    assert await metadata.get_privacy(repo) is None
    assert metadata.cached_privacy(repo) is None
    await metadata.put_privacy(repo, Privacy(True, 10.0))
    assert metadata.cached_privacy(repo) == Privacy(True, 10.0)
    assert await metadata.get_privacy(repo) == Privacy(True, 10.0)


# -- index ----------------------------------------------------------------------------------


async def test_index_order_touch_and_totals(node_a: RedisStore, node_b: RedisStore) -> None:
    index_a, index_b = RedisIndex(node_a), RedisIndex(node_b)
    clock = Clock()
    for n in range(5):
        await index_a.add(d(n), 100 * (n + 1), "blob" if n else "manifest", clock())
        clock.now += 1
    await index_b.add(d(2), 300, "blob", clock())  # the other node stored it too: counts once
    assert await index_b.totals() == (1500, 5)
    start = Clock().now
    assert await index_a.get(d(0)) == (100, "manifest", start, start)
    assert await index_a.get(d(2)) == (300, "blob", start + 2, clock.now)  # re-add: served now
    assert [e[0] for e in await index_b.least_recent(10)] == [d(0), d(1), d(3), d(4), d(2)]

    await index_a.touch({d(0): clock.now + 10, d(1): start - 50, d(99): clock.now})
    await index_a.touch({})
    await index_b.touch({d(3): clock.now + 5})
    assert await index_a.get(d(1)) == (200, "blob", start + 1, start + 1)  # never backwards
    assert await index_a.get(d(99)) is None  # unknown digests are ignored
    assert await index_a.least_recent(10) == [
        (d(1), 200, "blob", start + 1),
        (d(4), 500, "blob", start + 4),
        (d(2), 300, "blob", clock.now),
        (d(3), 400, "blob", clock.now + 5),
        (d(0), 100, "manifest", clock.now + 10),
    ]
    assert [e[0] for e in await index_a.least_recent(2)] == [d(1), d(4)]
    assert [e[0] for e in await index_a.least_recent(10, before=start + 4)] == [d(1)]
    assert await index_a.totals() == (1500, 5)

    assert await index_a.remove(d(4))
    assert not await index_b.remove(d(4))
    assert not await index_b.remove(d(98))
    assert await index_b.totals() == (1000, 4)
    await index_b.touch({d(4): clock.now + 100})  # removed: a late touch does not revive it
    assert await index_a.get(d(4)) is None
    assert [e[0] for e in await index_a.least_recent(10)] == [d(1), d(2), d(3), d(0)]


async def test_concurrent_adds_and_removes_keep_totals_exact(
    node_a: RedisStore, node_b: RedisStore
) -> None:
    index_a, index_b = RedisIndex(node_a), RedisIndex(node_b)
    await asyncio.gather(
        *(i.add(d(n), n + 1, "blob", float(n)) for n in range(200) for i in (index_a, index_b))
    )
    assert await index_a.totals() == (sum(range(1, 201)), 200)
    removed = await asyncio.gather(
        *(i.remove(d(n)) for n in range(0, 200, 2) for i in (index_a, index_b))
    )
    assert sum(removed) == 100
    assert await index_b.totals() == (sum(n + 1 for n in range(1, 200, 2)), 100)


async def test_a_large_touch_batch(node_a: RedisStore) -> None:
    """More than one ZADD chunk: every time lands, in order."""
    index = RedisIndex(node_a)
    n = 2500
    await asyncio.gather(*(index.add(d(i), 1, "blob", 0.0) for i in range(n)))
    await index.touch({d(i): float(n - i) for i in range(n)})
    oldest = await index.least_recent(3)
    assert [e[0] for e in oldest] == [d(n - 1), d(n - 2), d(n - 3)]
    assert [e[3] for e in oldest] == [1.0, 2.0, 3.0]
    assert await index.get(d(0)) == (1, "blob", 0.0, float(n))
    assert await index.totals() == (n, n)


async def test_pins(node_a: RedisStore, node_b: RedisStore) -> None:
    index_a, index_b = RedisIndex(node_a), RedisIndex(node_b)
    assert await index_a.pins() == set()
    await index_a.pin("docker.io/library/alpine:3.20")
    await index_b.pin(d(1))
    await index_b.pin(d(1))
    assert await index_a.pins() == {"docker.io/library/alpine:3.20", d(1)}
    assert await index_a.unpin(d(1))
    assert not await index_b.unpin(d(1))
    assert await index_b.pins() == {"docker.io/library/alpine:3.20"}


async def test_serving_marks_expire(node_a: RedisStore, node_b: RedisStore) -> None:
    index_a, index_b = RedisIndex(node_a), RedisIndex(node_b)
    assert not await index_b.serving(d(1))
    await index_a.mark_serving(d(1), "a", 0.5)
    await index_b.mark_serving(d(1), "b", 30.0)
    assert await index_a.serving(d(1))
    await index_b.done_serving(d(1), "b")
    assert await index_b.serving(d(1))  # a's mark still stands
    await asyncio.sleep(0.6)  # a died without done_serving: its mark lapses
    assert not await index_b.serving(d(1))
    await index_a.mark_serving(d(2), "a", 30.0)
    await index_a.done_serving(d(2), "a")
    assert not await index_b.serving(d(2))


# -- outages --------------------------------------------------------------------------------


async def test_unavailable_when_down_and_back_after_restart(
    redis_server: RedisServer, node_a: RedisStore
) -> None:
    meta, index = RedisMetadataStore(node_a), RedisIndex(node_a)
    key = ("docker.io", "library/alpine", "latest")
    await meta.put_tag(key, TagRecord(d(1), MANIFEST, 1.0))
    await meta.add_origin([d(1)], None)
    assert await node_a.acquire_fill(d(1), "a", 10.0)
    redis_server.stop()
    try:
        calls = [
            lambda: meta.get_tag(key),
            lambda: node_a.acquire_fill(d(2), "a", 10.0),
            lambda: node_a.renew_fill(d(1), "a", 10.0),
            lambda: index.totals(),
            lambda: index.least_recent(10),
            lambda: meta.add_origin([d(5)], None),
        ]
        for call in calls:
            began = time.monotonic()
            with pytest.raises(RedisUnavailable):
                await call()
            assert time.monotonic() - began < 5.0
        with pytest.raises(RedisUnavailable):
            await asyncio.to_thread(meta.is_manifest, d(1))
        assert not await node_a.ping()
        down = RedisStore(redis_server.url, "test:")
        with pytest.raises(RedisUnavailable):
            await down.start()
        await down.close()
    finally:
        redis_server.restart()
    # The same clients work again (pooled connections replaced, scripts reloaded); the
    # restarted server lost its data, as an unpersisted Redis does.
    assert await node_a.ping()
    assert await meta.get_tag(key) is None
    assert await node_a.acquire_fill(d(1), "a", 10.0)
    assert await node_a.renew_fill(d(1), "a", 10.0)
    await index.add(d(1), 10, "blob", 1.0)
    assert await index.totals() == (10, 1)
    assert not await asyncio.to_thread(meta.is_manifest, d(1))
    assert await meta.get_origins(d(1)) is None  # lost with the data: recorded again when
    await meta.add_origin([d(1)], None)  # the mirror next confirms it
    assert await RedisMetadataStore(node_a).get_origins(d(1)) == Origins(True)
    meta.close()


async def test_a_hung_server_times_out_within_bounds(
    redis_server: RedisServer, redis_url: str
) -> None:
    store = RedisStore(redis_url, "test:", timeout=0.5)
    await store.start()
    meta = RedisMetadataStore(store)
    redis_server.pause()
    try:
        began = time.monotonic()
        with pytest.raises(RedisUnavailable):
            await meta.get_tag(("docker.io", "library/alpine", "latest"))
        with pytest.raises(RedisUnavailable):
            await store.acquire_fill(d(1), "a", 10.0)
        assert not await store.ping()
        assert time.monotonic() - began < 3 * 3 * 0.5  # three calls, each about one timeout
    finally:
        redis_server.resume()
    assert await store.acquire_fill(d(1), "a", 10.0)
    await store.close()


# -- latency (figures printed, not asserted) ------------------------------------------------


def _percentiles(samples: list[float]) -> str:
    q = statistics.quantiles(samples, n=100)
    return f"p50 {q[49] * 1e6:.0f} us, p99 {q[98] * 1e6:.0f} us"


async def test_latency(node_a: RedisStore, capsys: pytest.CaptureFixture[str]) -> None:
    meta = RedisMetadataStore(node_a)
    key = ("docker.io", "library/alpine", "latest")
    await meta.put_tag(key, TagRecord(d(1), MANIFEST, 1.0))
    gets, locks = [], []
    for _ in range(2000):
        began = time.perf_counter()
        await meta.get_tag(key)
        gets.append(time.perf_counter() - began)
    for n in range(2000):
        began = time.perf_counter()
        assert await node_a.acquire_fill(d(n), "a", 10.0)
        await node_a.release_fill(d(n), "a")
        locks.append(time.perf_counter() - began)
    with capsys.disabled():
        print(f"\nredis get_tag: {_percentiles(gets)}")
        print(f"redis acquire_fill+release_fill: {_percentiles(locks)}")
