"""The hash thread of a stream past its disk: whole, bounded, and never a hang."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading

import pytest

from mirror.cache.stream_hash import StreamHasher


class GatedHasher:
    """A SHA-256 that hashes nothing until its gate opens."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.inner = hashlib.sha256()

    def update(self, data: bytes | memoryview) -> None:
        assert self.gate.wait(10), "the test never opened the gate"
        self.inner.update(data)

    def hexdigest(self) -> str:
        return self.inner.hexdigest()


async def test_every_chunk_fed_is_in_the_hash_in_order() -> None:
    data = os.urandom(3 * 1024 * 1024 + 11)
    hasher = hashlib.sha256()
    stream = StreamHasher(hasher)
    try:
        view, pos = memoryview(data), 0
        for size in (1, 65536, 1 << 20, 7, 1 << 20, 300000):
            await stream.feed(view[pos : pos + size], limit=1 << 20)
            pos += size
        await stream.feed(view[pos:], limit=1 << 20)
        await asyncio.wait_for(stream.finish(), 10)
    finally:
        stream.close()
    assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()
    assert stream.hashed == stream.fed == len(data)


async def test_feeding_waits_while_more_than_the_limit_is_unhashed() -> None:
    hasher = GatedHasher()
    stream = StreamHasher(hasher)  # type: ignore[arg-type]  # a Hasher by shape
    try:
        await asyncio.wait_for(stream.feed(b"x" * 8, limit=10), 1)  # 8 unhashed: no wait
        second = asyncio.ensure_future(stream.feed(b"y" * 8, limit=10))  # 16: waits
        await asyncio.sleep(0.2)
        assert not second.done(), "the fill reads no more while the hash is that far behind"
        hasher.gate.set()
        await asyncio.wait_for(second, 10)
        assert stream.fed - stream.hashed <= 5
        await asyncio.wait_for(stream.finish(), 10)
    finally:
        hasher.gate.set()
        stream.close()
    assert hasher.hexdigest() == hashlib.sha256(b"x" * 8 + b"y" * 8).hexdigest()


async def test_a_failing_hash_fails_the_fill_instead_of_hanging_it() -> None:
    class Broken:
        def update(self, data: bytes | memoryview) -> None:
            raise MemoryError("no room to hash")

        def hexdigest(self) -> str:
            raise AssertionError("never asked")

    stream = StreamHasher(Broken())  # type: ignore[arg-type]  # a Hasher by shape
    try:
        await stream.feed(b"abc", limit=1 << 20)
        with pytest.raises(MemoryError, match="no room to hash"):
            await asyncio.wait_for(stream.finish(), 10)
    finally:
        stream.close()


async def test_close_ends_the_thread_and_drops_what_was_queued() -> None:
    hasher = GatedHasher()
    stream = StreamHasher(hasher)  # type: ignore[arg-type]  # a Hasher by shape
    await stream.feed(b"a", limit=1 << 20)
    await asyncio.sleep(0.05)  # the thread holds "a", waiting at the gate
    await stream.feed(b"b" * 100, limit=1 << 20)
    stream.close()
    hasher.gate.set()
    stream._thread.join(10)
    assert not stream._thread.is_alive()
    assert stream.hashed <= 1, "what was queued at close is dropped, not hashed"
