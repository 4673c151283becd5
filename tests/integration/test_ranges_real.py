"""Ranges and resumed upstream bodies against the real registry (`docker-registry`, which
answers ranged blob GETs), with a TCP proxy between mirror and registry that slows the link
or breaks one body part-way, and counts the bytes the registry sent."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email import message_from_bytes
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from tests.fixtures.mirror_server import free_port, mirror_config, running_mirror, wait_cached
from tests.fixtures.real_upstream import Upstream

KiB = 1024
MiB = 1024 * KiB


class LinkProxy:
    """TCP proxy to the registry: `rate` bytes/s downstream (0: unlimited), and once, the
    first connection whose downstream passes `break_after` bytes is cut there."""

    def __init__(self, target_port: int, *, rate: float = 0, break_after: int | None = None):
        self.target_port = target_port
        self.rate = rate
        self.break_after = break_after
        self.port = free_port()
        self.downstream = 0  # bytes the registry sent through us
        self.broke = False
        self.server: asyncio.Server | None = None

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, down: bool
    ) -> None:
        carried = 0
        try:
            while data := await reader.read(64 * KiB):
                limit = self.break_after
                if down and limit is not None and not self.broke and carried + len(data) >= limit:
                    self.broke = True
                    data = data[: limit - carried]
                    writer.write(data)
                    self.downstream += len(data)
                    await writer.drain()
                    return
                carried += len(data)
                if down:
                    self.downstream += len(data)
                    if self.rate:
                        await asyncio.sleep(len(data) / self.rate)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            self._pipe(reader, up_writer, False), self._pipe(up_reader, writer, True)
        )
        up_writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        try:
            yield f"http://127.0.0.1:{self.port}"
        finally:
            self.server.close()


def registry_port(upstream: Upstream) -> int:
    port = urlsplit(upstream.url).port
    assert port is not None
    return port


def blob_of(upstream: Upstream, size: int) -> tuple[str, str, Path]:
    """The "big" image's layer of about `size` bytes."""
    image = upstream.images["big"]
    blob = next(b for b in image.blobs if size <= b.size < 2 * size)
    return image.repo, blob.digest, blob.path


async def test_a_body_broken_half_way_is_resumed_with_one_ranged_get(
    upstream: Upstream, tmp_path: Path
) -> None:
    repo, digest, path = blob_of(upstream, 64 * MiB)
    before = upstream.registry.blob_gets(digest)
    proxy = LinkProxy(registry_port(upstream), break_after=32 * MiB)
    async with (
        proxy.running() as via,
        running_mirror(mirror_config(tmp_path, via)) as base,
        aiohttp.ClientSession() as s,
    ):
        url = f"{base}/v2/{repo}/blobs/{digest}"

        async def pull() -> str:
            async with s.get(url) as resp:
                assert resp.status == 200
                sha = hashlib.sha256()
                async for chunk in resp.content.iter_chunked(MiB):
                    sha.update(chunk)
                return "sha256:" + sha.hexdigest()

        assert await asyncio.gather(pull(), pull(), pull()) == [digest] * 3
        wait_cached(tmp_path, digest)
    assert proxy.broke
    assert upstream.registry.blob_gets(digest) - before == 2  # the first, and one resume
    statuses = [
        r.status
        for r in upstream.registry.requests()
        if r.method == "GET" and r.uri.endswith(f"/blobs/{digest}")
    ]
    assert statuses[-2:] == [200, 206]
    size = path.stat().st_size
    print(f"\nbytes through the link for a {size} B blob broken at 50%: {proxy.downstream}")
    assert size <= proxy.downstream < size + 64 * KiB  # each byte once (plus headers)


async def test_ranges_on_a_filling_blob_from_the_real_registry(
    upstream: Upstream, tmp_path: Path
) -> None:
    repo, digest, path = blob_of(upstream, 64 * MiB)
    data = path.read_bytes()
    before = upstream.registry.blob_gets(digest)
    proxy = LinkProxy(registry_port(upstream), rate=24 * MiB)  # ~2.7 s for the blob
    async with (
        proxy.running() as via,
        running_mirror(mirror_config(tmp_path, via)) as base,
        aiohttp.ClientSession() as s,
    ):
        url = f"{base}/v2/{repo}/blobs/{digest}"
        whole = asyncio.ensure_future(s.get(url))
        await asyncio.sleep(0.5)  # the fill is under way
        started = time.perf_counter()
        async with s.get(url, headers={"Range": "bytes=0-1023"}) as resp:
            assert resp.status == 206 and await resp.read() == data[:KiB]
        elapsed = time.perf_counter() - started
        assert elapsed < 0.1, f"first KiB took {elapsed:.3f}s"
        assert not (tmp_path / "blobs" / "sha256" / digest[7:9] / digest[7:]).exists()
        async with s.get(url, headers={"Range": "bytes=0-9,1000-1009,-1024"}) as resp:
            assert resp.status == 206
            body = await resp.read()
            content_type = resp.headers["Content-Type"]
        message = message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
        parts = message.get_payload()
        assert isinstance(parts, list)
        assert [p.get_payload(decode=True) for p in parts] == [
            data[:10],
            data[1000:1010],
            data[-KiB:],
        ]
        async with await whole as resp:
            assert hashlib.sha256(await resp.read()).hexdigest() == digest[7:]
    assert upstream.registry.blob_gets(digest) - before == 1  # the ranges joined the one fill
