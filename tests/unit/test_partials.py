"""Partials left by a dead fill: claimed once, from the same source only, re-hashed, resumed;
wrong, oversized or stale ones discarded (a real temp directory, no sockets)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mirror.cache.blobs import FileBlobWriter, FilesystemBlobStore
from mirror.cache.fill import FillManager, TailReader, UpstreamBody
from mirror.cache.locks import FileLocks
from mirror.config import load_config
from mirror.errors import DigestMismatch
from mirror.node import open_node
from mirror.reference import Digest

DATA = os.urandom(3 * 1024 * 1024 + 5)
DIGEST = Digest("sha256:" + hashlib.sha256(DATA).hexdigest())
SOURCE = "default/lib/app http://127.0.0.1:5000"
HALF = len(DATA) // 2


async def abandoned(
    store: FilesystemBlobStore, data: bytes, source: str = SOURCE, size: int = len(DATA)
) -> Path:
    """A temp file as a killed writer leaves it: bytes written, flock gone, never unlinked."""
    writer = await store.begin_write(DIGEST, size, source)
    await writer.write(data)
    writer._close()  # the process died: its descriptor (and flock) went with it
    return writer.tmp_path


class Upstream:
    """Serves DATA from the offset asked, recording each offset."""

    def __init__(self, data: bytes = DATA) -> None:
        self.data = data
        self.offsets: list[int] = []

    async def open(self, offset: int) -> UpstreamBody:
        self.offsets.append(offset)

        async def chunks() -> AsyncIterator[bytes]:
            for pos in range(offset, len(self.data), 256 * 1024):
                yield self.data[pos : pos + 256 * 1024]

        async def close() -> None:
            return None

        return UpstreamBody(len(self.data) - offset, chunks(), close)


async def read_all(reader: TailReader) -> bytes:
    out = bytearray()
    try:
        async for offset, count in reader.ranges():
            out += await reader.read(offset, count)
    finally:
        reader.close()
    return bytes(out)


async def test_fill_resumes_a_dead_writers_partial_from_its_end(
    store: FilesystemBlobStore,
) -> None:
    await abandoned(store, DATA[:HALF])
    upstream = Upstream()
    fills = FillManager(store, FileLocks(store.root / "locks"))
    fill, _ = fills.join(DIGEST, upstream.open, SOURCE)
    await fill.wait_started()
    assert fill.written >= HALF  # the partial's bytes are there at once
    reader = fill.open_reader()
    assert reader is not None
    assert await read_all(reader) == DATA
    await fill.wait_done()
    assert upstream.offsets == [HALF]  # only the rest was asked for
    assert store.path_for(DIGEST).read_bytes() == DATA
    assert list(store.tmp_dir.iterdir()) == []


async def test_another_sources_partial_is_not_resumed(store: FilesystemBlobStore) -> None:
    kept = await abandoned(store, DATA[:HALF], source="other/lib/app http://elsewhere")
    upstream = Upstream()
    fills = FillManager(store, FileLocks(store.root / "locks"))
    fill, _ = fills.join(DIGEST, upstream.open, SOURCE)
    await fill.wait_done()
    assert upstream.offsets == [0]
    assert kept.exists()  # left for the sweep
    assert await store.resume_write(DIGEST, SOURCE) is None


async def test_a_partial_is_claimed_once_and_never_from_a_live_writer(
    store: FilesystemBlobStore,
) -> None:
    live = await store.begin_write(DIGEST, len(DATA), SOURCE)
    await live.write(DATA[:100])
    assert await store.resume_write(DIGEST, SOURCE) is None  # its flock is held
    assert store.find_partial(DIGEST) == (live.tmp_path, len(DATA))
    await live.abort()

    await abandoned(store, DATA[:HALF])
    assert store.find_partial(DIGEST) is None  # abandoned: not a fill in progress
    assert store.partials() == []
    first = await store.resume_write(DIGEST, SOURCE)
    assert first is not None and first.written == HALF
    assert await store.resume_write(DIGEST, SOURCE) is None  # the first claim holds it
    assert [p.name for p in store.tmp_dir.iterdir()] == [first.tmp_path.name]
    await first.abort()


async def test_wrong_partial_fails_the_digest_and_is_discarded(
    store: FilesystemBlobStore,
) -> None:
    wrong = bytes(b ^ 0xFF for b in DATA[:HALF])
    await abandoned(store, wrong)
    upstream = Upstream()
    fills = FillManager(store, FileLocks(store.root / "locks"))
    fill, _ = fills.join(DIGEST, upstream.open, SOURCE)
    await fill.wait_started()
    reader = fill.open_reader()
    assert reader is not None
    with pytest.raises(DigestMismatch):
        await read_all(reader)  # never the whole: the last byte waits for the digest
    assert fill.task is not None
    await asyncio.wait([fill.task])
    await asyncio.sleep(0)  # the manager forgets it
    assert store.path_for(DIGEST).exists() is False
    assert list(store.tmp_dir.iterdir()) == []  # discarded
    # The next fill fetches it whole.
    fill, _ = fills.join(DIGEST, upstream.open, SOURCE)
    await fill.wait_done()
    assert upstream.offsets == [HALF, 0]
    assert store.path_for(DIGEST).read_bytes() == DATA


async def test_partial_longer_than_the_blob_is_discarded(store: FilesystemBlobStore) -> None:
    path = await abandoned(store, DATA[:HALF])
    os.truncate(path, len(DATA) + 1)  # past the declared size
    assert await store.resume_write(DIGEST, SOURCE) is None
    assert list(store.tmp_dir.iterdir()) == []


async def test_upstream_of_another_size_starts_over(store: FilesystemBlobStore) -> None:
    await abandoned(store, DATA[:HALF], size=len(DATA) + 1)  # declared by another answer
    upstream = Upstream()
    fills = FillManager(store, FileLocks(store.root / "locks"))
    fill, _ = fills.join(DIGEST, upstream.open, SOURCE)
    await fill.wait_done()
    assert upstream.offsets == [HALF, 0]
    assert store.path_for(DIGEST).read_bytes() == DATA


async def test_complete_partial_commits_without_the_upstream(
    store: FilesystemBlobStore,
) -> None:
    await abandoned(store, DATA)
    upstream = Upstream()
    fills = FillManager(store, FileLocks(store.root / "locks"))
    fill, _ = fills.join(DIGEST, upstream.open, SOURCE)
    await fill.wait_done()
    assert upstream.offsets == []
    assert store.path_for(DIGEST).read_bytes() == DATA


async def test_unreadable_partial_fails_its_rehash(store: FilesystemBlobStore) -> None:
    await abandoned(store, DATA[:HALF])
    writer = await store.resume_write(DIGEST, SOURCE)
    assert isinstance(writer, FileBlobWriter)
    os.truncate(writer.tmp_path, 10)  # shrank under us: the claimed bytes are gone
    with pytest.raises(OSError):
        await writer.rehash()
    await writer.abort()


async def test_sweep_keeps_young_resumable_partials_within_the_total(
    store: FilesystemBlobStore,
) -> None:
    old = await abandoned(store, DATA[:100])
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    newest = await abandoned(store, DATA[:HALF])
    too_many = await abandoned(store, DATA[:HALF])
    os.utime(too_many, (time.time() - 60, time.time() - 60))
    unresumable = await abandoned(store, DATA[:100], source=None)  # type: ignore[arg-type]  # no source: never resumable
    live = await store.begin_write(DIGEST, len(DATA), SOURCE)
    freed = await asyncio.to_thread(store.sweep_partials, 3600, HALF + 10)
    left = {p.name for p in store.tmp_dir.iterdir()}
    assert left == {newest.name, live.tmp_path.name}
    assert freed == 100 + HALF + 100
    assert not old.exists() and not too_many.exists() and not unresumable.exists()
    store.sweep_partials(0, 0)  # none kept
    assert {p.name for p in store.tmp_dir.iterdir()} == {live.tmp_path.name}
    await live.abort()


@pytest.mark.parametrize(
    ("settings", "kept"),
    [
        ({}, True),  # the defaults (a day, 4 GiB) keep a fresh partial
        ({"cache.partial_max_age": "0"}, False),
        ({"cache.partial_max_size": "1KiB"}, False),  # the partial is bigger than the bound
    ],
)
async def test_partial_settings_take_effect_at_start(
    store: FilesystemBlobStore, tmp_path: Path, settings: dict[str, str], kept: bool
) -> None:
    partial = await abandoned(store, DATA[:HALF])
    config = load_config(None, env={}, overrides={"cache.dir": str(tmp_path), **settings})
    async with open_node(config):
        assert partial.exists() is kept
