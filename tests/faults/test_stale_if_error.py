"""Stale-if-error and back-off: a cached tag outlives upstream trouble, digests never notice."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from mirror.web.keys import MIRROR
from tests.fixtures.clock import Clock
from tests.fixtures.fake_upstream import FakeUpstream, Fault
from tests.fixtures.mirror_server import mirror_config, running_app, sha256_digest

STALE = "registry_mirror_stale_answers_total"


async def test_expired_tag_is_served_stale_while_the_upstream_fails_or_is_gone(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    mdigest, _, (layer,) = fake.add_image("lib/app", "v1", [b"x" * 5000])
    clock = Clock()
    config = mirror_config(tmp_path, fake.url, tag_ttl="10m", retries=0)
    async with running_app(config, clock) as (base, app), aiohttp.ClientSession() as s:
        tag_url = f"{base}/v2/lib/app/manifests/v1"
        async with s.get(tag_url) as r:
            assert r.status == 200 and "Warning" not in r.headers
        async with s.get(f"{base}/v2/lib/app/blobs/{layer}") as r:
            assert sha256_digest(await r.read()) == layer

        clock.now += 601
        fake.faults["v1"] = Fault(fail_times=1000, fail_status=503)
        async with s.get(tag_url) as r:
            assert r.status == 200
            assert r.headers["Warning"].startswith("110 ")
            assert sha256_digest(await r.read()) == mdigest

        await fake.close()  # now the upstream is gone altogether
        for url in (tag_url, f"{base}/v2/lib/app/manifests/{mdigest}"):
            async with s.get(url) as r:
                assert r.status == 200 and sha256_digest(await r.read()) == mdigest
        async with s.get(f"{base}/v2/lib/app/blobs/{layer}") as r:
            assert r.status == 200 and "Warning" not in r.headers
            assert sha256_digest(await r.read()) == layer
        async with s.get(f"{base}/v2/lib/app/manifests/other") as r:
            assert r.status in (502, 503)  # nothing cached: the trouble shows
        assert app[MIRROR].metrics.registry.get_sample_value(STALE) == 2


async def test_429_retry_after_is_honoured(fake: FakeUpstream, tmp_path: Path) -> None:
    mdigest, _, _ = fake.add_image("lib/app", "v1", [b"layer"])
    clock = Clock()
    config = mirror_config(tmp_path, fake.url, tag_ttl="1m", retries=0)
    async with running_app(config, clock) as (base, _app), aiohttp.ClientSession() as s:
        url = f"{base}/v2/lib/app/manifests/v1"
        async with s.get(url) as r:
            assert r.status == 200
        fake.faults["v1"] = Fault(fail_times=1, fail_status=429, retry_after="2")
        clock.now += 61
        async with s.get(url) as r:
            assert r.status == 200 and "Warning" in r.headers
        asked = fake.count("HEAD", "/manifests/v1") + fake.count("GET", "/manifests/v1")
        for _ in range(5):  # within Retry-After: stale, and the upstream is left alone
            clock.now += 61
            async with s.get(url) as r:
                assert r.status == 200 and "Warning" in r.headers
        assert fake.count("HEAD", "/manifests/v1") + fake.count("GET", "/manifests/v1") == asked
        await asyncio.sleep(2.2)
        clock.now += 61
        async with s.get(url) as r:  # Retry-After has passed: revalidated, fresh again
            assert r.status == 200 and "Warning" not in r.headers
            assert sha256_digest(await r.read()) == mdigest
        assert fake.count("HEAD", "/manifests/v1") > 0


async def test_expired_tag_is_served_stale_when_the_upstream_is_unreachable(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    mdigest, _, _ = fake.add_image("lib/app", "v1", [b"layer"])
    clock = Clock()
    config = mirror_config(tmp_path, fake.url, tag_ttl="1m", retries=1)
    async with running_app(config, clock) as (base, app), aiohttp.ClientSession() as s:
        url = f"{base}/v2/lib/app/manifests/v1"
        async with s.get(url) as r:
            assert r.status == 200
        await fake.close()  # connection refused from now on
        clock.now += 61
        async with s.get(url) as r:
            assert r.status == 200 and "Warning" in r.headers
            assert sha256_digest(await r.read()) == mdigest
        upstream = app[MIRROR].router.default
        assert upstream.backoff_until > 0 and upstream.last_failure is not None
