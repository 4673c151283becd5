"""Two workers under a long load: descriptors plateau, eviction sees the whole cache and every
worker's recency (issue 17, item 12)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from mirror.cache import sqlite
from tests.fixtures.mirror_server import MirrorProcess, wait_cached, wait_for_workers
from tests.fixtures.real_upstream import Upstream
from tests.fixtures.synthetic_images import Builder, Image, Pusher

ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)
CLIENTS = 32
ROUND_SECONDS = 10.0
IMAGES_PER_ROUND = 48
STORES = 3  # diskcache stores per worker: the index's entries and meta, the metadata
# Each SQLite connection opens the database and its -wal; the -shm is opened once per process.
SQLITE_FDS = STORES * (2 * sqlite.THREADS + 1)
# What a worker holds besides its stores: stdio, the listening socket, epoll, the log, the
# per-worker metrics files (8), pooled upstream connections (up to the clients' concurrency,
# closed after 15 s idle), blob files being served. Measured here at 35-45 per worker after
# the load; with room to spare.
OTHER_FDS = 80
SQLITE_SUFFIXES = (".db", ".db-wal", ".db-shm")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def images(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Image]]:
    """Repositories of their own, pushed to the session's upstream: two sets of many small
    images for the load, and a few of about 1 MiB each for the eviction."""
    builder = Builder(tmp_path_factory.mktemp("stability"))
    made = {
        "round1": [
            builder.image(f"stability/one{i}", "1", [1000 + i, 20_000 + i], oci=True)
            for i in range(IMAGES_PER_ROUND)
        ],
        "round2": [
            builder.image(f"stability/two{i}", "1", [1000 + i, 20_000 + i], oci=True)
            for i in range(IMAGES_PER_ROUND)
        ],
        "evict": [
            builder.image(f"stability/evict{i}", "1", [2**20 + i], oci=True, gzip_limit=0)
            for i in range(5)
        ],
    }
    pusher = Pusher(upstream.url, upstream.tokens)
    try:
        for group in made.values():
            for image in group:
                pusher.push(image)
    finally:
        pusher.close()
    return made


async def pull(session: aiohttp.ClientSession, base: str, image: Image, tag: str = "") -> None:
    """The whole image, every byte checked against its digest; `tag` marks the requests."""
    headers = {"Accept": ACCEPT}
    if tag:
        headers["X-Request-ID"] = f"{tag}-{uuid.uuid4().hex[:8]}"
    async with session.get(f"{base}/v2/{image.repo}/manifests/{image.tag}", headers=headers) as r:
        assert r.status == 200, await r.text()
        assert sha256(await r.read()) == image.digest
    for blob in image.blobs:
        async with session.get(f"{base}/v2/{image.repo}/blobs/{blob.digest}", headers=headers) as r:
            assert r.status == 200, await r.text()
            assert sha256(await r.read()) == blob.digest


async def load(base: str, group: list[Image], seconds: float) -> int:
    """`CLIENTS` clients, each pulling the images in its own order on new connections (so
    both workers answer), for about `seconds`; how many whole images were pulled."""
    deadline = time.monotonic() + seconds
    pulled = 0

    async def client(n: int) -> None:
        nonlocal pulled
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for k in range(4 * len(group)):  # bounded in count as well as in time
                if time.monotonic() > deadline:
                    return
                await pull(session, base, group[(n * 7 + k) % len(group)])
                pulled += 1

    await asyncio.gather(*(client(n) for n in range(CLIENTS)))
    return pulled


def instance_pids(supervisor: int) -> list[int]:
    """The supervisor and its children."""
    pids = [supervisor]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == supervisor:
                pids.append(int(entry))
    return pids


def open_fds(supervisor: int) -> dict[int, tuple[int, int, int]]:
    """Per process of the instance: (open descriptors, of which the stores' SQLite files, of
    which sockets)."""
    out = {}
    for pid in instance_pids(supervisor):
        targets = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
        db = sum(1 for t in targets if "/metrics/" not in t and t.endswith(SQLITE_SUFFIXES))
        sockets = sum(1 for t in targets if t.startswith("socket:"))
        out[pid] = (len(targets), db, sockets)
    return out


def total(fds: dict[int, tuple[int, int, int]]) -> int:
    return sum(n for n, _, _ in fds.values())


def not_sockets(fds: dict[int, tuple[int, int, int]]) -> int:
    return sum(n - sockets for n, _, sockets in fds.values())


def serving_pids(mirror: MirrorProcess, prefix: str) -> set[int]:
    return {
        e["pid"]
        for e in mirror.log_events()
        if e.get("event") == "request" and str(e.get("request_id", "")).startswith(prefix)
    }


@pytest.fixture
def two_workers(tmp_path: Path, upstream: Upstream) -> Iterator[MirrorProcess]:
    env = {"REGISTRY_MIRROR_WORKERS": "2"}
    mirror = MirrorProcess(
        tmp_path / "cache", upstream.url, log_path=tmp_path / "mirror.log", env=env
    )
    mirror.start()
    try:
        wait_for_workers(mirror, 2)
        yield mirror
    finally:
        mirror.stop()


async def test_open_descriptors_plateau_under_a_long_load(
    images: dict[str, list[Image]], two_workers: MirrorProcess
) -> None:
    """Round one pulls cold images, round two other cold ones and the first again: every
    worker's SQLite work happens on its few SQLite threads, so the descriptors stop growing."""
    mirror = two_workers
    assert mirror.proc is not None
    bound = 2 * (SQLITE_FDS + OTHER_FDS) + OTHER_FDS  # two workers and the supervisor
    start = open_fds(mirror.proc.pid)
    first = await load(mirror.url, images["round1"], ROUND_SECONDS)
    await asyncio.sleep(2)  # the last flushes and closes
    after_one = open_fds(mirror.proc.pid)
    second = await load(mirror.url, images["round2"] + images["round1"], ROUND_SECONDS)
    await asyncio.sleep(2)
    after_two = open_fds(mirror.proc.pid)
    figures = f"start {start}, after round one {after_one}, after round two {after_two}"
    print(figures, f"pulled {first} + {second} images")
    assert first >= IMAGES_PER_ROUND and second >= IMAGES_PER_ROUND, "the load pulled little"
    assert len(after_two) == 3, "the supervisor and its two workers"
    # Files, pipes and the rest stop growing. Sockets are mostly the pooled upstream
    # connections, as many as a worker's busiest moment needed (which differs between rounds:
    # 36 -> 43 in one run) and closed after 15 s idle: bounded by the clients' concurrency
    # (upstream and token server), not by how many images were pulled.
    assert not_sockets(after_two) <= not_sockets(after_one) + 4, figures
    assert total(after_two) <= bound, figures
    for pid, (_, db, sockets) in after_two.items():
        assert db <= SQLITE_FDS, (pid, figures)
        assert sockets <= 2 * CLIENTS, (pid, figures)


