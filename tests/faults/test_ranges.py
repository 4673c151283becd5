"""Byte ranges on every blob path: cached, filling, and passed through on a full disk."""

from __future__ import annotations

import asyncio
import os
import time
from email import message_from_bytes
from email.message import Message
from pathlib import Path

import aiohttp
import pytest

from mirror.cache.fill import FillState
from mirror.reference import Digest
from mirror.web.keys import MIRROR
from tests.fixtures.fake_upstream import FakeUpstream, Fault
from tests.fixtures.mirror_server import (
    cached_files,
    mirror_config,
    running_app,
    sha256_digest,
    wait_cached,
)

BLOB = os.urandom(2 * 1024 * 1024 + 999)
SIZE = len(BLOB)
KiB = 1024

SINGLE = [
    ("bytes=0-1023", 0, 1024),
    ("bytes=1000-", 1000, SIZE),
    ("bytes=-500", SIZE - 500, SIZE),
    ("bytes=100-99999999", 100, SIZE),
    ("bytes=-99999999", 0, SIZE),
    ("bytes=0-0", 0, 1),
]


def parts_of(body: bytes, content_type: str) -> list[Message]:
    """A real MIME parser's view of a multipart/byteranges body."""
    message = message_from_bytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    assert message.is_multipart()
    payload = message.get_payload()
    assert isinstance(payload, list)
    return payload


async def check_ranges(s: aiohttp.ClientSession, url: str) -> None:
    """Every single-range form, multi-range, If-Range and 416 against `url`."""
    for header, start, stop in SINGLE:
        async with s.get(url, headers={"Range": header}) as resp:
            assert resp.status == 206, header
            assert resp.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{SIZE}"
            assert resp.headers["Accept-Ranges"] == "bytes"
            assert await resp.read() == BLOB[start:stop], header
    header = "bytes=0-9,100-109,105-199,-10"  # the middle two overlap: coalesced
    async with s.get(url, headers={"Range": header}) as resp:
        assert resp.status == 206
        body = await resp.read()
        assert int(resp.headers["Content-Length"]) == len(body)
        parts = parts_of(body, resp.headers["Content-Type"])
    expected = [(0, 10), (100, 200), (SIZE - 10, SIZE)]
    assert [p["Content-Range"] for p in parts] == [f"bytes {a}-{b - 1}/{SIZE}" for a, b in expected]
    assert [p.get_payload(decode=True) for p in parts] == [BLOB[a:b] for a, b in expected]
    many = ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(40))
    async with s.get(url, headers={"Range": f"bytes={many}"}) as resp:
        assert resp.status == 200  # beyond the cap: the whole blob
        assert sha256_digest(await resp.read()) == sha256_digest(BLOB)
    async with s.get(url, headers={"Range": f"bytes={SIZE}-"}) as resp:
        assert resp.status == 416
        assert resp.headers["Content-Range"] == f"bytes */{SIZE}"
    etag = f'"{sha256_digest(BLOB)}"'
    async with s.get(url, headers={"Range": "bytes=5-9", "If-Range": etag}) as resp:
        assert resp.status == 206 and await resp.read() == BLOB[5:10]
    async with s.get(url, headers={"Range": "bytes=5-9", "If-Range": '"other"'}) as resp:
        assert resp.status == 200 and await resp.read() == BLOB


async def test_every_range_form_on_a_cached_blob(fake: FakeUpstream, tmp_path: Path) -> None:
    digest = fake.add_blob(BLOB)
    async with running_app(mirror_config(tmp_path, fake.url)) as (base, _app):
        url = f"{base}/v2/lib/app/blobs/{digest}"
        async with aiohttp.ClientSession() as s:
            async with s.head(url) as resp:  # not cached yet: the upstream's size
                assert resp.status == 200 and resp.content_length == SIZE
                assert resp.headers["Accept-Ranges"] == "bytes"
            async with s.get(url) as resp:
                assert sha256_digest(await resp.read()) == digest
            wait_cached(tmp_path, digest)
            async with s.head(url) as resp:
                assert resp.content_length == SIZE and resp.headers["Accept-Ranges"] == "bytes"
            await check_ranges(s, url)
    assert fake.count("GET", digest) == 1


