"""How much the cache index adds to request latency with 1,000,000 indexed blobs.

Usage: python benchmarks/index_latency.py [--entries 1000000] [--workdir DIR]

Every request waits on the event loop, so the figure that matters is how late the loop gets
while index work happens: a 1 ms ticker measures its lag (p50 / p99 / max) while (1) nothing
happens, (2) hits note their time and the batch is flushed (as the server does each second),
(3) an eviction pass plans and applies a budget cut, (4) a TTL-only pass scans the index.
The target (issue: cache policy) is under 5 ms added to any request.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from mirror.cache.blobs import FilesystemBlobStore
from mirror.cache.eviction import Evictor
from mirror.cache.index import CacheIndex, Entry
from mirror.cli import GIL_SWITCH_INTERVAL
from mirror.config import CacheConfig
from mirror.reference import Digest

SIZE = 1_000_000  # bytes per fake blob, so totals look like a real cache


def digest(n: int) -> Digest:
    return Digest(f"sha256:{n:064x}")


def populate(index: CacheIndex, entries: int) -> None:
    have = index.totals()[1]
    if have >= entries:
        return
    now = time.time() - entries
    batch = 20_000
    for start in range(have, entries, batch):
        with index._entries.transact():  # bulk load only: one transaction per batch
            for n in range(start, min(entries, start + batch)):
                index._entries[digest(n)] = Entry(SIZE, "blob", now + n, now + n)
        index._set_totals(min(entries, start + batch) * SIZE, min(entries, start + batch))
        print(f"\r  loaded {min(entries, start + batch):,}", end="", flush=True)
    print()


async def lag_while(work: Callable[[], Awaitable[object]]) -> tuple[list[float], float]:
    lags: list[float] = []
    done = False

    async def ticker() -> None:
        while not done:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - t - 0.001)

    task = asyncio.ensure_future(ticker())
    started = time.perf_counter()
    await work()
    took = time.perf_counter() - started
    done = True
    await task
    return lags, took


def report(name: str, lags: list[float], took: float) -> None:
    ms = sorted(x * 1000 for x in lags)
    p99 = ms[int(len(ms) * 0.99) - 1] if ms else 0.0
    print(
        f"{name:38s} took {took:7.2f}s  loop lag p50 {statistics.median(ms):5.2f} ms"
        f"  p99 {p99:5.2f} ms  max {ms[-1]:5.2f} ms"
    )


async def main() -> None:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)  # as `registry-mirror serve` does
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "rm-index-bench"
    )
    args = parser.parse_args()
    root = args.workdir / str(args.entries)
    store = FilesystemBlobStore(root)
    store.setup()
    index = CacheIndex(root / "index", time.time)
    print(f"index of {args.entries:,} entries in {root}")
    populate(index, args.entries)
    gc.freeze()  # as `registry-mirror serve` does once started

    async def idle() -> None:
        await asyncio.sleep(1.0)

    async def hits() -> None:
        for _ in range(5):
            for n in range(2000):  # a busy second: 2,000 hits on random blobs, as they come
                index.touch(digest(random.randrange(args.entries)))
                if n % 20 == 0:
                    await asyncio.sleep(0)
            await index.flush()

    total, _ = index.totals()
    config = CacheConfig(max_size=str(total), high_watermark=0.99, low_watermark=0.989)
    evictor = Evictor(store, index, config, time.time)

    async def budget_pass() -> None:
        plan = await evictor.run_once(set())
        print(f"  budget pass evicted {len(plan.victims):,} entries")

    ttl_evictor = Evictor(store, index, CacheConfig(blob_ttl=10 * 365 * 86400), time.time)

    async def ttl_pass() -> None:
        await ttl_evictor.run_once(set())

    for name, work in [
        ("idle", idle),
        ("10,000 hits: touch + flush", hits),
        ("eviction pass (1% of entries)", budget_pass),
        ("TTL pass (nothing expired)", ttl_pass),
    ]:
        report(name, *await lag_while(work))
    index.close()


if __name__ == "__main__":
    asyncio.run(main())
