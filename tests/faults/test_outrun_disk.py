"""With `cache.outrun_disk`, a client faster than the cache's disk is not held to its pace:
the fill leaves the disk behind, releases the last byte once the stream's own hash matched,
and then fetches the part the disk missed again, which is verified on its own before the
commit. Wrong bytes in either fetch release or commit nothing."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web

from mirror.cache import blobs
from mirror.config import Config
from mirror.interfaces import Chunk
from mirror.reference import Digest
from mirror.web.keys import MIRROR
from tests.fixtures.fake_upstream import FakeUpstream, Fault
from tests.fixtures.mirror_server import (
    fills_settled,
    mirror_config,
    running_app,
    sha256_digest,
    wait_cached,
)

MiB = 1024 * 1024
SIZE = 40 * MiB  # the fill leaves the disk behind only with 16 MiB or more to come


@pytest.fixture
def slow_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write batch takes 0.2 s: a disk far slower than the in-process upstream."""
    write_all = blobs.FileBlobWriter._write_all

    def slow(self: blobs.FileBlobWriter, chunks: list[Chunk]) -> None:
        time.sleep(0.2)
        write_all(self, chunks)

    monkeypatch.setattr(blobs.FileBlobWriter, "_write_all", slow)


async def _pull(base: str, digest: str, app: web.Application) -> int:
    """One client's GET of the blob, checked against its digest; how many bytes the temp file
    held when the client had them all."""
    got = bytearray()
    on_disk = SIZE
    async with aiohttp.ClientSession() as s, s.get(f"{base}/v2/lib/app/blobs/{digest}") as resp:
        assert resp.status == 200
        async for chunk in resp.content.iter_any():
            got += chunk
        fill = app[MIRROR].fills.get(Digest(digest))
        if fill is not None:
            on_disk = fill.written
    assert sha256_digest(bytes(got)) == digest
    return on_disk


