"""The `Index` contract (the LRU/TTL facts both indexes keep), held against the node's
`CacheIndex` and the cluster's `RedisIndex`."""

from __future__ import annotations

import inspect

import pytest

from mirror.cache.index import CacheIndex, Entry
from mirror.cache.redis_store import RedisIndex, RedisStore, RedisUnavailable
from mirror.interfaces import Index
from tests.contracts.conftest import d, protocol_members

IMPLEMENTATIONS = [CacheIndex, RedisIndex]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", sorted(protocol_members(Index)))
def test_every_member_is_implemented(impl: type, name: str) -> None:
    assert callable(getattr(impl, name, None)), f"{impl.__name__} lacks {name}"
    wanted = protocol_members(Index)[name]
    assert inspect.iscoroutinefunction(getattr(impl, name)) == wanted


async def test_empty(index: Index) -> None:
    assert await index.entry(d(1)) is None
    assert await index.usage() == (0, 0)
    assert await index.drop(d(1)) is False
    assert await index.least_recent(10) == []


async def test_add_counts_once(index: Index) -> None:
    await index.note_stored(d(1), 100, "blob", 10.0)
    await index.note_stored(d(2), 5, "manifest", 11.0)
    assert await index.entry(d(1)) == Entry(100, "blob", 10.0, 10.0)
    assert await index.entry(d(2)) == Entry(5, "manifest", 11.0, 11.0)
    assert await index.usage() == (105, 2)
    await index.note_stored(d(1), 100, "blob", 20.0)  # stored again (another node, a race)
    assert await index.usage() == (105, 2)
    assert await index.entry(d(1)) == Entry(100, "blob", 10.0, 20.0)


async def test_touch_moves_forward_only_and_ignores_unknown(index: Index) -> None:
    await index.note_stored(d(1), 1, "blob", 10.0)
    await index.note_stored(d(2), 1, "blob", 11.0)
    await index.note_served({d(1): 30.0, d(9): 40.0})
    assert await index.entry(d(1)) == Entry(1, "blob", 10.0, 30.0)
    assert await index.entry(d(9)) is None  # served but never stored: not indexed
    await index.note_served({d(1): 20.0})  # an older time never moves it back
    assert (await index.entry(d(1))) == Entry(1, "blob", 10.0, 30.0)
    assert await index.usage() == (2, 2)


async def test_least_recent_order_and_cutoff(index: Index) -> None:
    for n, when in ((1, 10.0), (2, 11.0), (3, 12.0)):
        await index.note_stored(d(n), n, "blob", when)
    await index.note_served({d(1): 50.0})
    assert [row[0] for row in await index.least_recent(10)] == [d(2), d(3), d(1)]
    assert await index.least_recent(1) == [(d(2), 2, "blob", 11.0)]
    assert [row[0] for row in await index.least_recent(10, before=50.0)] == [d(2), d(3)]
    assert await index.least_recent(0) == []


async def test_remove(index: Index) -> None:
    await index.note_stored(d(1), 100, "blob", 10.0)
    await index.note_stored(d(2), 30, "blob", 11.0)
    assert await index.drop(d(1)) is True
    assert await index.drop(d(1)) is False
    assert await index.entry(d(1)) is None
    assert await index.usage() == (30, 1)
    assert [row[0] for row in await index.least_recent(10)] == [d(2)]


async def test_redis_index_down_raises_redis_unavailable(dead_redis: RedisStore) -> None:
    index = RedisIndex(dead_redis)
    calls = [
        lambda: index.note_stored(d(1), 1, "blob", 1.0),
        lambda: index.note_served({d(1): 2.0}),
        lambda: index.entry(d(1)),
        lambda: index.usage(),
        lambda: index.drop(d(1)),
        lambda: index.least_recent(10),
    ]
    for call in calls:
        with pytest.raises(RedisUnavailable):
            await call()
