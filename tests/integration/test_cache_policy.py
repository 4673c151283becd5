"""The cache policy with real pulls: budget and LRU, pins, TTLs, restarts, a full disk."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from mirror.cache.index import CacheIndex
from mirror.web.keys import MIRROR, NODE
from tests.fixtures.clock import Clock
from tests.fixtures.mirror_server import fills_settled, mirror_config, running_app, sha256_digest
from tests.fixtures.real_upstream import Upstream
from tests.fixtures.synthetic_images import Image
from tests.integration.test_manifests import ACCEPT_ALL


async def pull(s: aiohttp.ClientSession, base: str, image: Image) -> None:
    """What a client does: the manifest by tag, then every blob, each checked."""
    async with s.get(f"{base}/v2/{image.repo}/manifests/{image.tag}", headers=ACCEPT_ALL) as r:
        assert r.status == 200 and sha256_digest(await r.read()) == image.digest
    for child in image.children:
        async with s.get(f"{base}/v2/{image.repo}/manifests/{child.digest}") as r:
            assert sha256_digest(await r.read()) == child.digest
    for blob in image.all_blobs():
        async with s.get(f"{base}/v2/{image.repo}/blobs/{blob.digest}") as r:
            assert r.status == 200 and sha256_digest(await r.read()) == blob.digest


def footprint(image: Image) -> int:
    return (
        len(image.manifest)
        + sum(len(c.manifest) for c in image.children)
        + sum(b.size for b in image.all_blobs())
    )


def cached(cache: Path, image: Image) -> bool:
    return all(
        (cache / "blobs" / "sha256" / b.digest[7:9] / b.digest[7:]).exists()
        for b in image.all_blobs()
    )


async def policy_pass(app: web.Application) -> None:
    """The housekeeping loop's pass, now."""
    await app[NODE].policy.run_pass()


async def test_budget_evicts_least_recently_served_and_spares_pins(
    upstream: Upstream, tmp_path: Path
) -> None:
    small, oci, team = (upstream.images[k] for k in ("small", "ocismall", "team"))
    total = footprint(small) + footprint(oci) + footprint(team)
    budget = total + 1000
    settings: dict[str, object] = {
        "cache.max_size": str(budget),
        "cache.high_watermark": (total - 500) / budget,
        "cache.low_watermark": (total - footprint(oci) + 500) / budget,
        "cache.pins": [team.ref],
    }
    config = mirror_config(tmp_path, upstream.url, settings=settings)
    async with running_app(config) as (base, app), aiohttp.ClientSession() as s:
        await pull(s, base, small)
        await fills_settled(app)  # committed (clients finish first)
        await pull(s, base, oci)
        await fills_settled(app)  # committed (clients finish first)
        await pull(s, base, team)
        await fills_settled(app)  # committed (clients finish first)
        await pull(s, base, small)  # served again: now the most recent
        await fills_settled(app)  # committed (clients finish first)
        await policy_pass(app)
        assert cached(tmp_path, small), "recently served: kept"
        assert cached(tmp_path, team), "pinned: kept"
        assert not cached(tmp_path, oci), "least recently served: evicted"
        # Its manifest is gone from memory too: asked by digest, it is fetched again.
        gets = upstream.registry.count("GET", f"/manifests/{oci.digest}$")
        url = f"{base}/v2/{oci.repo}/manifests/{oci.digest}"
        async with s.get(url, headers=ACCEPT_ALL) as r:
            assert r.status == 200 and sha256_digest(await r.read()) == oci.digest
        assert upstream.registry.count("GET", f"/manifests/{oci.digest}$") == gets + 1
        # An evicted blob is simply fetched again, verified.
        before = upstream.registry.blob_gets(oci.blobs[1].digest)
        await pull(s, base, oci)
        await fills_settled(app)  # committed (clients finish first)
        assert upstream.registry.blob_gets(oci.blobs[1].digest) == before + 1


