"""Issue 22: the bandwidth cap (shared fairly by concurrent fills) and prefetch (an image's
blobs land in the cache without a client asking, and the manifest's answer does not wait)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from mirror.web.keys import MIRROR
from tests.fixtures.fake_upstream import FakeUpstream, Fault
from tests.fixtures.mirror_server import (
    MirrorProcess,
    mirror_config,
    running_app,
    sha256_digest,
    wait_cached,
)

CAP = 20_000_000  # bytes per second: the issue's 20 MB/s, over 10 s
LAYER = 50_000_000


async def test_a_bandwidth_cap_holds_within_ten_percent_shared_fairly_by_four_fills(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    layers = [fake.add_blob(bytes([i]) * LAYER) for i in range(4)]
    config = mirror_config(tmp_path, fake.url, max_bandwidth="20MB/s", prefetch=False)
    async with running_app(config) as (base, _app), aiohttp.ClientSession() as s:
        started = time.monotonic()

        async def fetch(digest: str) -> float:
            async with s.get(f"{base}/v2/lib/app/blobs/{digest}") as r:
                assert r.status == 200 and sha256_digest(await r.read()) == digest
            return time.monotonic() - started

        finished = await asyncio.gather(*(fetch(d) for d in layers))
    elapsed = max(finished)
    rate = 4 * LAYER / elapsed
    assert abs(rate - CAP) / CAP < 0.10, f"{rate / 1e6:.2f} MB/s over {elapsed:.2f}s"
    # Fair: round-robin between the fills, so none finishes long before the others.
    assert min(finished) > 0.85 * elapsed, finished


def _image(fake: FakeUpstream, i: int, layers: int = 3, size: int = 4096) -> tuple[str, list[str]]:
    mdigest, config, digests = fake.add_image(
        f"lib/app{i}", "v1", [bytes([i, n]) * (size // 2) for n in range(layers)]
    )
    return mdigest, [config, *digests]


async def test_prefetch_fills_the_image_without_a_client_asking(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    mdigest, blobs = _image(fake, 0, layers=5)
    for digest in blobs:
        fake.faults[digest] = Fault(delay_headers=0.2)  # slow enough to see the limit at work
    config = mirror_config(tmp_path, fake.url, prefetch_concurrency=2)
    async with running_app(config) as (base, app), aiohttp.ClientSession() as s:
        async with s.get(f"{base}/v2/lib/app0/manifests/v1") as r:
            assert r.status == 200 and sha256_digest(await r.read()) == mdigest
        for digest in blobs:
            await asyncio.to_thread(wait_cached, tmp_path, digest)
        assert all(fake.count("GET", f"/blobs/{d}") == 1 for d in blobs)
        for digest in blobs:  # the next client finds the whole image
            async with s.get(f"{base}/v2/lib/app0/blobs/{digest}") as r:
                assert r.status == 200 and sha256_digest(await r.read()) == digest
        assert all(fake.count("GET", f"/blobs/{d}") == 1 for d in blobs)
        sample = app[MIRROR].metrics.registry.get_sample_value
        labels = {"upstream": "default", "outcome": "fetched"}
        assert sample("registry_mirror_prefetches_total", labels) == len(blobs)
    assert fake.max_in_flight <= 2  # prefetch_concurrency


async def test_prefetch_skips_layers_over_its_size_limit_and_can_be_turned_off(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    _, small = _image(fake, 0, layers=1, size=1000)
    _, big = _image(fake, 1, layers=1, size=100_000)
    _, off = _image(fake, 2, layers=1)
    upstreams = {
        "off": {"url": fake.url, "names": ["off.test"], "aliases": ["off"], "prefetch": False}
    }
    config = mirror_config(
        tmp_path, fake.url, prefetch_max_size="10KiB", settings={"upstreams": upstreams}
    )
    async with running_app(config) as (base, app), aiohttp.ClientSession() as s:
        async with s.get(f"{base}/v2/lib/app0/manifests/v1") as r:
            assert r.status == 200
        async with s.get(f"{base}/v2/lib/app1/manifests/v1") as r:
            assert r.status == 200
        async with s.get(f"{base}/v2/off/lib/app2/manifests/v1") as r:
            assert r.status == 200
        for digest in [*small, big[0]]:  # the configs, and the small layer
            await asyncio.to_thread(wait_cached, tmp_path, digest)
        await asyncio.sleep(0.3)
        assert fake.count("GET", f"/blobs/{big[1]}") == 0
        assert not any(fake.count("GET", f"/blobs/{d}") for d in off[1:])  # (configs are alike)
        sample = app[MIRROR].metrics.registry.get_sample_value
        assert sample("registry_mirror_prefetches_total", {"upstream": "default",
                                                           "outcome": "too_big"}) == 1  # fmt: skip


SAMPLES = 120  # (at most 128: `_image` numbers images in a byte) a p99 of 60 was their
# second slowest, so one hiccup of 1.3 ms failed it; of 120, it is the third slowest
PAUSE = 0.12  # the image before is prefetched by then: each answer's own delay is measured


def _p99(times: list[float]) -> float:
    return times[int(0.99 * len(times)) - 1]


async def _manifest_latencies(
    fake: FakeUpstream, cache: Path, prefetch: bool, tags: range, pause: float = PAUSE
) -> list[float]:
    """The mirror's own seconds (from its log) to answer each tag in `tags`, one after
    another, sorted. The mirror runs as a process of its own: the fake upstream (serving the
    prefetches) shares this test's event loop, so only the mirror's side is measured."""
    mirror = MirrorProcess(
        cache, fake.url, log_path=cache.parent / "mirror.log",
        env={"REGISTRY_MIRROR_UPSTREAM_PREFETCH": str(prefetch).lower()},
    )  # fmt: skip
    await asyncio.to_thread(mirror.start)
    skip = len(mirror.log_events())
    try:
        async with aiohttp.ClientSession() as s:
            for i in tags:
                async with s.get(f"{mirror.url}/v2/lib/app{i}/manifests/v1") as r:
                    assert r.status == 200
                    await r.read()
                await asyncio.sleep(pause)
    finally:
        await asyncio.to_thread(mirror.stop)
    times = [
        e["duration_ms"] / 1000
        for e in mirror.log_events()[skip:]
        if e.get("event") == "request" and "/lib/app" in e.get("path", "")
    ]
    assert len(times) == len(tags)
    return sorted(times)


async def test_prefetch_does_not_delay_the_manifest_answer(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """Manifests served from the cache (their blobs not cached: a cache warmed without
    prefetch), with and without prefetch: with it, each answer starts the image's blobs
    while the next answers are measured. The p99 (and the median) with prefetch stay within
    1 ms of those without (measured on a quiet machine: p99 1.5-2.2 ms either way)."""
    for i in range(2 * SAMPLES):
        _image(fake, i)
    cache = tmp_path / "cache"
    await _manifest_latencies(fake, cache, False, range(2 * SAMPLES), 0)  # the manifests only
    assert fake.count("GET", "/blobs/") == 0
    without = await _manifest_latencies(fake, cache, False, range(SAMPLES))
    with_prefetch = await _manifest_latencies(fake, cache, True, range(SAMPLES, 2 * SAMPLES))
    p99_off, p99_on = _p99(without), _p99(with_prefetch)
    median_off, median_on = without[SAMPLES // 2], with_prefetch[SAMPLES // 2]
    print(f"manifest answers: p99 {p99_off * 1e3:.2f} ms without prefetch, {p99_on * 1e3:.2f}"
          f" with; median {median_off * 1e3:.2f} / {median_on * 1e3:.2f}")  # fmt: skip
    assert median_on - median_off < 0.001
    assert p99_on - p99_off < 0.001
    # Every layer of the images answered with prefetch was fetched (the configs are alike).
    assert fake.count("GET", "/blobs/") == SAMPLES * 3 + 1
