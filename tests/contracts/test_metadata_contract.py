"""The `MetadataStore` contract, held against the local, Redis and tiered stores."""

from __future__ import annotations

import asyncio
import inspect
import time
from pathlib import Path
from typing import Any

import pytest

import mirror.health
from mirror.cache.metadata import LocalMetadataStore, Origins, Privacy, TagRecord
from mirror.cache.redis_store import RedisMetadataStore, RedisStore, RedisUnavailable
from mirror.cache.tiered import TieredMetadataStore
from mirror.interfaces import MetadataStore, Unavailable
from tests.contracts.conftest import d, health, protocol_members

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
IMPLEMENTATIONS = [LocalMetadataStore, RedisMetadataStore, TieredMetadataStore]
TAG = ("docker.io", "library/alpine", "3")
REPO = ("docker.io", "corp/app")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", sorted(protocol_members(MetadataStore)))
def test_every_member_is_implemented(impl: type, name: str) -> None:
    """A method one store lacks is an AttributeError in production: here, a failure."""
    assert callable(getattr(impl, name, None)), f"{impl.__name__} lacks {name}"
    wanted = protocol_members(MetadataStore)[name]
    assert inspect.iscoroutinefunction(getattr(impl, name)) == wanted


async def test_absent_is_none(metadata: Any) -> None:
    assert await metadata.get_tag(TAG) is None
    assert await metadata.get_media_type(d(1)) is None
    assert await metadata.get_origins(d(1)) is None
    assert await metadata.get_privacy(REPO) is None
    assert metadata.cached_privacy(REPO) is None
    assert await asyncio.to_thread(metadata.is_manifest, d(1)) is False
    assert await asyncio.to_thread(lambda: list(metadata.iter_tags())) == []
    await metadata.delete_tag(TAG)  # absent: a no-op


async def test_put_then_get_tag_and_replace(metadata: Any) -> None:
    first = TagRecord(d(1), MANIFEST, 100.0)
    await metadata.put_tag(TAG, first)
    assert await metadata.get_tag(TAG) == first
    second = TagRecord(d(2), MANIFEST, 200.0)
    await metadata.put_tag(TAG, second)
    assert await metadata.get_tag(TAG) == second
    assert await asyncio.to_thread(lambda: list(metadata.iter_tags())) == [(TAG, second)]


async def test_delete_tag_then_get_is_none(metadata: Any) -> None:
    other = ("docker.io", "library/alpine", "latest")
    await metadata.put_tag(TAG, TagRecord(d(1), MANIFEST, 100.0))
    await metadata.put_tag(other, TagRecord(d(2), MANIFEST, 100.0))
    await metadata.delete_tag(TAG)
    assert await metadata.get_tag(TAG) is None
    assert await metadata.get_tag(other) is not None  # only that tag
    if isinstance(metadata, TieredMetadataStore):  # gone from both tiers
        assert await metadata.local.get_tag(TAG) is None
        assert await metadata.shared.get_tag(TAG) is None


async def test_media_type_makes_a_manifest(metadata: Any) -> None:
    await metadata.put_media_type(d(1), MANIFEST)
    assert await metadata.get_media_type(d(1)) == MANIFEST
    assert await asyncio.to_thread(metadata.is_manifest, d(1)) is True
    assert await asyncio.to_thread(metadata.is_manifest, d(2)) is False


async def test_add_origin_is_a_union(metadata: Any) -> None:
    await metadata.add_origin([d(1), d(2)], "docker.io/corp/a")
    await metadata.add_origin([d(1)], None)
    await metadata.add_origin([d(1)], "docker.io/corp/b")
    await metadata.add_origin([d(1)], "docker.io/corp/a")  # again: nothing changes
    assert await metadata.get_origins(d(1)) == Origins(
        True, frozenset({"docker.io/corp/a", "docker.io/corp/b"})
    )
    assert await metadata.get_origins(d(2)) == Origins(False, frozenset({"docker.io/corp/a"}))


async def test_privacy_round_trip(metadata: Any) -> None:
    privacy = Privacy(True, 123.5)
    await metadata.put_privacy(REPO, privacy)
    assert await metadata.get_privacy(REPO) == privacy
    assert metadata.cached_privacy(REPO) == privacy
    await metadata.put_privacy(REPO, Privacy(False, 200.0))
    assert await metadata.get_privacy(REPO) == Privacy(False, 200.0)


# -- when Redis is down ----------------------------------------------------------------------


async def test_redis_store_raises_redis_unavailable(dead_redis: RedisStore) -> None:
    store = RedisMetadataStore(dead_redis)
    record, privacy = TagRecord(d(1), MANIFEST, 1.0), Privacy(False, 1.0)
    calls = [
        lambda: store.get_tag(TAG),
        lambda: store.put_tag(TAG, record),
        lambda: store.delete_tag(TAG),
        lambda: store.get_media_type(d(1)),
        lambda: store.put_media_type(d(1), MANIFEST),
        lambda: store.get_origins(d(1)),
        lambda: store.add_origin([d(1)], None),
        lambda: store.get_privacy(REPO),
        lambda: store.put_privacy(REPO, privacy),
        lambda: asyncio.to_thread(store.is_manifest, d(1)),
        lambda: asyncio.to_thread(lambda: list(store.iter_tags())),
    ]
    started = time.monotonic()
    for call in calls:
        with pytest.raises(RedisUnavailable):
            await call()
    assert time.monotonic() - started < 20  # bounded: refused at once, never a hang
    assert issubclass(RedisUnavailable, Unavailable)
    assert store.cached_privacy(REPO) == privacy  # memory only: answers, never raises
    store.close()


async def test_tiered_store_falls_back_to_local(
    dead_redis: RedisStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mirror.health, "PROBE_SECONDS", 0.0)  # every call tries Redis first
    local = LocalMetadataStore(tmp_path / "meta")
    tiered = TieredMetadataStore(RedisMetadataStore(dead_redis), local, health())
    try:
        record = TagRecord(d(1), MANIFEST, 1.0)
        await tiered.put_tag(TAG, record)
        assert tiered.health.degraded  # the outage was noticed, not raised
        assert await tiered.get_tag(TAG) == record
        assert await asyncio.to_thread(lambda: list(tiered.iter_tags())) == [(TAG, record)]
        await tiered.delete_tag(TAG)
        assert await tiered.get_tag(TAG) is None
        await tiered.put_media_type(d(1), MANIFEST)
        assert await tiered.get_media_type(d(1)) == MANIFEST
        assert await asyncio.to_thread(tiered.is_manifest, d(1)) is True
        await tiered.add_origin([d(1)], None)
        assert await tiered.get_origins(d(1)) == Origins(True)
        await tiered.put_privacy(REPO, Privacy(True, 1.0))
        assert await tiered.get_privacy(REPO) == Privacy(True, 1.0)
    finally:
        tiered.close()
