"""An upstream body that breaks part-way is resumed with `Range` from where it broke: waiting
clients see a pause, the stitched blob is verified whole, and the upstream sends each byte once."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest

from tests.fixtures.fake_upstream import FakeUpstream, Fault
from tests.fixtures.mirror_server import (
    cached_files,
    mirror_config,
    running_mirror,
    sha256_digest,
    wait_cached,
)

BLOB = os.urandom(4 * 1024 * 1024 + 123)
HALF = len(BLOB) // 2
CLIENTS = 5


async def get_blob(base: str, digest: str) -> bytes:
    async with aiohttp.ClientSession() as s, s.get(f"{base}/v2/lib/app/blobs/{digest}") as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


def blob_gets(fake: FakeUpstream, digest: str) -> int:
    return fake.count("GET", f"/blobs/{digest}")


async def test_a_body_broken_half_way_reaches_every_client_with_one_ranged_request(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    digest = fake.add_blob(BLOB)
    fake.faults[digest] = Fault(truncate_at=HALF, truncate_times=1, delay_per_chunk=0.002)
    async with running_mirror(mirror_config(tmp_path, fake.url)) as base:
        bodies = await asyncio.gather(*(get_blob(base, digest) for _ in range(CLIENTS)))
        assert all(sha256_digest(b) == digest for b in bodies)
        wait_cached(tmp_path, digest)
    assert blob_gets(fake, digest) == 2
    assert fake.ranges_asked == [
        (digest, None, None),
        (digest, f"bytes={HALF}-", f'"{digest}"'),  # from where it broke, If-Range the ETag
    ]
    assert fake.bytes_sent[digest] == len(BLOB)  # every byte fetched upstream once
    assert cached_files(tmp_path)["tmp"] == []


async def test_an_upstream_that_ignores_range_is_skipped_not_spliced(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    digest = fake.add_blob(BLOB)
    fake.faults[digest] = Fault(truncate_at=HALF, truncate_times=1, ignore_range=True)
    async with running_mirror(mirror_config(tmp_path, fake.url)) as base:
        assert sha256_digest(await get_blob(base, digest)) == digest
        wait_cached(tmp_path, digest)
    assert blob_gets(fake, digest) == 2
    assert fake.bytes_sent[digest] == len(BLOB) + HALF  # the 200 resent the first half


async def test_a_redirected_body_resumes_through_a_fresh_redirect(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """A signed CDN URL may have expired: the resume asks the registry again, which redirects."""
    digest = fake.add_blob(BLOB)
    fake.faults[digest] = Fault(redirect=True, truncate_at=HALF, truncate_times=1)
    async with running_mirror(mirror_config(tmp_path, fake.url)) as base:
        assert sha256_digest(await get_blob(base, digest)) == digest
    assert fake.count("GET", f"/v2/lib/app/blobs/{digest}") == 2  # two redirects
    assert fake.count("GET", f"/cdn/{digest}") == 2
    assert [h.get("Range") for h in fake.cdn_requests] == [None, f"bytes={HALF}-"]
    assert all("Authorization" not in h for h in fake.cdn_requests)
    assert fake.bytes_sent[digest] == len(BLOB)


async def test_resumes_are_bounded_and_a_body_that_keeps_breaking_is_not_kept(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    digest = fake.add_blob(BLOB)
    fake.faults[digest] = Fault(truncate_at=HALF)  # every body breaks there
    async with running_mirror(mirror_config(tmp_path, fake.url, retries=2)) as base:
        with pytest.raises(aiohttp.ClientPayloadError):
            await get_blob(base, digest)
        assert blob_gets(fake, digest) == 3  # the first, then two resumes
        assert cached_files(tmp_path) == {"blobs": [], "tmp": []}
        del fake.faults[digest]
        assert sha256_digest(await get_blob(base, digest)) == digest
