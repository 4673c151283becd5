"""kill -9 in the middle of a fill leaves nothing that could be served as a complete blob."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp

from tests.fixtures.fake_upstream import FakeUpstream, Fault
from tests.fixtures.mirror_server import MirrorProcess, sha256_digest

BLOB = os.urandom(8 * 1024 * 1024)


async def test_kill_9_mid_fill_leaves_no_servable_blob(fake: FakeUpstream, tmp_path: Path) -> None:
    digest = fake.add_blob(BLOB)
    fake.faults[digest] = Fault(delay_per_chunk=0.02)  # ~2.5 s for the whole body
    cache = tmp_path / "cache"
    mirror = MirrorProcess(cache, fake.url, log_path=tmp_path / "mirror.log")
    await asyncio.to_thread(mirror.start)
    try:
        received = 0
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{mirror.url}/v2/lib/app/blobs/{digest}") as resp,
        ):
            assert resp.status == 200
            async for chunk in resp.content.iter_any():
                received += len(chunk)
                if received > 1024 * 1024:
                    await asyncio.to_thread(mirror.kill)
                    break
        assert 0 < received < len(BLOB)
        assert not any((cache / "blobs").rglob("*.*")), "nothing but committed blobs there"
        assert not any(p.is_file() for p in (cache / "blobs").rglob("*"))
        assert len(list((cache / "tmp").iterdir())) == 1  # the dead fill's temp file

        # Restart: the dead fill's temp file is swept and a fresh fetch serves the real bytes.
        del fake.faults[digest]
        await asyncio.to_thread(mirror.start)
        assert list((cache / "tmp").iterdir()) == []
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{mirror.url}/v2/lib/app/blobs/{digest}") as resp,
        ):
            assert resp.status == 200
            assert sha256_digest(await resp.read()) == digest
    finally:
        await asyncio.to_thread(mirror.stop)
