"""One manifest GET per reference across workers: two `ManifestFlight`s over one directory
stand for two workers (flock locks conflict between open files, in one process too)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mirror.errors import RegistryError
from mirror.manifest_flight import ManifestFlight
from mirror.reference import Digest
from mirror.shared import NoSharedTier
from mirror.upstream.client import FetchedManifest

KEY = ("default", "lib/app", "v1", "application/vnd.oci.image.manifest.v1+json")
FETCHED = FetchedManifest(b"{}", "application/vnd.oci.image.manifest.v1+json",
                          Digest("sha256:" + "4" * 64))  # fmt: skip


async def nothing(_began: float) -> FetchedManifest | None:
    return None


async def test_the_second_worker_reads_the_first_ones_answer_and_its_error(tmp_path: Path) -> None:
    one, two = (ManifestFlight(tmp_path, NoSharedTier()) for _ in range(2))
    release = asyncio.Event()
    fetches: list[str] = []

    async def fetch_one() -> FetchedManifest:
        fetches.append("one")
        await release.wait()
        return FETCHED

    async def fetch_two() -> FetchedManifest:
        fetches.append("two")
        return FETCHED

    loaded: list[Digest] = []

    async def load(digest: Digest) -> FetchedManifest | None:
        loaded.append(digest)
        return FETCHED

    first = asyncio.ensure_future(one.do(KEY, fetch_one, load, nothing))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(two.do(KEY, fetch_two, load, nothing))
    await asyncio.sleep(0.1)
    release.set()
    assert await first == FETCHED and await second == FETCHED
    assert fetches == ["one"] and loaded == [FETCHED.digest]

    async def rate_limited() -> FetchedManifest:
        fetches.append("429")
        await asyncio.sleep(0.1)
        raise RegistryError("TOOMANYREQUESTS", "spent", headers={"Retry-After": "60"})

    first = asyncio.ensure_future(one.do(KEY, rate_limited, load, nothing))
    await asyncio.sleep(0.02)
    with pytest.raises(RegistryError) as caught:
        await two.do(KEY, fetch_two, load, nothing)  # not asked again: the same 429
    assert caught.value.code == "TOOMANYREQUESTS" and caught.value.headers["Retry-After"] == "60"
    with pytest.raises(RegistryError):
        await first
    assert fetches == ["one", "429"]


async def test_an_answer_written_since_the_callers_look_serves_it(tmp_path: Path) -> None:
    """A worker that looked for the record before another wrote it, and reaches the lock just
    after the other let go, takes that answer instead of asking again."""
    import time

    one, two = (ManifestFlight(tmp_path, NoSharedTier()) for _ in range(2))
    fetches: list[str] = []

    async def fetch(who: str) -> FetchedManifest:
        fetches.append(who)
        return FETCHED

    async def load(digest: Digest) -> FetchedManifest | None:
        return FETCHED

    looked = time.time()  # two looks for the record: none yet
    assert await one.do(KEY, lambda: fetch("one"), load, nothing) == FETCHED  # one fetched
    assert await two.do(KEY, lambda: fetch("two"), load, nothing, since=looked) == FETCHED
    assert fetches == ["one"]
    assert await two.do(KEY, lambda: fetch("two"), load, nothing) == FETCHED  # a later look
    assert fetches == ["one", "two"]
