"""Many clients, one cold blob: one upstream fetch, and every client streams while it fills."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import time

import aiohttp

from tests.fixtures.mirror_server import MirrorProcess
from tests.fixtures.real_upstream import Upstream

CLIENTS = 20


async def fetch(url: str) -> tuple[float, str, int]:
    """(wall time of the first body byte, sha256 of the body, its length)."""
    h = hashlib.sha256()
    first = 0.0
    size = 0
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        assert resp.status == 200, await resp.text()
        async for chunk in resp.content.iter_any():
            if not first:
                first = time.time()
            h.update(chunk)
            size += len(chunk)
    return first, "sha256:" + h.hexdigest(), size


async def settled(count, expected: int, limit: float = 5.0) -> int:  # type: ignore[no-untyped-def]
    """The upstream logs a request just after answering it: give its log a moment."""
    deadline = time.monotonic() + limit
    value = count()
    while value < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        value = count()
    await asyncio.sleep(0.3)  # and make sure no second fetch trails in
    return int(count())


async def test_twenty_clients_one_cold_64mib_blob_one_upstream_fetch(
    upstream: Upstream, mirror: MirrorProcess
) -> None:
    image = upstream.images["big"]
    blob = next(b for b in image.blobs if 64 * 2**20 <= b.size < 128 * 2**20)
    before = upstream.registry.blob_gets(blob.digest)
    url = f"{mirror.url}/v2/{image.repo}/blobs/{blob.digest}"

    results = await asyncio.gather(*(fetch(url) for _ in range(CLIENTS)))

    assert all(digest == blob.digest and size == blob.size for _, digest, size in results)
    fetches = await settled(lambda: upstream.registry.blob_gets(blob.digest), before + 1)
    assert fetches - before == 1
    commits = [e for e in mirror.log_events() if e.get("event") == "blob_fill_committed"]
    assert len(commits) == 1
    committed_at = dt.datetime.fromisoformat(str(commits[0]["timestamp"])).timestamp()
    firsts = sorted(first for first, _, _ in results)
    assert firsts[-1] < committed_at, "every client must get bytes before the fill completes"
    served = [
        e["cache"]
        for e in mirror.log_events()
        if e.get("event") == "request" and blob.digest in str(e.get("path"))
    ]
    assert sorted(served) == sorted(["miss"] + ["joined"] * (CLIENTS - 1))


async def test_concurrent_cold_manifest_requests_make_one_upstream_get(
    upstream: Upstream, mirror: MirrorProcess
) -> None:
    image = upstream.images["multidocker"]
    path = rf"/v2/{image.repo}/manifests/{image.tag}$"
    before = upstream.registry.count("GET", path)
    accept = {"Accept": image.media_type}
    url = f"{mirror.url}/v2/{image.repo}/manifests/{image.tag}"

    async def one() -> str:
        async with aiohttp.ClientSession() as s, s.get(url, headers=accept) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == image.media_type
            assert resp.headers["Docker-Content-Digest"] == image.digest
            return "sha256:" + hashlib.sha256(await resp.read()).hexdigest()

    digests = await asyncio.gather(*(one() for _ in range(CLIENTS)))
    assert set(digests) == {image.digest}
    assert await settled(lambda: upstream.registry.count("GET", path), before + 1) == before + 1
