"""What an operator sees: metrics that move with misses and hits, health, logs without secrets."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from mirror.web.keys import MIRROR
from tests.fixtures.mirror_server import (
    MirrorProcess,
    fills_settled,
    mirror_config,
    running_app,
    sha256_digest,
)
from tests.fixtures.real_upstream import Upstream
from tests.integration.test_manifests import ACCEPT_ALL


async def scrape(s: aiohttp.ClientSession, url: str) -> dict[tuple[str, tuple], float]:
    async with s.get(url) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_move_with_a_miss_then_a_hit(upstream: Upstream, tmp_path: Path) -> None:
    image = upstream.images["team"]
    blob = image.blobs[-1]
    async with (
        running_app(mirror_config(tmp_path, upstream.url)) as (base, app),
        aiohttp.ClientSession() as s,
    ):
        before = await scrape(s, f"{base}/metrics")
        assert value(before, "registry_mirror_cache_misses_total", kind="blob") == 0
        for _ in range(2):  # a miss, then a hit
            async with s.get(f"{base}/v2/{image.repo}/blobs/{blob.digest}") as r:
                assert sha256_digest(await r.read()) == blob.digest
            await fills_settled(app)
        async with s.get(f"{base}/v2/{image.repo}/manifests/{image.tag}", headers=ACCEPT_ALL) as r:
            assert sha256_digest(await r.read()) == image.digest
        await app[MIRROR].index.flush()
        m = await scrape(s, f"{base}/metrics")
    assert value(m, "registry_mirror_cache_misses_total", kind="blob") == 1
    assert value(m, "registry_mirror_cache_hits_total", kind="blob") == 1
    assert value(m, "registry_mirror_cache_misses_total", kind="manifest") == 1
    assert value(m, "registry_mirror_cache_served_bytes_total") == blob.size
    fetched = value(m, "registry_mirror_upstream_fetched_bytes_total", upstream="default")
    assert fetched == blob.size + len(image.manifest)
    assert value(m, "registry_mirror_upstream_token_fetches_total", upstream="default") == 1
    blob_get = value(
        m, "registry_mirror_upstream_requests_total", upstream="default", method="GET", status="200"
    )
    assert blob_get == 2  # the blob once, the manifest once
    assert (
        value(m, "registry_mirror_http_requests_total", route="blobs", method="GET", status="200")
        == 2
    )
    assert value(m, "registry_mirror_cache_size_bytes") == blob.size + len(image.manifest)
    assert value(m, "registry_mirror_cache_entries") == 2
    assert value(m, "registry_mirror_fills_in_flight") == 0


async def test_health_and_readiness(upstream: Upstream, tmp_path: Path) -> None:
    async with (
        running_app(mirror_config(tmp_path, upstream.url)) as (base, _app),
        aiohttp.ClientSession() as s,
    ):
        async with s.get(f"{base}/healthz") as r:
            assert r.status == 200
        async with s.get(f"{base}/v2/library/small/manifests/latest", headers=ACCEPT_ALL) as r:
            assert r.status == 200
        async with s.get(f"{base}/readyz") as r:
            assert r.status == 200
            body = await r.json()
    assert body["checks"] == {"cache_writable": True, "index_open": True}
    assert body["upstreams"]["default"]["url"] == upstream.url
    assert body["upstreams"]["default"]["seconds_since_success"] is not None


def test_access_log_and_no_secrets(upstream: Upstream, tmp_path: Path) -> None:
    import httpx

    user, password = upstream.reader
    image = upstream.images["team"]  # public: anonymous clients never get private content
    mirror = MirrorProcess(
        tmp_path / "cache",
        upstream.url,
        "--upstream-username",
        user,
        log_path=tmp_path / "mirror.log",
        env={"REGISTRY_MIRROR_UPSTREAM_PASSWORD": password},
    )
    mirror.start()
    try:
        url = f"{mirror.url}/v2/{image.repo}/manifests/{image.tag}"
        r = httpx.get(url, headers=[*ACCEPT_ALL, ("X-Request-ID", "req-42")])
        assert r.status_code == 200 and r.headers["X-Request-ID"] == "req-42"
        for blob in image.blobs:
            r = httpx.get(f"{mirror.url}/v2/{image.repo}/blobs/{blob.digest}")
            assert sha256_digest(r.content) == blob.digest
    finally:
        mirror.stop()
    text = (tmp_path / "mirror.log").read_text()
    assert password not in text
    assert "eyJ" not in text, "a JWT (token) reached the log"
    assert "Authorization" not in text
    line = next(e for e in mirror.log_events() if e.get("request_id") == "req-42")
    assert line["event"] == "request" and line["status"] == 200 and line["cache"] == "miss"
    assert line["method"] == "GET" and line["bytes"] == len(image.manifest)
    assert line["upstream_ms"] > 0 and line["duration_ms"] >= line["upstream_ms"]
