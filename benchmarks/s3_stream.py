"""Streaming throughput of `S3BlobStore` against a local SeaweedFS (weed server -s3).

Usage: python benchmarks/s3_stream.py [--mib 64] [--runs 3]

Uploads one random blob in multipart parts, then reads it back through `open_stream` (bytes
discarded; then hashed as a fill would), and, for comparison, through plain aiohttp on a
presigned URL: the difference is what aiobotocore and the 1 MiB re-chunking cost. Figures are
best-of-runs MB/s (10^6 bytes) on loopback, so they are bounded by SeaweedFS and this machine's
cores, not a network.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mirror.cache.s3 import S3BlobStore
from mirror.reference import Digest
from tests.fixtures.seaweed import SeaweedS3

MiB = 1024 * 1024


async def bench(seaweed: SeaweedS3, size: int, runs: int) -> None:
    store = S3BlobStore(seaweed.s3_config(prefix="bench/"))
    await store.start()
    try:
        data = os.urandom(size)
        digest = Digest("sha256:" + hashlib.sha256(data).hexdigest())
        part = store.config.part_size
        started = time.perf_counter()
        upload = await store.begin_upload(digest)
        for offset in range(0, size, part):
            await upload.upload_part(data[offset : offset + part])
        await upload.complete()
        report("upload (multipart, verified)", size, time.perf_counter() - started)
        del data

        async def stream(hash_it: bool) -> float:
            h = hashlib.sha256()
            body = await store.open_stream(digest)
            assert body is not None
            received, t0 = 0, time.perf_counter()
            try:
                async for chunk in body.chunks:
                    if hash_it:
                        h.update(chunk)
                    received += len(chunk)
            finally:
                await body.close()
            elapsed = time.perf_counter() - t0
            assert received == size
            assert not hash_it or "sha256:" + h.hexdigest() == digest
            return elapsed

        report("open_stream, discard", size, min([await stream(False) for _ in range(runs)]))
        report("open_stream + sha256", size, min([await stream(True) for _ in range(runs)]))

        url = await store.presigned_url(digest)
        async with aiohttp.ClientSession() as session:

            async def raw() -> float:
                t0, received = time.perf_counter(), 0
                async with session.get(url) as response:
                    async for chunk in response.content.iter_chunked(MiB):
                        received += len(chunk)
                assert received == size
                return time.perf_counter() - t0

            report("aiohttp on presigned URL", size, min([await raw() for _ in range(runs)]))
        await store.delete(digest)
    finally:
        await store.close()


def report(label: str, size: int, seconds: float) -> None:
    rate = size / seconds / 1e6
    print(f"{label:32s} {size / MiB:5.0f} MiB in {seconds:6.3f}s = {rate:7.0f} MB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="s3-bench-") as workdir:
        seaweed = SeaweedS3(Path(workdir))
        seaweed.start()
        try:
            asyncio.run(bench(seaweed, args.mib * MiB, args.runs))
        finally:
            seaweed.stop()


if __name__ == "__main__":
    main()
