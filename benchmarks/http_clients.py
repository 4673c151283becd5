"""Which HTTP client streams upstream blobs fastest: aiohttp's or httpx (the brief's choice).

Usage: python benchmarks/http_clients.py URL [--repeat N]
Streams URL (a large blob on a loopback registry) with each client, reading chunks as the
mirror's fill does (without hashing), and prints the best MB/s of N runs for each.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp
import httpx


async def with_aiohttp(url: str) -> int:
    n = 0
    async with (
        aiohttp.ClientSession(auto_decompress=False) as s,
        s.get(url) as resp,
    ):
        async for chunk in resp.content.iter_any():
            n += len(chunk)
    return n


async def with_httpx(url: str) -> int:
    n = 0
    async with httpx.AsyncClient() as c, c.stream("GET", url) as resp:
        async for chunk in resp.aiter_raw():
            n += len(chunk)
    return n


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    for name, fn in (("aiohttp", with_aiohttp), ("httpx", with_httpx)):
        best = 0.0
        for _ in range(args.repeat):
            start = time.perf_counter()
            size = await fn(args.url)
            best = max(best, size / (time.perf_counter() - start) / 1e6)
        print(f"{name:8s} {best:8.0f} MB/s")


if __name__ == "__main__":
    asyncio.run(main())
