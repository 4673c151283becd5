"""Manifests through the mirror: media types, tag TTL and revalidation, tokens, tag lists."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import aiohttp
import pytest

from mirror.mediatypes import ALL_MANIFESTS
from tests.fixtures.clock import Clock
from tests.fixtures.mirror_server import mirror_config, running_mirror
from tests.fixtures.real_upstream import Upstream
from tests.fixtures.synthetic_images import Builder, Pusher
from tests.integration.test_single_flight import settled

ACCEPT_ALL = [("Accept", t) for t in ALL_MANIFESTS]  # as dockerd and skopeo send: one per header


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("key", ["small", "ocismall", "multi", "multidocker", "team"])
async def test_manifest_headers_by_tag_and_digest(
    upstream: Upstream, tmp_path: Path, key: str
) -> None:
    image = upstream.images[key]
    async with (
        running_mirror(mirror_config(tmp_path, upstream.url)) as base,
        aiohttp.ClientSession() as s,
    ):
        for ref in (image.tag, image.digest, image.tag):
            url = f"{base}/v2/{image.repo}/manifests/{ref}"
            async with s.get(url, headers=ACCEPT_ALL) as resp:
                assert resp.status == 200
                body = await resp.read()
                assert sha(body) == image.digest
                assert resp.headers["Content-Type"] == image.media_type
                assert resp.headers["Docker-Content-Digest"] == image.digest
                assert resp.headers["ETag"] == f'"{image.digest}"'
                assert int(resp.headers["Content-Length"]) == len(image.manifest)
            async with s.head(url, headers=ACCEPT_ALL) as resp:
                assert resp.status == 200
                assert await resp.read() == b""
                assert resp.headers["Docker-Content-Digest"] == image.digest
                assert int(resp.headers["Content-Length"]) == len(image.manifest)
            etag = {"If-None-Match": f'"{image.digest}"'}
            async with s.get(url, headers=[*ACCEPT_ALL, *etag.items()]) as resp:
                assert resp.status == 304


async def test_tag_ttl_then_head_revalidation_then_refetch_when_moved(
    upstream: Upstream, tmp_path: Path
) -> None:
    builder = Builder(tmp_path / "images")
    first = builder.image("library/moving", "latest", [1000], oci=True)
    second = builder.image("library/moving", "latest", [2000], oci=True)
    pusher = Pusher(upstream.url, upstream.tokens)
    await asyncio.to_thread(pusher.push, first)

    reg = upstream.registry
    path = r"/v2/library/moving/manifests/latest$"

    def counts() -> tuple[int, int]:
        return reg.count("GET", path), reg.count("HEAD", path)

    clock = Clock()
    config = mirror_config(tmp_path / "cache", upstream.url, tag_ttl="10m")
    async with running_mirror(config, clock) as base, aiohttp.ClientSession() as s:

        async def get() -> str:
            url = f"{base}/v2/library/moving/manifests/latest"
            async with s.get(url, headers=ACCEPT_ALL) as resp:
                assert resp.status == 200
                return sha(await resp.read())

        gets, heads = counts()
        assert await get() == first.digest
        assert await settled(lambda: counts()[0], gets + 1) == gets + 1

        clock.now += 599  # within the TTL: no upstream contact at all
        for _ in range(5):
            assert await get() == first.digest
        await asyncio.sleep(0.3)
        assert counts() == (gets + 1, heads)

        clock.now += 2  # past the TTL, tag unchanged: one HEAD, no GET
        assert await get() == first.digest
        assert await settled(lambda: counts()[1], heads + 1) == heads + 1
        assert counts()[0] == gets + 1
        assert await get() == first.digest  # TTL restarted by the revalidation
        await asyncio.sleep(0.3)
        assert counts() == (gets + 1, heads + 1)

        await asyncio.to_thread(pusher.push, second)  # the tag moves upstream
        clock.now += 601
        assert await get() == second.digest
        assert await settled(lambda: counts()[0], gets + 2) == gets + 2
        assert counts()[1] == heads + 2
    pusher.close()


async def test_one_token_fetch_serves_concurrent_requests(
    upstream: Upstream, tmp_path: Path
) -> None:
    image = upstream.images["team"]
    scope_key = (None, f"repository:{image.repo}:pull")
    before = upstream.tokens.requests[scope_key]
    async with (
        running_mirror(mirror_config(tmp_path, upstream.url)) as base,
        aiohttp.ClientSession() as s,
    ):

        async def one(ref: str) -> str:
            url = f"{base}/v2/{image.repo}/manifests/{ref}"
            async with s.get(url, headers=ACCEPT_ALL) as resp:
                assert resp.status == 200
                return sha(await resp.read())

        refs = [image.tag, image.digest] * 10
        assert set(await asyncio.gather(*(one(r) for r in refs))) == {image.digest}
        blobs = [f"{base}/v2/{image.repo}/blobs/{b.digest}" for b in image.blobs]
        for url in blobs:
            async with s.get(url) as resp:
                assert sha(await resp.read()) in {b.digest for b in image.blobs}
    assert upstream.tokens.requests[scope_key] - before == 1


async def test_tag_list_pagination_points_back_at_the_mirror(
    upstream: Upstream, tmp_path: Path
) -> None:
    config = mirror_config(tmp_path, upstream.url, library_prefix="true")
    async with running_mirror(config) as base, aiohttp.ClientSession() as s:
        tags: list[str] = []
        url = f"{base}/v2/multi/tags/list?n=1"
        for _ in range(10):
            async with s.get(url) as resp:
                assert resp.status == 200
                body = await resp.json()
                assert body["name"] == "library/multi"
                tags += body["tags"]
                link = resp.headers.get("Link")
            if not link:
                break
            target = link.split(";")[0].strip("<> ")
            assert target.startswith("/v2/multi/tags/list?")
            url = base + target
        assert sorted(tags) == ["latest", "latest-amd64", "latest-arm64"]
        async with s.get(f"{base}/v2/library/nonexistent/tags/list") as resp:
            assert resp.status == 404
            assert (await resp.json())["errors"][0]["code"] == "NAME_UNKNOWN"


async def test_unknown_manifest_is_manifest_unknown(upstream: Upstream, tmp_path: Path) -> None:
    async with (
        running_mirror(mirror_config(tmp_path, upstream.url)) as base,
        aiohttp.ClientSession() as s,
    ):
        for ref in ("nope", "sha256:" + "0" * 64):
            async with s.get(f"{base}/v2/library/small/manifests/{ref}") as resp:
                assert resp.status == 404
                assert (await resp.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
