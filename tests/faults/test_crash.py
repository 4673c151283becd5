"""kill -9 in the middle of a fill: the restarted mirror resumes the dead fill's partial from
its end (only the rest crosses the upstream link), and never serves a partial, or a wrong one,
as a complete blob."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.fixtures.fake_upstream import FakeUpstream, Fault
from tests.fixtures.mirror_server import MirrorProcess, sha256_digest

pytestmark = pytest.mark.timeout(120)

BLOB = os.urandom(8 * 1024 * 1024)
OVERLAP_MAX = 2 * 1024 * 1024  # bytes the dead process received but never wrote (in flight)


@dataclass
class Crashed:
    """A mirror killed mid-fill of `digest`, and what it left."""

    mirror: MirrorProcess
    digest: str
    partial: Path
    sent_before: int  # bytes the upstream sent to the dead process


async def kill_mid_fill(fake: FakeUpstream, tmp_path: Path) -> Crashed:
    digest = fake.add_blob(BLOB)
    fake.faults[digest] = Fault(delay_per_chunk=0.02)  # ~2.5 s for the whole body
    cache = tmp_path / "cache"
    mirror = MirrorProcess(cache, fake.url, log_path=tmp_path / "mirror.log")
    await asyncio.to_thread(mirror.start)
    received = 0
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{mirror.url}/v2/lib/app/blobs/{digest}") as resp,
    ):
        assert resp.status == 200
        async for chunk in resp.content.iter_any():
            received += len(chunk)
            if received > 2 * 1024 * 1024:
                await asyncio.to_thread(mirror.kill)
                break
    assert 0 < received < len(BLOB)
    assert not any(p.is_file() for p in (cache / "blobs").rglob("*")), "nothing committed"
    (partial,) = (cache / "tmp").glob("*.part")  # the dead fill's temp file
    await asyncio.sleep(0.2)  # the upstream notices the closed connection
    return Crashed(mirror, digest, partial, fake.bytes_sent[digest])


async def get(url: str) -> bytes:
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        assert resp.status == 200
        return await resp.read()


async def tmp_emptied(cache: Path, limit: float = 10.0) -> None:
    """Until `tmp/` is empty: clients have every verified byte before the fsync and rename."""
    deadline = time.monotonic() + limit
    while entries := list((cache / "tmp").iterdir()):
        assert time.monotonic() < deadline, f"left in tmp/: {entries}"
        await asyncio.sleep(0.02)


def overwrite(path: Path, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.write(data)


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def events(mirror: MirrorProcess, name: str) -> list[dict[str, object]]:
    return [e for e in mirror.log_events() if e.get("event") == name]


async def test_restart_resumes_the_partial_fetching_only_the_rest(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    crashed = await kill_mid_fill(fake, tmp_path)
    mirror, digest = crashed.mirror, crashed.digest
    kept = crashed.partial.stat().st_size
    assert 0 < kept < len(BLOB)
    try:
        await asyncio.to_thread(mirror.start)
        assert crashed.partial.exists(), "the restart keeps the partial"
        data = await get(f"{mirror.url}/v2/lib/app/blobs/{digest}")
        assert sha256_digest(data) == digest
        after = fake.bytes_sent[digest] - crashed.sent_before
        assert after == len(BLOB) - kept, "only the bytes the partial lacked were fetched"
        assert fake.ranges_asked[-1][:2] == (digest, f"bytes={kept}-")
        overlap = crashed.sent_before - kept  # sent to the dead process, lost with it
        assert 0 <= overlap <= OVERLAP_MAX
        assert fake.bytes_sent[digest] <= len(BLOB) + OVERLAP_MAX
        print(
            f"\nupstream bytes: before kill {crashed.sent_before}, kept {kept}, after restart "
            f"{after}, total {fake.bytes_sent[digest]} for a blob of {len(BLOB)}"
        )
        (resumed,) = events(mirror, "partial_resumed")
        assert resumed["digest"] == digest and resumed["offset"] == kept
        await tmp_emptied(mirror.cache_dir)  # committed: the partial became the blob
    finally:
        await asyncio.to_thread(mirror.stop)


async def test_wrong_partial_fails_its_digest_is_discarded_and_refetched_whole(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    crashed = await kill_mid_fill(fake, tmp_path)
    mirror, digest = crashed.mirror, crashed.digest
    kept = crashed.partial.stat().st_size
    overwrite(crashed.partial, b"\0" * 4096)  # the disk returned other bytes
    del fake.faults[digest]
    try:
        await asyncio.to_thread(mirror.start)
        url = f"{mirror.url}/v2/lib/app/blobs/{digest}"
        with pytest.raises(aiohttp.ClientPayloadError):
            await get(url)  # cut short: never a complete-looking body of the wrong bytes
        (mismatch,) = events(mirror, "digest_mismatch")
        assert mismatch["resumed"] == kept
        await tmp_emptied(mirror.cache_dir)  # the wrong partial was discarded
        sent = fake.bytes_sent[digest]
        data = await get(url)
        assert sha256_digest(data) == digest
        assert fake.bytes_sent[digest] - sent == len(BLOB), "refetched whole"
        assert fake.ranges_asked[-1][:2] == (digest, None)
    finally:
        await asyncio.to_thread(mirror.stop)


async def test_truncated_partial_resumes_from_its_shorter_end(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    crashed = await kill_mid_fill(fake, tmp_path)
    mirror, digest = crashed.mirror, crashed.digest
    kept = crashed.partial.stat().st_size // 2
    os.truncate(crashed.partial, kept)  # the tail of the write never reached the disk
    del fake.faults[digest]
    try:
        await asyncio.to_thread(mirror.start)
        data = await get(f"{mirror.url}/v2/lib/app/blobs/{digest}")
        assert sha256_digest(data) == digest
        assert fake.bytes_sent[digest] - crashed.sent_before == len(BLOB) - kept
    finally:
        await asyncio.to_thread(mirror.stop)


async def test_offline_never_serves_a_partial_even_a_complete_one(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    crashed = await kill_mid_fill(fake, tmp_path)
    kept = crashed.partial.stat().st_size
    append(crashed.partial, BLOB[kept:])  # every byte there, the right ones, unverified
    offline = MirrorProcess(
        crashed.mirror.cache_dir, fake.url, log_path=tmp_path / "offline.log",
        env={"REGISTRY_MIRROR_OFFLINE": "true"},
    )  # fmt: skip
    try:
        await asyncio.to_thread(offline.start)
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{offline.url}/v2/lib/app/blobs/{crashed.digest}") as resp,
        ):
            assert resp.status == 404
            assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
        assert crashed.partial.exists()
        assert not any(p.is_file() for p in (offline.cache_dir / "blobs").rglob("*"))
    finally:
        await asyncio.to_thread(offline.stop)
