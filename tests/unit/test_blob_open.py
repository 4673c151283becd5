"""Opening committed blobs for serving: in a thread the first time (a path the kernel has not
looked up lately may wait for the disk), on the event loop while it was opened lately."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from typing import Any

import pytest

from mirror.cache import blobs
from mirror.cache.blobs import FilesystemBlobStore
from mirror.reference import Digest


def _commit(store: FilesystemBlobStore, data: bytes) -> Digest:
    digest = Digest("sha256:" + hashlib.sha256(data).hexdigest())
    path = store.path_for(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the functions the store ran in a thread."""
    seen: list[str] = []
    real = asyncio.to_thread

    async def counted(fn: Callable[..., Any], *args: Any) -> Any:
        seen.append(getattr(fn, "__name__", repr(fn)))
        return await real(fn, *args)

    monkeypatch.setattr(blobs.asyncio, "to_thread", counted)
    return seen


async def test_a_blob_opened_lately_is_opened_on_the_loop(
    store: FilesystemBlobStore, hops: list[str]
) -> None:
    data = os.urandom(5000)
    digest = _commit(store, data)
    for _ in range(3):
        blob = await store.open_for_serving(digest)
        assert blob is not None and blob.size == len(data)
        assert os.pread(blob.file.fileno(), len(data), 0) == data
        blob.close()
    assert hops == ["_open"], "only the first open took a thread"


async def test_a_warm_digest_whose_file_went_is_not_served(
    store: FilesystemBlobStore, hops: list[str]
) -> None:
    digest = _commit(store, b"evicted soon")
    blob = await store.open_for_serving(digest)
    assert blob is not None
    blob.close()
    store.path_for(digest).unlink()  # evicted meanwhile
    assert await store.open_for_serving(digest) is None
    assert hops == ["_open"]


async def test_warmth_expires(store: FilesystemBlobStore, hops: list[str]) -> None:
    now = [0.0]
    store._warm = blobs.TTLCache(
        maxsize=blobs.WARM_MAX, ttl=blobs.WARM_SECONDS, timer=lambda: now[0]
    )
    digest = _commit(store, b"x" * 10)
    for at in (0.0, blobs.WARM_SECONDS / 2, blobs.WARM_SECONDS + 1):
        now[0] = at
        blob = await store.open_for_serving(digest)
        assert blob is not None
        blob.close()
    assert hops == ["_open", "_open"], "past WARM_SECONDS the open goes to a thread again"


async def test_an_absent_blob_is_not_remembered(
    store: FilesystemBlobStore, hops: list[str]
) -> None:
    digest = Digest("sha256:" + "0" * 64)
    assert await store.open_for_serving(digest) is None
    assert await store.open_for_serving(digest) is None
    assert hops == ["_open", "_open"]
