"""Upstream misbehaviour: the cache keeps nothing bad and a later good fetch succeeds."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from mirror.cache.blobs import OpenBlob
from mirror.reference import Digest, Name
from mirror.web.keys import MIRROR
from tests.fixtures.fake_upstream import FakeUpstream, Fault
from tests.fixtures.mirror_server import (
    cached_files,
    mirror_config,
    running_app,
    running_mirror,
    sha256_digest,
    wait_cached,
)

BLOB = os.urandom(3 * 1024 * 1024 + 17)


async def get_blob(base: str, repo: str, digest: str) -> bytes:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{base}/v2/{repo}/blobs/{digest}") as resp,
    ):
        assert resp.status == 200, await resp.text()
        return await resp.read()


@pytest.mark.parametrize(
    "fault",
    [Fault(wrong_bytes=True), Fault(truncate_at=len(BLOB) // 2), Fault(truncate_at=len(BLOB) - 1)],
    ids=["wrong-bytes", "truncated-half", "truncated-last-byte"],
)
async def test_bad_body_is_never_served_complete_nor_kept(
    fake: FakeUpstream, tmp_path: Path, fault: Fault
) -> None:
    digest = fake.add_blob(BLOB)
    fake.faults[digest] = fault
    async with running_mirror(mirror_config(tmp_path, fake.url, retries=0)) as base:
        with capture_logs() as logs, pytest.raises(aiohttp.ClientPayloadError):
            await get_blob(base, "lib/app", digest)
        assert cached_files(tmp_path) == {"blobs": [], "tmp": []}
        warnings = [e for e in logs if e["log_level"] == "warning"]
        expected = "digest_mismatch" if fault.wrong_bytes else "blob_fill_failed"
        assert any(e["event"] == expected and e["digest"] == digest for e in warnings)

        del fake.faults[digest]
        data = await get_blob(base, "lib/app", digest)
        assert sha256_digest(data) == digest
        wait_cached(tmp_path, digest)
        assert cached_files(tmp_path)["blobs"] == [digest.split(":")[1]]


async def test_5xx_then_success_is_retried(fake: FakeUpstream, tmp_path: Path) -> None:
    digest = fake.add_blob(BLOB)
    fake.faults[digest] = Fault(fail_times=2, fail_status=503)
    async with running_mirror(mirror_config(tmp_path, fake.url, retries=3)) as base:
        data = await get_blob(base, "lib/app", digest)
    assert sha256_digest(data) == digest
    assert fake.count("GET", digest) == 3


async def test_5xx_beyond_retries_is_a_502_and_nothing_is_kept(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    digest = fake.add_blob(BLOB)
    fake.faults[digest] = Fault(fail_times=10, fail_status=502)
    async with (
        running_mirror(mirror_config(tmp_path, fake.url, retries=1)) as base,
        aiohttp.ClientSession() as s,
        s.get(f"{base}/v2/lib/app/blobs/{digest}") as resp,
    ):
        assert resp.status == 502
        body = await resp.json()
    assert body["errors"][0]["code"] == "UNAVAILABLE"
    assert fake.count("GET", digest) == 2
    assert cached_files(tmp_path) == {"blobs": [], "tmp": []}


async def test_redirect_to_cdn_drops_authorization(fake: FakeUpstream, tmp_path: Path) -> None:
    digest = fake.add_blob(BLOB)
    fake.faults[digest] = Fault(redirect=True)
    async with running_mirror(mirror_config(tmp_path, fake.url)) as base:
        data = await get_blob(base, "lib/app", digest)
    assert sha256_digest(data) == digest
    assert fake.cdn_requests, "the blob should have come from the CDN"
    assert all("Authorization" not in h for h in fake.cdn_requests)


async def test_rate_limit_is_passed_on_with_retry_after(fake: FakeUpstream, tmp_path: Path) -> None:
    digest = fake.add_blob(BLOB)
    fake.faults[digest] = Fault(fail_times=1, fail_status=429, retry_after="17")
    async with (
        running_mirror(mirror_config(tmp_path, fake.url)) as base,
        aiohttp.ClientSession() as s,
        s.get(f"{base}/v2/lib/app/blobs/{digest}") as resp,
    ):
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "17"
        assert (await resp.json())["errors"][0]["code"] == "TOOMANYREQUESTS"


async def test_unknown_blob_is_blob_unknown(fake: FakeUpstream, tmp_path: Path) -> None:
    missing = sha256_digest(b"nope")
    async with (
        running_mirror(mirror_config(tmp_path, fake.url)) as base,
        aiohttp.ClientSession() as s,
        s.get(f"{base}/v2/lib/app/blobs/{missing}") as resp,
    ):
        assert resp.status == 404
        assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"


async def test_stalled_body_times_out_and_is_discarded(fake: FakeUpstream, tmp_path: Path) -> None:
    digest = fake.add_blob(BLOB)
    fake.faults[digest] = Fault(delay_per_chunk=2.0)
    config = mirror_config(tmp_path, fake.url, retries=0, read_timeout="300ms")
    async with running_mirror(config) as base:
        with pytest.raises(aiohttp.ClientPayloadError):
            await get_blob(base, "lib/app", digest)
        assert cached_files(tmp_path) == {"blobs": [], "tmp": []}
        del fake.faults[digest]
        assert sha256_digest(await get_blob(base, "lib/app", digest)) == digest


async def test_manifest_with_wrong_bytes_is_refused_and_not_kept(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    mdigest, _, _ = fake.add_image("lib/app", "v1", [b"layer"])
    good, media_type = fake.manifests[("lib/app", mdigest)]
    fake.manifests[("lib/app", mdigest)] = (good + b"\n", media_type)
    async with (
        running_mirror(mirror_config(tmp_path, fake.url)) as base,
        aiohttp.ClientSession() as s,
    ):
        async with s.get(f"{base}/v2/lib/app/manifests/{mdigest}") as resp:
            assert resp.status == 502
            assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
        assert cached_files(tmp_path)["blobs"] == []
        fake.manifests[("lib/app", mdigest)] = (good, media_type)
        async with s.get(f"{base}/v2/lib/app/manifests/{mdigest}") as resp:
            assert resp.status == 200
            assert sha256_digest(await resp.read()) == mdigest


async def test_a_fill_ending_between_the_cache_check_and_the_join_is_a_hit(
    fake: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that finds the blob neither committed nor in flight, because the fill
    committed in between, is served from the cache with no fetch: a hit, not a miss."""
    digest = fake.add_blob(BLOB)
    fake.faults[digest] = Fault(delay_per_chunk=0.005)  # the first fill is still streaming
    async with running_app(mirror_config(tmp_path, fake.url)) as (_url, app):
        mirror = app[MIRROR]
        first = await mirror.blob(Name("lib/app"), digest)
        assert first.cache == "miss" and first.reader is not None
        first.reader.close()
        fill = mirror.fills.get(digest)
        assert fill is not None and fill.task is not None
        check = mirror.store.open_for_serving

        async def fill_ends_meanwhile(d: Digest) -> OpenBlob | None:
            found = await check(d)
            if found is None:
                await asyncio.wait([fill.task])  # type: ignore[list-item]
            return found

        monkeypatch.setattr(mirror.store, "open_for_serving", fill_ends_meanwhile)
        second = await mirror.blob(Name("lib/app"), digest)
        monkeypatch.undo()
        assert second.file is not None
        try:
            assert second.cache == "hit"
        finally:
            second.file.close()
        assert fake.requests[("GET", f"/v2/lib/app/blobs/{digest}")] == 1
