"""Single-flight fills and tail readers over a real temp directory (no sockets)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator

import pytest

from mirror.cache.blobs import FilesystemBlobStore
from mirror.cache.fill import FillManager, RemoteFill, TailReader, UpstreamBody
from mirror.cache.locks import FileLocks
from mirror.errors import DigestMismatch, UpstreamError
from mirror.reference import Digest

DATA = os.urandom(3 * 1024 * 1024 + 5)
DIGEST = Digest("sha256:" + hashlib.sha256(DATA).hexdigest())


class ControlledBody:
    """An upstream body the test feeds by hand."""

    def __init__(self, size: int | None) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.size = size
        self.opened = 0

    async def open(self, offset: int = 0) -> UpstreamBody:
        self.opened += 1
        return UpstreamBody(self.size, self._chunks(), self._close)

    async def _chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self.queue.get()) is not None:
            yield chunk

    async def _close(self) -> None:
        pass

    def feed(self, data: bytes, step: int = 256 * 1024) -> None:
        for pos in range(0, len(data), step):
            self.queue.put_nowait(data[pos : pos + step])


async def collect(reader: TailReader, into: bytearray) -> bytes:
    try:
        async for offset, count in reader.ranges():
            into += await reader.read(offset, count)
    finally:
        reader.close()
    return bytes(into)


async def wait_for(predicate, limit: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(limit):
        while not predicate():  # noqa: ASYNC110 - polling the fill's progress from outside
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("declared_size", [len(DATA), None])
async def test_readers_tail_but_hold_the_last_byte_until_verified(
    store: FilesystemBlobStore, declared_size: int | None
) -> None:
    fills = FillManager(store, FileLocks(store.root / "locks"))
    body = ControlledBody(declared_size)
    fill, started = fills.join(DIGEST, body.open)
    again, started_again = fills.join(DIGEST, body.open)
    assert started and not started_again and again is fill

    await fill.wait_started()
    readers = [fill.open_reader() for _ in range(3)]
    received = [bytearray() for _ in readers]
    tasks = [asyncio.ensure_future(collect(r, b)) for r, b in zip(readers, received, strict=True)]  # type: ignore[arg-type]

    body.feed(DATA)
    # Everything has arrived, but nothing is verified yet: all readers stop one byte short.
    await wait_for(
        lambda: fill.written == len(DATA) and all(len(b) == len(DATA) - 1 for b in received)
    )
    await asyncio.sleep(0.05)
    assert all(len(b) == len(DATA) - 1 for b in received)
    assert not store.path_for(DIGEST).exists()

    body.queue.put_nowait(None)
    results = await asyncio.gather(*tasks)
    assert all(r == DATA for r in results)
    await fill.wait_done()  # made durable and visible after the readers had everything
    assert store.path_for(DIGEST).read_bytes() == DATA
    assert body.opened == 1
    assert list(store.tmp_dir.iterdir()) == []


async def test_wrong_bytes_fail_every_reader_and_leave_nothing(store: FilesystemBlobStore) -> None:
    fills = FillManager(store, FileLocks(store.root / "locks"))
    body = ControlledBody(len(DATA))
    fill, _ = fills.join(DIGEST, body.open)
    await fill.wait_started()
    reader = fill.open_reader()
    assert reader is not None
    got = bytearray()
    task = asyncio.ensure_future(collect(reader, got))
    body.feed(b"X" + DATA[1:])
    body.queue.put_nowait(None)
    with pytest.raises(DigestMismatch):
        await task
    assert len(got) < len(DATA)
    assert not store.path_for(DIGEST).exists()
    assert list(store.tmp_dir.iterdir()) == []
    assert len(fills) == 0  # a later request starts afresh


async def test_short_body_fails(store: FilesystemBlobStore) -> None:
    fills = FillManager(store, FileLocks(store.root / "locks"))
    body = ControlledBody(len(DATA))
    fill, _ = fills.join(DIGEST, body.open)
    body.feed(DATA[:-10])
    body.queue.put_nowait(None)
    with pytest.raises(UpstreamError):
        await fill.wait_done()
    assert not store.path_for(DIGEST).exists()


async def test_a_reader_leaving_does_not_cancel_the_fill(store: FilesystemBlobStore) -> None:
    fills = FillManager(store, FileLocks(store.root / "locks"))
    body = ControlledBody(len(DATA))
    fill, _ = fills.join(DIGEST, body.open)
    await fill.wait_started()
    reader = fill.open_reader()
    assert reader is not None
    task = asyncio.ensure_future(collect(reader, bytearray()))
    body.feed(DATA[: len(DATA) // 2])
    await asyncio.sleep(0.05)
    task.cancel()
    body.feed(DATA[len(DATA) // 2 :])
    body.queue.put_nowait(None)
    await fill.wait_done()
    assert store.path_for(DIGEST).read_bytes() == DATA


async def test_joining_after_commit_reads_the_store(store: FilesystemBlobStore) -> None:
    await store.put_bytes(DIGEST, DATA)
    fills = FillManager(store, FileLocks(store.root / "locks"))
    body = ControlledBody(len(DATA))
    fill, _ = fills.join(DIGEST, body.open)
    await fill.wait_done()
    assert fill.open_reader() is None
    assert body.opened == 0, "a committed blob must not be fetched again"


async def test_stale_temp_files_are_swept_but_live_ones_kept(store: FilesystemBlobStore) -> None:
    stale = store.tmp_dir / "dead.part"
    stale.write_bytes(b"partial")
    writer = await store.begin_write(DIGEST, len(DATA))
    store.setup()
    assert not stale.exists()
    assert writer.tmp_path.exists()
    await writer.abort()


async def test_a_second_process_follows_the_first_instead_of_fetching(
    store: FilesystemBlobStore,
) -> None:
    """Two managers with their own lock descriptors behave like two worker processes."""
    first = FillManager(store, FileLocks(store.root / "locks"))
    second = FillManager(store, FileLocks(store.root / "locks"))
    body = ControlledBody(len(DATA))
    fill, started = first.join(DIGEST, body.open)
    assert started
    await fill.wait_started()
    follower, started_here = second.join(DIGEST, ControlledBody(len(DATA)).open)
    assert isinstance(follower, RemoteFill) and not started_here

    body.feed(DATA[: len(DATA) // 2])
    await follower.wait_started()
    reader = follower.open_reader()
    assert reader is not None
    got = bytearray()
    task = asyncio.ensure_future(collect(reader, got))
    await wait_for(lambda: len(got) > 0)  # bytes flow before the fill completes
    assert fill.state.value == "streaming"
    body.feed(DATA[len(DATA) // 2 :])
    body.queue.put_nowait(None)
    assert await task == DATA
    assert body.opened == 1


async def test_a_follower_fails_when_the_filler_gives_up(store: FilesystemBlobStore) -> None:
    first = FillManager(store, FileLocks(store.root / "locks"))
    second = FillManager(store, FileLocks(store.root / "locks"))
    body = ControlledBody(len(DATA))
    fill, _ = first.join(DIGEST, body.open)
    await fill.wait_started()
    follower, _ = second.join(DIGEST, ControlledBody(len(DATA)).open)
    await follower.wait_started()
    reader = follower.open_reader()
    assert reader is not None
    task = asyncio.ensure_future(collect(reader, bytearray()))
    body.feed(b"X" + DATA[1:])  # wrong bytes: the filler discards them
    body.queue.put_nowait(None)
    with pytest.raises(UpstreamError):
        await task
    assert not store.path_for(DIGEST).exists()