async def _slow_head_client(base: str, digest: str, progress: Callable[[int], None]) -> bytes:
    """A client that reads 12 MiB fast, then 1 MiB every 0.1 s, calling `progress` after
    each read: a plain socket with a small receive buffer, so that reading slowly slows what
    the mirror can send it (aiohttp's client would buffer the whole blob)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", urlsplit(base).port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET /v2/lib/app/blobs/{digest} HTTP/1.1\r\nHost: mirror\r\n\r\n".encode())
    headers = await reader.readuntil(b"\r\n\r\n")
    assert headers.startswith(b"HTTP/1.1 200"), headers
    got = bytearray(await reader.readexactly(12 * MiB))
    progress(len(got))
    while len(got) < SIZE:
        got += await reader.readexactly(min(MiB, SIZE - len(got)))
        progress(len(got))
        await asyncio.sleep(0.1)
    writer.close()
    return bytes(got)


def outrun(cache: Path, fake: FakeUpstream) -> Config:
    return mirror_config(cache, fake.url, settings={"cache.outrun_disk": "true"})


def _cached_bytes(cache: Path, digest: str) -> bytes:
    hexa = digest.split(":", 1)[1]
    return (cache / "blobs" / "sha256" / hexa[:2] / hexa).read_bytes()


async def test_a_client_faster_than_the_disk_gets_the_blob_before_the_disk_has_it(
    fake: FakeUpstream, tmp_path: Path, slow_disk: None
) -> None:
    digest = fake.add_blob(os.urandom(SIZE))
    async with running_app(outrun(tmp_path, fake)) as (base, app):
        on_disk = await _pull(base, digest, app)
        assert on_disk < SIZE // 2, f"the client waited for the disk ({on_disk} bytes written)"
        await fills_settled(app, limit=30)  # (the rest is fetched on this loop)
        wait_cached(tmp_path, digest)
    assert hashlib.sha256(_cached_bytes(tmp_path, digest)).hexdigest() == digest[7:]
    # The second fetch asked for exactly the part the disk missed, and nothing else.
    rest = [asked for d, asked, _ in fake.ranges_asked if d == digest and asked]
    assert len(rest) == 1, fake.ranges_asked
    offset = int(rest[0].removeprefix("bytes=").rstrip("-"))
    assert 0 < offset < SIZE - 16 * MiB
    assert fake.bytes_sent[digest] == SIZE + (SIZE - offset)


async def test_by_default_the_client_keeps_the_disks_pace_and_bytes_cross_once(
    fake: FakeUpstream, tmp_path: Path, slow_disk: None
) -> None:
    """The setting takes effect (off by default): one fetch, and the client's last byte
    waits for the disk."""
    digest = fake.add_blob(os.urandom(SIZE))
    config = mirror_config(tmp_path, fake.url)
    async with running_app(config) as (base, app):
        on_disk = await _pull(base, digest, app)
        assert on_disk == SIZE
        await fills_settled(app, limit=30)
        wait_cached(tmp_path, digest)
    assert fake.count("GET", digest) == 1
    assert fake.bytes_sent[digest] == SIZE


async def test_wrong_bytes_in_the_stream_past_the_disk_release_nothing(
    fake: FakeUpstream, tmp_path: Path, slow_disk: None
) -> None:
    """The stream's hash covers the bytes the disk took too: a body wrong in its first bytes
    (written before the disk was left behind) still never completes for the client."""
    digest = fake.add_blob(os.urandom(SIZE))
    fake.faults[digest] = Fault(wrong_bytes=True)
    async with running_app(outrun(tmp_path, fake)) as (base, app):
        got = bytearray()
        with pytest.raises(aiohttp.ClientPayloadError):
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"{base}/v2/lib/app/blobs/{digest}") as resp,
            ):
                async for chunk in resp.content.iter_any():
                    got += chunk
        assert len(got) < SIZE
        await fills_settled(app, limit=30)
        assert await app[MIRROR].store.stat(Digest(digest)) is None


async def test_wrong_bytes_in_the_second_fetch_are_not_committed(
    fake: FakeUpstream, tmp_path: Path, slow_disk: None
) -> None:
    """The client's bytes were right and it keeps them; the file's rest came back different
    and fails its own check: nothing is committed, and the next pull fetches again."""
    digest = fake.add_blob(os.urandom(SIZE))
    fake.faults[digest] = Fault(wrong_ranges=True)
    async with running_app(outrun(tmp_path, fake)) as (base, app):
        await _pull(base, digest, app)
        await fills_settled(app, limit=30)
        assert await app[MIRROR].store.stat(Digest(digest)) is None
        del fake.faults[digest]
        await _pull(base, digest, app)
        await fills_settled(app, limit=30)
        wait_cached(tmp_path, digest)
    assert hashlib.sha256(_cached_bytes(tmp_path, digest)).hexdigest() == digest[7:]
    whole = [asked for d, asked, _ in fake.ranges_asked if d == digest and not asked]
    assert len(whole) == 2  # one per pull (each also fetched its disk's rest again)


async def test_a_reader_that_stalls_does_not_pace_the_fill(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """The fill waits for its most advanced reader only while that reader moves: a client
    that stops reading ahead of another does not hold the other back."""
    digest = fake.add_blob(os.urandom(SIZE))
    async with running_app(outrun(tmp_path, fake)) as (base, app):
        url = f"{base}/v2/lib/app/blobs/{digest}"
        async with aiohttp.ClientSession() as stalled, stalled.get(url) as first:
            await first.content.readexactly(MiB)  # then never again, its socket full
            async with aiohttp.ClientSession() as s, s.get(url) as resp:
                started = time.monotonic()
                body = await asyncio.wait_for(resp.read(), timeout=20)
                took = time.monotonic() - started
        assert sha256_digest(body) == digest
        assert took < 5, f"{took:.1f}s"
        await fills_settled(app, limit=30)
        wait_cached(tmp_path, digest)


async def test_a_reader_behind_a_disk_left_behind_is_not_held_to_the_head_readers_pace(
    fake: FakeUpstream, tmp_path: Path, slow_disk: None
) -> None:
    """A client that joins after the disk was left behind reads the temp file: the file's
    rest is fetched at once, not after the head client (here a slow one, which paces the
    stream) has everything."""
    digest = fake.add_blob(os.urandom(SIZE))
    async with running_app(outrun(tmp_path, fake)) as (base, app):
        url = f"{base}/v2/lib/app/blobs/{digest}"
        joiner_bytes_while_head_reads = 0
        joiner = bytearray()

        async def join() -> None:
            async with aiohttp.ClientSession() as s, s.get(url) as resp:
                async for chunk in resp.content.iter_any():
                    joiner.extend(chunk)

        task = None

        def progress(got: int) -> None:
            nonlocal task, joiner_bytes_while_head_reads
            if got == 12 * MiB:  # the disk is left behind by now
                task = asyncio.ensure_future(join())
            if got == 30 * MiB:  # the stream has 10 MiB to go at 10 MB/s: > 0.5 s
                joiner_bytes_while_head_reads = len(joiner)

        head = await _slow_head_client(base, digest, progress)
        assert task is not None
        await asyncio.wait_for(task, 30)
        assert sha256_digest(bytes(head)) == digest
        assert sha256_digest(bytes(joiner)) == digest
        assert joiner_bytes_while_head_reads >= 8 * MiB, joiner_bytes_while_head_reads
        await fills_settled(app, limit=30)
        wait_cached(tmp_path, digest)
    rest = [asked for d, asked, _ in fake.ranges_asked if d == digest and asked]
    assert len(rest) == 1, fake.ranges_asked


async def test_the_files_rest_is_fetched_while_a_slow_head_client_still_reads(
    fake: FakeUpstream, tmp_path: Path, slow_disk: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readers in other worker processes follow the temp file and cannot say they wait: a
    while (`REST_AFTER`) after leaving the disk behind, the file's rest is fetched anyway."""
    from mirror.cache import fill

    monkeypatch.setattr(fill, "REST_AFTER", 0.5)
    digest = fake.add_blob(os.urandom(SIZE))
    asked_while_head_reads: list[str | None] = []

    def progress(got: int) -> None:
        if got == 30 * MiB:  # about 1.8 s after the disk was left behind
            asked_while_head_reads.extend(a for d, a, _ in fake.ranges_asked if d == digest)

    async with running_app(outrun(tmp_path, fake)) as (base, app):
        head = await _slow_head_client(base, digest, progress)
        assert sha256_digest(head) == digest
        await fills_settled(app, limit=30)
        wait_cached(tmp_path, digest)
    assert len([a for a in asked_while_head_reads if a]) == 1, asked_while_head_reads


async def test_a_graceful_stop_lets_a_fill_store_the_rest_its_clients_already_have(
    fake: FakeUpstream, tmp_path: Path, slow_disk: None
) -> None:
    digest = fake.add_blob(os.urandom(SIZE))
    async with running_app(outrun(tmp_path, fake)) as (base, app):
        on_disk = await _pull(base, digest, app)
        assert on_disk < SIZE  # the rest is still being fetched as the mirror stops
    assert hashlib.sha256(_cached_bytes(tmp_path, digest)).hexdigest() == digest[7:]
    assert list((tmp_path / "tmp").iterdir()) == []
