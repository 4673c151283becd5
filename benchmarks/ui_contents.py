"""How fast the operator page's contents views are with 100,000 cached blobs.

Usage: PYTHONPATH=. python benchmarks/ui_contents.py [--images N] [--blobs-per-image N]
       [--workdir DIR]

Builds a cache directory with `images` tagged images (5 tags per repository), each a manifest
referencing `blobs-per-image` blobs (config + layers): 100,000 blobs by default, every one with
a (sparse) file so that the start-up reconcile keeps them. Then it
serves the mirror and times, through HTTP: the first contents summary (parses every manifest),
a rebuild (manifests remembered), and page renders (first page, a deep page, sorted by size, a
search), as an operator clicking around would see them. The summary is rebuilt in a worker
thread, so it is reported with the event loop's worst lag meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from mirror.cache.index import CacheIndex, Entry
from mirror.cache.metadata import LocalMetadataStore
from mirror.cli import GIL_SWITCH_INTERVAL
from mirror.config import load_config
from mirror.logs import setup_logging
from mirror.reference import Digest
from mirror.web.app import make_app
from mirror.web.ui import UI

SIZE = 1_000_000
TAGS_PER_REPO = 5
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def fake(n: int) -> Digest:
    return Digest(f"sha256:{n:064x}")


def populate(cache: Path, images: int, per_image: int) -> None:
    marker = cache / f".populated-{images}-{per_image}-sparse"
    if marker.exists():
        return
    blob_dir = cache / "blobs" / "sha256"
    index = CacheIndex(cache / "index", time.time)
    metadata = LocalMetadataStore(cache / "meta")
    now = time.time() - images
    started = time.monotonic()
    with index._entries.transact(), metadata._db.transact():  # bulk load only
        for i in range(images):
            blobs = [fake(i * per_image + j) for j in range(per_image)]
            doc = {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "x/config", "digest": blobs[0], "size": SIZE},
                "layers": [{"mediaType": "x/layer", "digest": d, "size": SIZE} for d in blobs[1:]],
            }
            data = json.dumps(doc).encode()
            manifest = Digest("sha256:" + hashlib.sha256(data).hexdigest())
            for d, body in [(manifest, data), *((b, b"") for b in blobs)]:
                path = blob_dir / d[7:9] / d[7:]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(body)
                if not body:
                    os.truncate(path, SIZE)  # sparse: sizes are real, the disk stays empty
                size = len(body) if body else SIZE
                index._entries[d] = Entry(size, "manifest" if body else "blob", now + i, now + i)
            repo, tag = f"team{i // TAGS_PER_REPO // 100}/app{i // TAGS_PER_REPO}", f"v{i % 5}"
            metadata._db.set(("type", manifest), OCI_MANIFEST)
            metadata._db.set(("tag", "default", repo, tag), (manifest, OCI_MANIFEST, now + i))
            if i % 1000 == 999:
                print(f"\r  {i + 1:,} images", end="", flush=True)
        total = images * (per_image * SIZE + len(data))
        index._set_totals(total, images * (per_image + 1))
    print(
        f"\r  {images:,} images, {images * per_image:,} blobs in {time.monotonic() - started:.0f}s"
    )
    index.close()
    metadata.close()
    marker.touch()


async def timed_get(s: aiohttp.ClientSession, url: str) -> tuple[float, str]:
    started = time.perf_counter()
    async with s.get(url) as r:
        body = await r.text()
        assert r.status == 200, (r.status, body[:300])
    return (time.perf_counter() - started) * 1000, body


async def loop_lag_during(work: asyncio.Future[object]) -> float:
    worst = 0.0
    while not work.done():
        t = time.perf_counter()
        await asyncio.sleep(0.001)
        worst = max(worst, time.perf_counter() - t - 0.001)
    await work
    return worst * 1000


async def run(cache: Path) -> None:
    config = load_config(
        None, env={}, overrides={"cache.dir": str(cache), "upstream.url": "http://127.0.0.1:9"}
    )
    app = make_app(config)
    runner = aiohttp.web.AppRunner(app, access_log=None)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}/ui/"
    try:
        await asyncio.sleep(2)  # start-up reconcile of the index against the files
        catalog = app[UI].catalog
        async with aiohttp.ClientSession() as s:
            ms, _ = await timed_get(s, base + "contents")
            print(f"first contents page (builds the summary, parses every manifest): {ms:.0f} ms")
            snap = await catalog.snapshot()
            repos, tags = len(snap.repos), sum(len(r.tags) for r in snap.repos)
            print(f"  summary: {repos:,} repositories, {tags:,} tags, {snap.build_seconds:.2f}s")
            rebuild = asyncio.ensure_future(catalog.refresh())
            lag = await loop_lag_during(rebuild)
            snap = await catalog.snapshot()
            print(f"rebuild (in a thread): {snap.build_seconds:.2f}s, loop lag max {lag:.1f} ms")
            pages = {
                "page 1 by name": "contents",
                "page 40 (last) by name": "contents?page=40",
                "page 1 by size": "contents?sort=size",
                "page 20 by last pulled": "contents?sort=last_used&page=20",
                "search 'app77'": "contents?q=app77",
                "repository view": "repository?u=default&r=team1/app100",
                "image view": "image?u=default&r=team1/app100&t=v2",
                "overview": "",
            }
            for label, path in pages.items():
                times = [(await timed_get(s, base + path))[0] for _ in range(20)]
                print(
                    f"{label:24} p50 {statistics.median(times):6.1f} ms   max {max(times):6.1f} ms"
                )
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--blobs-per-image", type=int, default=10)
    parser.add_argument("--workdir", type=Path, help="keep the cache here (reused next time)")
    args = parser.parse_args()
    setup_logging("warning", "console")
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)  # as `registry-mirror serve` does
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ui-bench-"))
    print(f"cache: {workdir}")
    populate(workdir, args.images, args.blobs_per_image)
    asyncio.run(run(workdir))


if __name__ == "__main__":
    main()