async def test_ranges_on_a_blob_passed_through_a_full_disk(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    digest = fake.add_blob(BLOB)
    async with running_app(mirror_config(tmp_path, fake.url)) as (base, app):
        app[MIRROR].disk.until = time.time() + 3600  # the cache takes nothing: pass-through
        async with aiohttp.ClientSession() as s:
            await check_ranges(s, f"{base}/v2/lib/app/blobs/{digest}")
    assert fake.count("GET", digest) > 1  # each request passed through
    assert cached_files(tmp_path)["blobs"] == []


async def test_a_range_of_bytes_already_filled_is_served_at_once(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """The first KiB of a blob still streaming from a slow upstream comes in well under 100 ms;
    the last KiB waits for the one fill (and its verification); the upstream is asked once."""
    digest = Digest(fake.add_blob(BLOB))
    fake.faults[digest] = Fault(delay_per_chunk=0.05)  # 64 KiB / 50 ms: ~1.7 s for the blob
    async with running_app(mirror_config(tmp_path, fake.url)) as (base, app):
        url = f"{base}/v2/lib/app/blobs/{digest}"
        mirror = app[MIRROR]
        async with aiohttp.ClientSession() as s:
            whole = asyncio.ensure_future(s.get(url))
            # polling the fill's progress from outside
            while (fill := mirror.fills.get(digest)) is None or fill.written < 64 * KiB:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            started = time.perf_counter()
            async with s.get(url, headers={"Range": "bytes=0-1023"}) as resp:
                first = await resp.read()
                elapsed = time.perf_counter() - started
                assert resp.status == 206
            assert first == BLOB[:KiB]
            assert elapsed < 0.1, f"first KiB took {elapsed:.3f}s"
            assert fill.state is FillState.STREAMING  # the rest still streams
            async with s.get(url, headers={"Range": "bytes=10-19,-1024"}) as resp:
                parts = parts_of(await resp.read(), resp.headers["Content-Type"])
            assert [p.get_payload(decode=True) for p in parts] == [BLOB[10:20], BLOB[-KiB:]]
            async with await whole as resp:
                assert sha256_digest(await resp.read()) == digest
    assert fake.count("GET", digest) == 1


async def test_a_cold_range_starts_the_fill_and_does_not_wait_for_it(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    digest = Digest(fake.add_blob(BLOB))
    fake.faults[digest] = Fault(delay_per_chunk=0.05)
    async with running_app(mirror_config(tmp_path, fake.url)) as (base, app):
        url = f"{base}/v2/lib/app/blobs/{digest}"
        async with aiohttp.ClientSession() as s:
            started = time.perf_counter()
            async with s.get(url, headers={"Range": "bytes=0-1023"}) as resp:
                assert resp.status == 206 and await resp.read() == BLOB[:KiB]
            assert time.perf_counter() - started < 0.5
            fill = app[MIRROR].fills.get(digest)
            assert fill is not None and fill.state is FillState.STREAMING
            async with s.get(url, headers={"Range": "bytes=-1024"}) as resp:
                assert resp.status == 206 and await resp.read() == BLOB[-KiB:]
        wait_cached(tmp_path, digest)
    assert fake.count("GET", digest) == 1


@pytest.mark.parametrize("header", ["bytes=0-9,100-109", "bytes=0-9,20-29,40-49"])
async def test_a_satisfiable_multi_range_is_never_refused(
    fake: FakeUpstream, tmp_path: Path, header: str
) -> None:
    digest = fake.add_blob(BLOB)
    async with (
        running_app(mirror_config(tmp_path, fake.url)) as (base, _app),
        aiohttp.ClientSession() as s,
        s.get(f"{base}/v2/lib/app/blobs/{digest}", headers={"Range": header}) as resp,
    ):
        assert resp.status == 206
        parts = parts_of(await resp.read(), resp.headers["Content-Type"])
    spans = [tuple(int(x) for x in r.split("-")) for r in header[6:].split(",")]
    assert [p.get_payload(decode=True) for p in parts] == [BLOB[a : b + 1] for a, b in spans]
