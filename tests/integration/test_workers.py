"""Several workers on one port share one cache and fetch each blob from the upstream once."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp

from tests.fixtures.mirror_server import MirrorProcess, wait_for_workers
from tests.fixtures.real_upstream import Upstream
from tests.integration.test_operations import scrape, value
from tests.integration.test_single_flight import fetch, settled


async def test_two_workers_twenty_clients_one_upstream_fetch(
    upstream: Upstream, tmp_path: Path
) -> None:
    image = upstream.images["big"]
    blob = next(b for b in image.blobs if 64 * 2**20 <= b.size < 128 * 2**20)
    mirror = MirrorProcess(
        tmp_path / "cache",
        upstream.url,
        log_path=tmp_path / "mirror.log",
        env={"REGISTRY_MIRROR_WORKERS": "2"},
    )
    await asyncio.to_thread(mirror.start)
    assert mirror.proc is not None
    try:
        workers = await asyncio.to_thread(wait_for_workers, mirror, 2)
        before = upstream.registry.blob_gets(blob.digest)
        url = f"{mirror.url}/v2/{image.repo}/blobs/{blob.digest}"
        results = await asyncio.gather(*(fetch(url) for _ in range(20)))
        assert all(d == blob.digest and n == blob.size for _, d, n in results)
        assert await settled(lambda: upstream.registry.blob_gets(blob.digest), before + 1) == (
            before + 1
        )
        served_by = {
            e["pid"]
            for e in mirror.log_events()
            if e.get("event") == "request" and blob.digest in str(e.get("path"))
        }
        assert served_by == workers, "both workers answered some of the clients"
        async with aiohttp.ClientSession() as s:
            for _ in range(3):  # whichever worker answers, the numbers are the merged ones
                m = await scrape(s, f"{mirror.url}/metrics")
                served = value(
                    m, "registry_mirror_http_requests_total", route="blobs", method="GET",
                    status="200",
                )  # fmt: skip
                assert served == 20
                assert (
                    value(m, "registry_mirror_upstream_fetched_bytes_total", upstream="default")
                    == blob.size
                )
        os.kill(mirror.proc.pid, signal.SIGTERM)
        assert await asyncio.to_thread(mirror.proc.wait, 60) == 0
    finally:
        await asyncio.to_thread(mirror.stop)


async def test_the_operator_page_shows_every_workers_fills(
    upstream: Upstream, tmp_path: Path
) -> None:
    """Whichever worker answers the page, a fill running in the other one is listed."""
    from tests.fixtures.throttle import Throttle

    image = upstream.images["big"]
    blob = next(b for b in image.blobs if 64 * 2**20 <= b.size < 128 * 2**20)
    throttle = Throttle(upstream.registry.port, 20e6)  # ~3 s for the fill: time to look
    await throttle.start()
    mirror = MirrorProcess(
        tmp_path / "cache",
        f"http://127.0.0.1:{throttle.port}",
        log_path=tmp_path / "mirror.log",
        env={"REGISTRY_MIRROR_WORKERS": "2"},
    )
    await asyncio.to_thread(mirror.start)
    try:
        await asyncio.to_thread(wait_for_workers, mirror, 2)
        download = asyncio.ensure_future(fetch(f"{mirror.url}/v2/{image.repo}/blobs/{blob.digest}"))
        await asyncio.sleep(0.5)
        short = blob.digest.split(":")[1][:12]
        seen_by: set[str] = set()
        async with aiohttp.ClientSession() as s:
            for _ in range(12):  # new connections: both workers answer some of these
                async with s.get(f"{mirror.url}/ui/", headers={"Connection": "close"}) as r:
                    assert r.status == 200
                    page = await r.text()
                assert short in page, "a fill in flight missing from the page"
                seen_by.add("other" if "(other worker)" in page else "own")
        _, digest, _ = await download
        assert digest == blob.digest
        assert seen_by == {"own", "other"}, "both workers answered, each listing the fill"
    finally:
        await asyncio.to_thread(mirror.stop)
        await throttle.close()
