"""A cold fill's delivery does not wait for the disk: readers near the head are sent the
newest bytes from memory (the fill's window) by threads, while the write trails behind."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp
import pytest

from mirror.cache import blobs
from mirror.reference import Digest
from mirror.web.keys import MIRROR
from tests.fixtures.fake_upstream import FakeUpstream, Fault
from tests.fixtures.mirror_server import mirror_config, running_app, sha256_digest, wait_cached

MiB = 1024 * 1024


async def test_clients_get_bytes_the_disk_has_not_taken_yet(
    fake: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a disk slower than the link, a client is ahead of the temp file; the whole blob
    still arrives verified and is committed once."""
    blob = os.urandom(6 * MiB)
    digest = Digest(fake.add_blob(blob))
    fake.faults[digest] = Fault(delay_per_chunk=0.002)  # a steady stream, not one burst
    write_all = blobs.FileBlobWriter._write_all

    def slow_disk(self: blobs.FileBlobWriter, chunks: list[bytes]) -> None:
        time.sleep(0.15)  # every batch: the disk trails the network
        write_all(self, chunks)

    monkeypatch.setattr(blobs.FileBlobWriter, "_write_all", slow_disk)
    async with running_app(mirror_config(tmp_path, fake.url)) as (base, app):
        async with aiohttp.ClientSession() as s, s.get(f"{base}/v2/lib/app/blobs/{digest}") as resp:
            got = bytearray()
            ahead = 0  # most bytes the client held beyond what the temp file held
            async for chunk in resp.content.iter_any():
                got += chunk
                fill = app[MIRROR].fills.get(digest)
                if fill is not None:
                    ahead = max(ahead, len(got) - fill.written)
        assert sha256_digest(bytes(got)) == digest
        assert ahead >= MiB, f"the client was at most {ahead} bytes ahead of the disk"
        wait_cached(tmp_path, digest)
    assert fake.count("GET", digest) == 1


async def test_clients_that_stop_reading_hold_back_no_one(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """Eight clients that stop reading a cold blob (their sockets full) do not tie up the
    sending threads: a ninth gets the whole blob, verified."""
    blob = os.urandom(24 * MiB)
    digest = Digest(fake.add_blob(blob))
    async with running_app(mirror_config(tmp_path, fake.url)) as (base, _app):
        url = f"{base}/v2/lib/app/blobs/{digest}"
        stalled = [aiohttp.ClientSession() for _ in range(8)]
        try:
            responses = [await s.get(url) for s in stalled]
            for resp in responses:
                await resp.content.readexactly(64 * 1024)  # then never read again
            async with aiohttp.ClientSession() as s, s.get(url) as resp:
                body = await asyncio.wait_for(resp.read(), timeout=20)
            assert sha256_digest(body) == digest
        finally:
            for s in stalled:
                await s.close()
        wait_cached(tmp_path, digest)
    assert fake.count("GET", digest) == 1


async def test_clients_gone_mid_fill_leave_no_descriptor_open(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    blob = os.urandom(8 * MiB)
    digest = Digest(fake.add_blob(blob))
    fake.faults[digest] = Fault(delay_per_chunk=0.005)
    other = Digest(fake.add_blob(os.urandom(MiB)))
    async with running_app(mirror_config(tmp_path, fake.url)) as (base, _app):
        url = f"{base}/v2/lib/app/blobs/{digest}"
        async with aiohttp.ClientSession() as s, s.get(f"{base}/v2/lib/app/blobs/{other}") as r:
            assert sha256_digest(await r.read()) == other  # the mirror's own files are open now
        wait_cached(tmp_path, other)
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(5):
            async with aiohttp.ClientSession() as s:
                resp = await s.get(url)
                await resp.content.readexactly(256 * 1024)
                resp.close()  # the client hangs up mid-blob
        async with aiohttp.ClientSession() as s, s.get(url) as resp:
            assert sha256_digest(await resp.read()) == digest
        wait_cached(tmp_path, digest)
        for _ in range(100):  # the server notices the hang-ups on its own time
            if len(os.listdir("/proc/self/fd")) <= before:
                break
            await asyncio.sleep(0.05)
        assert len(os.listdir("/proc/self/fd")) <= before
    assert fake.count("GET", digest) == 1
