"""The front door's limits and upstream TLS options, against the in-process fake upstream."""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path

import aiohttp
import pytest

from tests.fixtures.certs import CertAuthority
from tests.fixtures.fake_upstream import FakeUpstream, Fault
from tests.fixtures.mirror_server import mirror_config, running_mirror, sha256_digest


async def test_per_client_rate_limit_answers_429_with_retry_after(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    digest = fake.add_blob(os.urandom(1000))
    config = mirror_config(
        tmp_path, fake.url, settings={"limits.client_rate": 1, "limits.client_burst": 3}
    )
    async with running_mirror(config) as base, aiohttp.ClientSession() as s:
        statuses = []
        for _ in range(5):
            async with s.get(f"{base}/v2/lib/app/blobs/{digest}") as resp:
                statuses.append(resp.status)
                if resp.status == 200:
                    assert sha256_digest(await resp.read()) == digest
                else:
                    body = await resp.json()
                    assert body["errors"][0]["code"] == "TOOMANYREQUESTS"
                    assert int(resp.headers["Retry-After"]) >= 1
        assert statuses[:3] == [200, 200, 200] and 429 in statuses[3:]
        async with s.get(f"{base}/healthz") as resp:  # operators' endpoints are not limited
            assert resp.status == 200
    assert fake.count("GET", f"/blobs/{digest}") == 1


async def test_request_timeout_answers_504_and_the_fill_goes_on(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    digest = fake.add_blob(os.urandom(1000))
    fake.faults[digest] = Fault(delay_headers=1.5)
    config = mirror_config(tmp_path, fake.url, settings={"limits.request_timeout": "500ms"})
    async with running_mirror(config) as base, aiohttp.ClientSession() as s:
        async with s.get(f"{base}/v2/lib/app/blobs/{digest}") as resp:
            assert resp.status == 504
            assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
        await asyncio.sleep(1.5)  # the upstream answers; the fill it started completes
        async with s.get(f"{base}/v2/lib/app/blobs/{digest}") as resp:
            assert resp.status == 200
            assert sha256_digest(await resp.read()) == digest
    assert fake.count("GET", f"/blobs/{digest}") == 1


async def test_a_long_transfer_is_not_cut_by_the_request_timeout(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    data = os.urandom(1024 * 1024)
    digest = fake.add_blob(data)
    fake.faults[digest] = Fault(delay_per_chunk=0.05)  # 16 chunks: ~0.8 s of body
    config = mirror_config(tmp_path, fake.url, settings={"limits.request_timeout": "300ms"})
    async with (
        running_mirror(config) as base,
        aiohttp.ClientSession() as s,
        s.get(f"{base}/v2/lib/app/blobs/{digest}") as resp,
    ):
        assert resp.status == 200
        assert sha256_digest(await resp.read()) == digest


async def test_oversized_headers_are_refused(fake: FakeUpstream, tmp_path: Path) -> None:
    config = mirror_config(tmp_path, fake.url, settings={"limits.max_header_size": "2KiB"})
    async with running_mirror(config) as base:
        host, port = base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n")
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        assert status_line.split()[1] in (b"400", b"431")
        async with aiohttp.ClientSession() as s, s.get(f"{base}/v2/") as resp:
            assert resp.status == 200  # normal requests still served


async def test_concurrent_upstream_fetches_are_capped_per_upstream(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    digests = [fake.add_blob(os.urandom(256 * 1024)) for _ in range(6)]
    for digest in digests:
        fake.faults[digest] = Fault(delay_per_chunk=0.05)
    config = mirror_config(tmp_path, fake.url, max_concurrent_fetches=2)
    async with running_mirror(config) as base, aiohttp.ClientSession() as s:

        async def get(digest: str) -> None:
            async with s.get(f"{base}/v2/lib/app/blobs/{digest}") as resp:
                assert resp.status == 200
                assert sha256_digest(await resp.read()) == digest

        await asyncio.gather(*(get(d) for d in digests))
    assert fake.max_in_flight == 2


@pytest.mark.parametrize("mode", ["ca_file", "insecure", "system"])
async def test_upstream_tls_trusts_the_configured_ca_or_is_told_not_to_check(
    tmp_path: Path, mode: str
) -> None:
    ca = CertAuthority(tmp_path / "pki")
    cert, key, _ = ca.issue("127.0.0.1", "upstream", server=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    fake = FakeUpstream(require_token=False)
    await fake.start(ssl=context)
    try:
        assert fake.url.startswith("https://")
        digest = fake.add_blob(os.urandom(5000))
        options: dict[str, object] = {"retries": 0}
        if mode == "ca_file":
            options["ca_file"] = str(ca.ca_path)
        if mode == "insecure":
            options["insecure"] = True
        config = mirror_config(tmp_path / "cache", fake.url, **options)
        async with (
            running_mirror(config) as base,
            aiohttp.ClientSession() as s,
            s.get(f"{base}/v2/lib/app/blobs/{digest}") as resp,
        ):
            if mode == "system":  # the test CA is not one the system trusts
                assert resp.status == 502
                assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
            else:
                assert resp.status == 200
                assert sha256_digest(await resp.read()) == digest
    finally:
        await fake.close()