def cache_size(cache_dir: Path) -> int:
    return sum(p.stat().st_size for p in (cache_dir / "blobs").rglob("*") if p.is_file())


def image_size(image: Image) -> int:
    return len(image.manifest) + sum(b.size for b in image.blobs)


def present(cache_dir: Path, image: Image) -> bool:
    """Whether the image's largest blob (its layer) is in the cache."""
    layer = max(image.blobs, key=lambda b: b.size).digest.split(":")[1]
    return (cache_dir / "blobs" / "sha256" / layer[:2] / layer).exists()


async def pinned_sessions(
    mirror: MirrorProcess, workers: set[int]
) -> tuple[dict[int, aiohttp.ClientSession], list[aiohttp.ClientSession]]:
    """A keep-alive session whose one connection each worker answers (found by asking)."""
    by_pid: dict[int, aiohttp.ClientSession] = {}
    spare = []
    for _ in range(40):
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        marker = f"probe-{uuid.uuid4().hex[:8]}"
        async with session.get(f"{mirror.url}/v2/", headers={"X-Request-ID": marker}) as r:
            await r.read()
        for _ in range(50):
            pids = serving_pids(mirror, marker)
            if pids:
                break
            await asyncio.sleep(0.02)
        (pid,) = pids
        if pid in by_pid:
            spare.append(session)
        else:
            by_pid[pid] = session
        if set(by_pid) == workers:
            return by_pid, spare
    raise AssertionError("could not reach both workers")


async def test_any_worker_evicts_and_every_workers_recency_counts(
    images: dict[str, list[Image]], tmp_path: Path, upstream: Upstream
) -> None:
    """Four images fill the budget to under its high watermark through one worker; the
    first is pulled again through the other worker; the fifth, through the first worker,
    crosses it. The pass (in whichever worker) brings the cache under the budget within a few
    seconds, and evicts the second image, the least recently served, not the first."""
    group = images["evict"]
    sizes = [image_size(i) for i in group]
    budget = int(4.85 * sum(sizes) / len(sizes))  # four fit under 0.95 of it; five exceed it
    assert 4 * max(sizes) < 0.85 * budget and sum(sizes) > budget
    mirror = MirrorProcess(
        tmp_path / "cache",
        upstream.url,
        log_path=tmp_path / "mirror.log",
        env={"REGISTRY_MIRROR_WORKERS": "2", "REGISTRY_MIRROR_CACHE_MAX_SIZE": str(budget)},
    )
    await asyncio.to_thread(mirror.start)
    cache = tmp_path / "cache"
    sessions: list[aiohttp.ClientSession] = []
    try:
        workers = await asyncio.to_thread(wait_for_workers, mirror, 2)
        by_pid, spare = await pinned_sessions(mirror, workers)
        sessions = [*by_pid.values(), *spare]
        one, other = (by_pid[pid] for pid in sorted(workers))
        for image in group[:4]:
            await pull(one, mirror.url, image, "fill")
        await asyncio.sleep(2.5)  # written by the first worker's flushes: under the watermark
        assert all(present(cache, image) for image in group[:4])
        await pull(other, mirror.url, group[0], "again")
        await pull(one, mirror.url, group[4], "cross")
        assert serving_pids(mirror, "again") | serving_pids(mirror, "cross") == workers
        for blob in group[4].blobs:  # clients have every byte before the commit
            await asyncio.to_thread(wait_cached, cache, blob.digest)
        for _ in range(60):  # six seconds at most
            if cache_size(cache) <= budget:
                break
            await asyncio.sleep(0.1)
        size = cache_size(cache)
        events = [
            (e.get("event"), e.get("pid"), e.get("bytes"), e.get("size_before"))
            for e in mirror.log_events()
            if e.get("event") in ("cache_evicted", "housekeeping_failed")
        ]
        assert size <= budget, f"{size} bytes cached 6 s after crossing {budget}: {events}"
        await asyncio.sleep(1)  # no other pass follows with a stale view
        kept = [present(cache, image) for image in group]
        passes = [e for e in mirror.log_events() if e.get("event") == "cache_evicted"]
        assert kept == [True, False, True, True, True], (kept, size, budget, passes)
    finally:
        for session in sessions:
            await session.close()
        await asyncio.to_thread(mirror.stop)
