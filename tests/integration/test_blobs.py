"""Blobs through the mirror: ranges for resuming clients, HEAD, conditional GET, flat memory."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import aiohttp

from tests.fixtures.mirror_server import (
    MirrorProcess,
    mirror_config,
    running_mirror,
    wait_cached,
)
from tests.fixtures.real_upstream import Upstream
from tests.integration.test_single_flight import fetch


def read_range(path: Path, start: int, stop: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(stop - start)


async def test_ranges_on_miss_and_hit(upstream: Upstream, tmp_path: Path) -> None:
    image = upstream.images["big"]
    blob = next(b for b in image.blobs if 2**20 <= b.size < 2 * 2**20)
    async with (
        running_mirror(mirror_config(tmp_path, upstream.url)) as base,
        aiohttp.ClientSession() as s,
    ):
        url = f"{base}/v2/{image.repo}/blobs/{blob.digest}"
        async with s.head(url) as resp:  # a miss: answered from an upstream HEAD
            assert resp.status == 200
            assert int(resp.headers["Content-Length"]) == blob.size
            assert resp.headers["Docker-Content-Digest"] == blob.digest
        # A range on a miss is answered from the fill as its bytes land.
        for header, start, stop in [
            ("bytes=1000-1999", 1000, 2000),
            (f"bytes={blob.size - 10}-", blob.size - 10, blob.size),
            ("bytes=-100", blob.size - 100, blob.size),
            ("bytes=0-", 0, blob.size),
        ]:
            async with s.get(url, headers={"Range": header}) as resp:
                assert resp.status == 206
                assert resp.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{blob.size}"
                assert await resp.read() == read_range(blob.path, start, stop)
        async with s.get(url, headers={"Range": f"bytes={blob.size}-"}) as resp:
            assert resp.status == 416
            assert resp.headers["Content-Range"] == f"bytes */{blob.size}"
        # Cached (ranges no longer wait for the commit): a conditional GET is answered 304.
        await asyncio.to_thread(wait_cached, tmp_path, blob.digest)
        async with s.get(url, headers={"If-None-Match": f'"{blob.digest}"'}) as resp:
            assert resp.status == 304
        async with s.get(url) as resp:
            assert resp.status == 200
            assert resp.headers["ETag"] == f'"{blob.digest}"'
            assert "sha256:" + hashlib.sha256(await resp.read()).hexdigest() == blob.digest
    assert upstream.registry.blob_gets(blob.digest) >= 1


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def test_memory_stays_flat_with_a_256mib_blob(
    upstream: Upstream, mirror: MirrorProcess
) -> None:
    image = upstream.images["big"]
    blob = max(image.blobs, key=lambda b: b.size)
    assert blob.size >= 256 * 2**20
    url = f"{mirror.url}/v2/{image.repo}/blobs/{blob.digest}"
    for _ in range(2):  # a miss (fill) then a hit (sendfile)
        _, digest, size = await fetch(url)
        assert (digest, size) == (blob.digest, blob.size)
    assert mirror.proc is not None
    peak = peak_rss_bytes(mirror.proc.pid)
    print(f"mirror peak RSS {peak / 2**20:.0f} MiB")
    assert peak < 120 * 2**20
