"""The LRU index and the eviction policy, on a temp directory with an injected clock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mirror.cache.blobs import FilesystemBlobStore
from mirror.cache.eviction import Evictor
from mirror.cache.index import CacheIndex
from mirror.cache.metadata import LocalMetadataStore
from mirror.config import CacheConfig
from mirror.reference import Digest
from tests.fixtures.clock import Clock


def d(n: int) -> Digest:
    return Digest(f"sha256:{n:064x}")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path) -> FilesystemBlobStore:
    s = FilesystemBlobStore(tmp_path / "cache")
    s.setup()
    return s


@pytest.fixture
def index(tmp_path: Path, clock: Clock) -> CacheIndex:
    return CacheIndex(tmp_path / "cache" / "index", clock)


def put(store: FilesystemBlobStore, index: CacheIndex, n: int, size: int, clock: Clock) -> None:
    path = store.path_for(d(n))
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"x" * size)
    index.add(d(n), size, "blob")
    clock.now += 1


async def test_touch_moves_to_the_back_and_totals_follow(
    store: FilesystemBlobStore, index: CacheIndex, clock: Clock
) -> None:
    for n in range(4):
        put(store, index, n, 100, clock)
    await index.flush()
    index.touch(d(1))
    index.touch(d(0))
    await index.flush()
    assert [digest for digest, _ in index.lru()] == [d(2), d(3), d(1), d(0)]
    assert index.totals() == (400, 4)
    index.remove([d(3)])
    assert index.totals() == (300, 3)


async def test_size_budget_evicts_least_recently_served_down_to_low_mark(
    store: FilesystemBlobStore, index: CacheIndex, clock: Clock
) -> None:
    for n in range(10):
        put(store, index, n, 100, clock)
    index.touch(d(0))  # recently served: must survive
    config = CacheConfig(max_size="1000", high_watermark=0.9, low_watermark=0.5)
    evictor = Evictor(store, index, config, clock)
    plan = await evictor.run_once(pinned={d(1)})
    gone = [digest for digest, _, _ in plan.victims]
    assert gone == [d(2), d(3), d(4), d(5), d(6)]
    assert all(reason == "size" for _, _, reason in plan.victims)
    assert index.totals() == (500, 5)
    assert not store.path_for(d(2)).exists() and store.path_for(d(0)).exists()
    assert store.path_for(d(1)).exists()  # pinned though least recently served


async def test_nothing_goes_under_the_high_mark(
    store: FilesystemBlobStore, index: CacheIndex, clock: Clock
) -> None:
    for n in range(9):
        put(store, index, n, 100, clock)
    config = CacheConfig(max_size="1000", high_watermark=0.9, low_watermark=0.5)
    plan = await Evictor(store, index, config, clock).run_once(set())
    assert plan.victims == []


async def test_ttl_since_last_served(
    store: FilesystemBlobStore, index: CacheIndex, clock: Clock
) -> None:
    put(store, index, 1, 10, clock)
    put(store, index, 2, 10, clock)
    index.add(d(3), 10, "manifest")
    put(store, index, 4, 10, clock)
    config = CacheConfig(blob_ttl=3600.0, manifest_ttl=7200.0)
    evictor = Evictor(store, index, config, clock)
    await index.flush()
    clock.now += 3000
    index.touch(d(2))
    clock.now += 1000  # d(1) and d(4) idle > 1h; d(2) served 1000 s ago; manifest d(3) < 2h
    plan = await evictor.run_once(pinned={d(4)})
    assert [(digest, reason) for digest, _, reason in plan.victims] == [(d(1), "ttl")]


async def test_index_survives_reopen_and_reconciles_with_files(
    tmp_path: Path, store: FilesystemBlobStore, index: CacheIndex, clock: Clock
) -> None:
    for n in range(3):
        put(store, index, n, 50, clock)
    await index.flush()
    index.set_pins({"library/alpine:3"})
    index.close()
    reopened = CacheIndex(tmp_path / "cache" / "index", clock)
    assert reopened.totals() == (150, 3)
    assert reopened.pins() == {"library/alpine:3"}
    # Files removed by hand and one added behind the index's back:
    os.unlink(store.path_for(d(0)))
    extra = store.path_for(d(9))
    extra.parent.mkdir(exist_ok=True)
    extra.write_bytes(b"y" * 70)
    assert reopened.reconcile(store.blob_dir, lambda _d: False) == (1, 1)
    assert reopened.totals() == (170, 3)
    assert {digest for digest, _ in reopened.lru()} == {d(1), d(2), d(9)}
    reopened.close()


async def test_entries_rebuilt_at_start_get_their_kind_and_its_ttl(
    tmp_path: Path, store: FilesystemBlobStore, index: CacheIndex, clock: Clock
) -> None:
    """`reconcile` is given `metadata.is_manifest` (a bool) by every caller: entries it adds
    must still be "blob" or "manifest", or the per-kind TTLs never apply to them."""
    day = 86400.0
    for n in (1, 2):
        path = store.path_for(d(n))
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * 10)
        os.utime(path, (clock.now - 10 * day, clock.now - 10 * day))  # idle 10 days
    metadata = LocalMetadataStore(tmp_path / "meta")
    try:
        await metadata.put_media_type(d(2), "application/vnd.oci.image.manifest.v1+json")
        assert index.reconcile(store.blob_dir, metadata.is_manifest) == (2, 0)
    finally:
        metadata.close()
    config = CacheConfig(blob_ttl=day)  # manifests: no TTL
    plan = await Evictor(store, index, config, clock).run_once(set(), dry_run=True)
    assert [(digest, reason) for digest, _, reason in plan.victims] == [(d(1), "ttl")]
    assert {digest: entry.kind for digest, entry in index.lru()} == {
        d(1): "blob",
        d(2): "manifest",
    }
