"""`FillCoordinator`: the local one and the Redis one (leases) hold to one contract.

Two coordinators on one Redis stand for two nodes; a third points at a dead port.
"""

from __future__ import annotations

import asyncio
import inspect
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mirror.cache.redis_store import RedisStore
from mirror.coordination import LocalCoordinator, RedisCoordinator
from mirror.interfaces import FillCoordinator
from tests.contracts.conftest import d, dead_redis_url, health, protocol_members

LEASE = 0.6


@pytest.fixture
async def redis_nodes(redis_url: str) -> AsyncIterator[tuple[RedisCoordinator, RedisCoordinator]]:
    """Two nodes' coordinators on one Redis (a fresh key prefix)."""
    prefix = f"coord{secrets.token_hex(3)}:"
    stores = [RedisStore(redis_url, prefix) for _ in range(2)]
    for store in stores:
        await store.start()
    a = RedisCoordinator(stores[0], health(), "http://node-a", LEASE)
    b = RedisCoordinator(stores[1], health(), "http://node-b", LEASE)
    try:
        yield a, b
    finally:
        for coordinator in (a, b):
            await coordinator.close()
        for store in stores:
            await store.close()


@pytest.fixture(params=["local", "redis"])
async def coordinator(
    request: pytest.FixtureRequest, redis_url: str
) -> AsyncIterator[FillCoordinator]:
    if request.param == "local":
        yield LocalCoordinator()
        return
    store = RedisStore(redis_url, f"coord{secrets.token_hex(3)}:")
    await store.start()
    c = RedisCoordinator(store, health(), "http://node-a", LEASE)
    try:
        yield c
    finally:
        await c.close()
        await store.close()


@pytest.mark.parametrize("impl", [LocalCoordinator, RedisCoordinator])
def test_every_member_of_the_protocol_is_implemented(impl: type) -> None:
    for name, is_async in protocol_members(FillCoordinator).items():
        member: Any = getattr(impl, name, None)
        assert callable(member), f"{impl.__name__} lacks {name}"
        assert inspect.iscoroutinefunction(member) == is_async, f"{impl.__name__}.{name}"


async def test_a_claim_is_mine_and_can_be_claimed_again_after_release(
    coordinator: FillCoordinator,
) -> None:
    first = await coordinator.claim(d(1))
    assert first.mine and first.owner is None
    await coordinator.release(d(1))
    assert (await coordinator.claim(d(1))).mine
    await coordinator.release(d(1))
    await coordinator.release(d(2))  # not held: a no-op


async def test_one_node_fetches_the_other_learns_who(
    redis_nodes: tuple[RedisCoordinator, RedisCoordinator],
) -> None:
    a, b = redis_nodes
    assert (await a.claim(d(3))).mine
    other = await b.claim(d(3))
    assert not other.mine and other.owner == "http://node-a"
    await asyncio.sleep(LEASE * 1.5)  # renewed while held: still a's
    assert (await b.claim(d(3))).owner == "http://node-a"
    await a.release(d(3))
    assert (await b.claim(d(3))).mine
    await b.release(d(3))


async def test_a_lease_nobody_renews_lapses_and_is_taken_over(
    redis_nodes: tuple[RedisCoordinator, RedisCoordinator],
) -> None:
    a, b = redis_nodes
    assert (await a.claim(d(4))).mine
    await a.close()  # the node died: no more renewals, no release
    assert not (await b.claim(d(4))).mine
    await asyncio.sleep(LEASE * 1.5)
    assert (await b.claim(d(4))).mine
    await b.release(d(4))


async def test_with_redis_down_every_node_claims() -> None:
    store = RedisStore(dead_redis_url(), "dead:")
    state = health()
    c = RedisCoordinator(store, state, "http://node-a", LEASE)
    try:
        assert (await c.claim(d(5))).mine
        assert state.degraded
        await c.release(d(5))  # tolerated while down
    finally:
        await c.close()
        await store.close()