async def test_ttl_evicts_what_was_not_served_for_too_long(
    upstream: Upstream, tmp_path: Path
) -> None:
    clock = Clock()
    small, oci = upstream.images["small"], upstream.images["ocismall"]
    config = mirror_config(
        tmp_path, upstream.url, settings={"cache.blob_ttl": 3600, "cache.manifest_ttl": 3600}
    )
    async with running_app(config, clock) as (base, app), aiohttp.ClientSession() as s:
        await pull(s, base, small)
        await fills_settled(app)  # committed (clients finish first)
        clock.now += 3000
        await pull(s, base, oci)
        await fills_settled(app)  # committed (clients finish first)
        clock.now += 1000
        await policy_pass(app)
        assert not cached(tmp_path, small)
        assert cached(tmp_path, oci)


async def test_index_survives_restart_and_is_rebuilt_when_lost(
    upstream: Upstream, tmp_path: Path
) -> None:
    image = upstream.images["ocismall"]
    config = mirror_config(tmp_path, upstream.url)
    async with running_app(config) as (base, app), aiohttp.ClientSession() as s:
        await pull(s, base, image)
        await fills_settled(app)  # committed (clients finish first)
    index = CacheIndex(tmp_path / "index", Clock())
    kept = index.totals()
    index.close()
    assert kept == (footprint(image), 1 + len(image.blobs))

    shutil.rmtree(tmp_path / "index")  # lost: rebuilt from the files at start
    async with running_app(config) as (base, app), aiohttp.ClientSession() as s:
        for _ in range(100):
            if app[MIRROR].index.totals() == kept:
                break
            await asyncio.sleep(0.05)
        assert app[MIRROR].index.totals() == kept
        gets = upstream.registry.blob_gets(image.blobs[1].digest)
        await pull(s, base, image)  # served from the files all along
        await fills_settled(app)  # committed (clients finish first)
        assert upstream.registry.blob_gets(image.blobs[1].digest) == gets


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs for the cache, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_full_disk_passes_bytes_through_and_caches_again_later(
    upstream: Upstream, small_disk: Path
) -> None:
    clock = Clock()
    image = upstream.images["big"]
    big = next(b for b in image.blobs if 64 * 2**20 <= b.size < 128 * 2**20)
    tiny = min(image.blobs, key=lambda b: b.size)
    config = mirror_config(small_disk, upstream.url)
    with capture_logs() as logs:
        async with running_app(config, clock) as (base, app), aiohttp.ClientSession() as s:
            for _ in range(2):  # the first finds the disk full, the second bypasses at once
                async with s.get(f"{base}/v2/{image.repo}/blobs/{big.digest}") as r:
                    assert r.status == 200
                    assert sha256_digest(await r.read()) == big.digest
            assert not any((small_disk / "blobs").rglob(big.digest[7:]))
            assert list((small_disk / "tmp").iterdir()) == []
            bypassed = "registry_mirror_cache_bypassed_total"
            assert app[MIRROR].metrics.registry.get_sample_value(bypassed) == 2

            clock.now += 60  # the episode's retry time has passed: cache again
            async with s.get(f"{base}/v2/{image.repo}/blobs/{tiny.digest}") as r:
                assert sha256_digest(await r.read()) == tiny.digest
            await fills_settled(app)
            assert cached(small_disk, Image(image.repo, "", "", b"", [tiny]))
    events = [e["event"] for e in logs]
    assert events.count("cache_full") == 1
    assert "cache_space_returned" in events


async def test_a_reader_keeps_its_bytes_when_the_blob_is_evicted(
    upstream: Upstream, tmp_path: Path
) -> None:
    image = upstream.images["big"]
    big = next(b for b in image.blobs if 64 * 2**20 <= b.size < 128 * 2**20)
    config = mirror_config(tmp_path, upstream.url)
    url_path = f"/v2/{image.repo}/blobs/{big.digest}"
    async with running_app(config) as (base, app), aiohttp.ClientSession() as s:
        async with s.get(base + url_path) as r:
            assert sha256_digest(await r.read()) == big.digest
        await app[MIRROR].index.flush()
        # Now everything must go: the evictor is given a config with a 1-byte budget.
        evictor = app[NODE].policy.evictor
        evictor.config = dataclasses.replace(evictor.config, max_size="1")
        sha = hashlib.sha256()
        async with s.get(base + url_path) as r:
            sha.update(await r.content.readexactly(1024 * 1024))
            await policy_pass(app)
            assert not cached(tmp_path, Image(image.repo, "", "", b"", [big]))
            while chunk := await r.content.read(1 << 20):
                sha.update(chunk)
        assert "sha256:" + sha.hexdigest() == big.digest
