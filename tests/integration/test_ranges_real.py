"""Ranges and resumed upstream bodies against the real registry (`docker-registry`, which
answers ranged blob GETs), with a TCP proxy between mirror and registry that slows the link
or breaks one body part-way, and counts the bytes the registry sent."""

from __future__ import annotations

import asyncio
import hashlib
import time
from email import message_from_bytes
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from tests.fixtures.mirror_server import mirror_config, running_mirror, wait_cached
from tests.fixtures.real_upstream import Upstream
from tests.fixtures.throttle import Throttle

KiB = 1024
MiB = 1024 * KiB


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
    proxy = Throttle(registry_port(upstream), break_after=32 * MiB)
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
    proxy = Throttle(registry_port(upstream), rate=24 * MiB)  # ~2.7 s for the blob
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
